"""Training glue: sharding a batch over a ring (labels shifted before sharding), the losses (plain and chunked),
the memory switch (``optimize_memory``), and ``RingState``: what ds_ring did to a model (``patch``,
``optimize_memory``, the Trainer) and how ``unpatch`` / ``restore_memory`` undo it.

Imports: ``ds_ring.op``, ``ds_ring.parallel``.
"""
