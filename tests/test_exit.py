"""A finished run exits 0 (issue 13): spawn_local reports a rank that aborts at exit after returning its result, and
importing ds_ring (and deepspeed) after init_process_group pins no process group. teardown is tested on 4 ranks in
test_groups.py; the exit rates themselves are measured by benchmarks/exit_loop.py (too slow for the suite)."""

from __future__ import annotations

import atexit
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from dist_utils import free_port, run_distributed

ROOT = Path(__file__).resolve().parent.parent


def _abort_at_exit(rank: int, world: int) -> int:
    if rank == 1:
        atexit.register(os.abort)  # what the gloo thread does to an unlucky rank during interpreter finalization
    return rank


def test_spawn_local_fails_when_a_rank_aborts_after_returning():
    with pytest.raises(RuntimeError, match=r"rank 1 returned its result but exited with code -6 \(SIGABRT\)"):
        run_distributed(_abort_at_exit, 2, fresh_interpreters=True)  # atexit runs only in a real interpreter exit


LATE_IMPORT = """
import gc, sys, weakref
import torch, torch.distributed as dist

def init(port):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    dist.all_reduce(torch.ones(3))
    return weakref.ref(dist.group.WORLD)

world = init(sys.argv[1])
import ds_ring  # after init: transformers imports torch.distributed.nn, whose defaults capture the group
import torch.distributed.nn.functional as F
assert F.all_gather.__defaults__ == (None,), F.all_gather.__defaults__
dist.destroy_process_group()
assert world() is None, "import ds_ring after init_process_group kept the default group alive"

world = init(sys.argv[2])  # deepspeed imported first by ds_ring's DeepSpeed integration, after init
from transformers import AutoModelForCausalLM
from ds_ring.tools.demo import tiny_llama_config
model = AutoModelForCausalLM.from_config(tiny_llama_config())
engine, *_ = ds_ring.deepspeed_initialize(model, ds_ring.init_sequence_parallel(1), {
    "train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 0}},
    optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
engine.destroy()
del engine, model
gc.collect()
dist.destroy_process_group()
assert world() is None, "the DeepSpeed integration kept the default group alive"

world = init(sys.argv[3])
from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler  # a late import by the user
assert ShardedGradScaler.__init__.__defaults__[-1] is world()  # it captured the group; teardown repairs that
ds_ring.teardown(destroy_default=True)
assert world() is None
print("ok")
"""


def test_import_after_init_pins_no_process_group():
    env = dict(os.environ, PYTHONPATH=str(ROOT), DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", LOCAL_RANK="0")
    ports = [str(free_port()) for _ in range(3)]
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(LATE_IMPORT), *ports], capture_output=True,
                          text=True, env=env, timeout=240)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stdout[-2000:] + proc.stderr[-4000:]
