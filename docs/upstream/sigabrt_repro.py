"""Pure-torch reproducer: a gloo process group that is still referenced after destroy_process_group() (here by the
default arguments of torch.distributed.nn.functional, imported after init_process_group) makes the process abort
at interpreter exit with "terminate called without an active exception" (SIGABRT) in a fraction of runs.

    torchrun --nproc_per_node 2 --master_addr 127.0.0.1 docs/upstream/sigabrt_repro.py [--mode MODE]

MODE: late-import (default: ``import torch.distributed.nn`` after init_process_group), import-first (the same
import before it: no abort), global-ref (no import; a module-level ``keep = dist.group.WORLD``), no-destroy (no
import, no destroy_process_group). Rates: docs/upstream_sigabrt.md (loop: benchmarks/exit_loop.py).
"""

import argparse

import torch
import torch.distributed as dist

parser = argparse.ArgumentParser()
parser.add_argument("--mode", default="late-import", choices=["late-import", "import-first", "global-ref", "no-destroy"])
mode = parser.parse_args().mode

if mode == "import-first":
    import torch.distributed.nn  # noqa: F401
dist.init_process_group("gloo")
if mode == "late-import":
    import torch.distributed.nn  # noqa: F401  (evaluates `group=group.WORLD` defaults: the live default group)
if mode == "global-ref":
    keep = dist.group.WORLD

x = torch.randn(1000)
out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
dist.all_gather(out, x)
if mode != "no-destroy":
    dist.destroy_process_group()
