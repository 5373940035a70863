"""The ring attention op: layouts (how a sequence is cut over the ring), communication (point-to-point K/V
exchange, message tags), kernels (one block's attention), the schedule (pieces, steps, the one builder), the two
sources of pieces (pattern: dilated segments, causal, window; documents: packed rows), the agreement (facts every
rank checks before the first send, one builder), the engine (the one ring loop and its backward),
Ulysses (the head all-to-all) and the front door (``ring_dilated_attention``).

Imports: torch only; nothing else of ds_ring.
"""
