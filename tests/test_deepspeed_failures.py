"""Failure behaviour: a rank dying mid-step makes its peers fail within the process-group timeout (no hang), and bad
configurations stop every rank before training with one clear message from rank 0."""

from __future__ import annotations

import contextlib
import io
import json
import os
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from dist_utils import PRELOAD, free_port, run_distributed
from ds_ring.tools.launch import mp_context

pytestmark = pytest.mark.hf  # DeepSpeed: also run on the declared dependency floors (.ci/floors)

PG_TIMEOUT = 10.0


def _crash_worker(rank: int, port: int, queue, mode: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2")
    torch.set_num_threads(1)
    import ds_ring
    from ds_ring.training.data import shard_batch
    from ds_ring.tools.demo import passkey_batch, tiny_llama_config
    from ds_ring.integrations.deepspeed import initialize
    from ds_ring.training.loss import causal_lm_loss
    from ds_ring.integrations.transformers import patch
    from transformers import AutoModelForCausalLM

    sp = ds_ring.init_sequence_parallel(2, timeout=timedelta(seconds=PG_TIMEOUT))
    model = patch(AutoModelForCausalLM.from_config(tiny_llama_config()), sp=sp)
    engine, *_ = initialize(model, sp, {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}},
                            optimizer=torch.optim.AdamW(model.parameters()))
    g = torch.Generator().manual_seed(0)
    t0 = None
    try:
        for step in range(3):
            local = shard_batch(passkey_batch(1, 64, 128, 1, g), sp)
            labels = local.pop("shift_labels")
            loss = causal_lm_loss(engine(**local).logits, labels, sp)
            if step == 1 and rank == 1:
                if mode == "die":
                    os._exit(17)  # dies between forward and backward, with no goodbye
                time.sleep(PG_TIMEOUT * 4)  # "hang": alive, connections open, never joins the backward
                os._exit(18)
            t0 = time.monotonic()
            engine.backward(loss)
            engine.step()
        queue.put((rank, "finished", None))
    except Exception as e:  # what the surviving rank must see
        queue.put((rank, "raised", (type(e).__name__, str(e)[:300], time.monotonic() - t0)))


@pytest.mark.parametrize("mode", ["die", "hang"])
def test_failed_rank_makes_peer_fail_within_timeout(mode):
    ctx = mp_context(PRELOAD)  # the session's preloaded server: no imports per rank
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_crash_worker, args=(r, port, queue, mode), daemon=True) for r in range(2)]
    for p in procs:
        p.start()
    try:
        rank, status, info = queue.get(timeout=120 + PG_TIMEOUT)  # startup + the timeout; a hang fails here
    finally:
        for p in procs:
            p.join(timeout=PG_TIMEOUT + 10 if p is procs[0] else 0)
            if p.is_alive():
                p.kill()
    assert (rank, status) == (0, "raised"), (rank, status, info)
    assert info[2] < PG_TIMEOUT + 10, f"rank 0 needed {info[2]:.0f}s to notice the failed rank: {info}"
    assert procs[0].exitcode == 0  # it reported the error and exited on its own


def _config_errors_worker(rank: int, world: int, example_path: str, tmp: str) -> list[tuple[int, str]]:
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_long_context", example_path)
    ex = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ex)
    missing, auto = os.path.join(tmp, "missing.json"), os.path.join(tmp, "auto.json")
    if rank == 0:
        with open(missing, "w") as f:
            json.dump({"train_micro_batch_size_per_gpu": 1}, f)
        with open(auto, "w") as f:
            json.dump({"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3},
                       "optimizer": {"type": "AdamW", "params": {"lr": "auto"}}}, f)
    dist.barrier()
    cases = [
        ["--sp-size", "4"],
        ["--sp-size", "2", "--seq-len", "66", "--no-pad"],
        ["--sp-size", "2", "--deepspeed", missing],
        ["--sp-size", "2", "--deepspeed", auto],
    ]
    out = []
    for argv in cases:
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            code = ex.main(argv)
        out.append((code, err.getvalue()))
    return out


def test_bad_configs_stop_all_ranks_with_one_message(tmp_path):
    example = os.path.join(os.path.dirname(__file__), "..", "examples", "train_long_context.py")
    r0, r1 = run_distributed(_config_errors_worker, 2, example, str(tmp_path))
    expected = [
        "sp_size=4 is larger than the world size 2",
        "sequence length 66 is not a multiple of 4",
        "missing zero_optimization.stage",
        "unfilled \"auto\" values for ['optimizer.params.lr']",
    ]
    for (code0, err0), (code1, err1), want in zip(r0, r1, expected):
        assert code0 == code1 == 2
        assert want in err0, err0
        assert err1 == "", f"rank 1 must stay quiet, it printed: {err1}"
