"""The shape of script that used to abort at exit (issue 13): ``import ds_ring`` after ``init_process_group``, the
ring op, ``gather_sequence``, ``destroy_process_group()``. Run by benchmarks/exit_loop.py under torchrun."""

import torch
import torch.distributed as dist

dist.init_process_group("gloo")
import ds_ring  # noqa: E402  (deliberately after init_process_group)

q, k, v = (torch.randn(1, 2, 8, 4) for _ in range(3))  # this rank's shards
full = ds_ring.gather_sequence(ds_ring.ring_dilated_attention(q, k, v, causal=True), 2)
dist.destroy_process_group()
