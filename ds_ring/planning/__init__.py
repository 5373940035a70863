"""Planning: pure functions of shapes. The op's memory estimate, the step memory planner (``ds_ring.plan``)
and the communication/time cost model of (Ulysses x ring) factorizations.

Imports: ``ds_ring.op``, ``ds_ring.parallel``, ``ds_ring.training``.
"""
