"""Training glue: sharding a batch over a ring (labels shifted before sharding), the losses (plain and chunked),
and the memory switch (``optimize_memory``).

Imports: ``ds_ring.op``, ``ds_ring.parallel``.
"""
