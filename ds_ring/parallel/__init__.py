"""Parallel topology: process groups (rings, Ulysses groups, data parallelism), the lifecycle of a run (the
default group, ``teardown``), the gradient rule every engine applies (gradients.py) and moving tensors between full
sequences and shards.

Imports: ``ds_ring.op`` (layouts, communication helpers) and torch.
"""
