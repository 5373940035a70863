"""`ds-ring demo`: 2 local CPU ranks train a small Llama with ZeRO-3 and ring attention on passkey retrieval.

The task: ``[BOS, M, k1..kK, filler..., M, k1..kK]`` with the loss only on the final answer tokens. The key sits at
the start of the sequence (rank 0's shard) and the question at the end (the last rank's shard), so the model can only
answer by attending across ranks. The run checks ring attention against dense attention on the first batch, measures
per-rank memory against one rank holding the whole sequence, then trains with a progress bar.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import sys
import time
import warnings
from datetime import timedelta
from importlib import resources

import torch

from ..op.layouts import LAYOUTS, get_layout
from ..training.loss import IGNORE_INDEX

BOS, MARK, KEY0, NUM_KEYS, FILLER0 = 1, 3, 4, 16, 32


def passkey_batch(batch_size: int, seq_len: int, vocab_size: int, key_len: int, generator: torch.Generator):
    """A full (unsharded) passkey batch: ``input_ids`` and ``labels`` (-100 except on the answer tokens)."""
    if seq_len < 2 * key_len + 4:
        raise ValueError(f"seq_len={seq_len} is too short for a passkey of {key_len} tokens: use >= {2 * key_len + 4}")
    if vocab_size <= FILLER0:
        raise ValueError(f"the passkey task needs a vocabulary larger than {FILLER0} tokens, got {vocab_size}")
    keys = torch.stack([torch.randperm(NUM_KEYS, generator=generator)[:key_len] + KEY0 for _ in range(batch_size)])
    ids = torch.randint(FILLER0, vocab_size, (batch_size, seq_len), generator=generator)
    ids[:, 0], ids[:, 1], ids[:, 2 : 2 + key_len] = BOS, MARK, keys
    ids[:, seq_len - key_len - 1], ids[:, seq_len - key_len :] = MARK, keys
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[:, seq_len - key_len :] = keys
    return {"input_ids": ids, "labels": labels}


def parse_pattern(text: str) -> tuple[list[int] | None, list[int] | None]:
    """``"dense"`` -> (None, None); ``"64,128:1,2"`` -> segment lengths [64, 128], dilation rates [1, 2]."""
    if text == "dense":
        return None, None
    try:
        seg, dil = text.split(":")
        segments, rates = [int(x) for x in seg.split(",")], [int(x) for x in dil.split(",")]
    except ValueError:
        raise ValueError(f"pattern {text!r} is not 'dense' or 'SEGMENTS:RATES' like '64,128:1,2'") from None
    if len(segments) != len(rates):
        raise ValueError(f"pattern {text!r}: {len(segments)} segment lengths but {len(rates)} dilation rates")
    return segments, rates


def tiny_llama_config():
    """The small Llama-style config shipped with the package (no download)."""
    from transformers import AutoConfig

    path = resources.files("ds_ring") / "configs" / "tiny_llama.json"
    with resources.as_file(path) as p:
        return AutoConfig.from_pretrained(str(p))


def _rank_main(rank: int, world: int, args: argparse.Namespace) -> dict:
    # DeepSpeed calls torch.distributed APIs that torch 2.13 deprecates: one FutureWarning per call, per step.
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")
    result = _train(rank, args)
    import ds_ring

    ds_ring.teardown()  # after _train returned (nothing holds the groups now): every rank exits 0
    return result


def _quiet_libraries(rank: int) -> None:
    import logging

    import transformers
    from deepspeed.utils import logger as ds_logger

    ds_logger.setLevel(logging.WARNING if rank == 0 else logging.ERROR)
    transformers.logging.set_verbosity_error()


def _train(rank: int, args: argparse.Namespace) -> dict:
    """The demo on one rank: the ring checked against dense attention, its memory against one rank, then training."""
    from transformers import AutoModelForCausalLM

    import ds_ring
    from ds_ring.integrations.transformers import patch

    sp = ds_ring.init_sequence_parallel(args.ranks, layout=args.layout, backend="gloo",
                                        timeout=timedelta(seconds=args.timeout))
    _quiet_libraries(rank)
    say = print if rank == 0 else (lambda *a, **k: None)
    segments, rates = parse_pattern(args.pattern)
    cfg = tiny_llama_config()
    torch.manual_seed(args.seed)
    model = patch(AutoModelForCausalLM.from_config(cfg), sp=sp, segment_lengths=segments, dilation_rates=rates)
    gen = torch.Generator().manual_seed(args.seed)
    say(f"ds-ring demo: {args.ranks} CPU ranks, ZeRO-3, {cfg.num_hidden_layers}-layer Llama "
        f"(hidden {cfg.hidden_size}, {sum(p.numel() for p in model.parameters()) / 1e3:.0f}k params), "
        f"passkey retrieval over {args.seq_len} tokens ({args.seq_len // args.ranks} per rank), pattern {args.pattern}")
    first = passkey_batch(args.batch_size, args.seq_len, cfg.vocab_size, args.key_len, gen)
    rest = (passkey_batch(args.batch_size, args.seq_len, cfg.vocab_size, args.key_len, gen)
            for _ in range(args.steps - 1))
    err = _check_against_dense(model, sp, first, args.pattern, say)  # before ZeRO-3 partitions the weights
    peaks, whole_peak = _measure_memory(model, sp, first, say)
    steps = itertools.islice(itertools.chain([first], rest), args.steps)
    losses, accs, elapsed = _train_zero3(model, sp, steps, rank, args)
    k = max(1, min(10, args.steps // 5))
    first_loss, last_loss = sum(losses[:k]) / k, sum(losses[-k:]) / k
    say(f"[result] loss {first_loss:.3f} -> {last_loss:.3f} (mean of first/last {k} steps); passkey accuracy over "
        f"the last {k} steps: {sum(accs[-k:]) / k:.0%} (chance: {1 / NUM_KEYS:.0%}); {elapsed:.0f}s of training")
    return {"losses": losses, "accs": accs, "ring_dense_err": err, "peaks": peaks, "whole_peak": whole_peak}


def _check_against_dense(model, sp, first: dict, pattern: str, say) -> float:
    """Ring attention against dense attention (the same model, local) on the first batch: max |logit difference|."""
    from ds_ring.integrations.transformers import local_attention
    from ds_ring.parallel.sharding import gather_sequence
    from ds_ring.training.data import shard_batch

    local = shard_batch(first, sp)
    local.pop("shift_labels")
    with torch.no_grad():
        ring_logits = gather_sequence(model(**local).logits, 1, sp.group, sp.sequence_layout)
        with local_attention(model):
            dense_logits = model(input_ids=first["input_ids"]).logits
    err = (ring_logits - dense_logits).abs().max().item()
    if pattern == "dense":
        if err > 1e-4:
            raise RuntimeError(f"ring attention differs from dense attention on the first batch: max |diff| = {err}")
        say(f"[check] ring attention == dense attention on the first batch: max |logit diff| = {err:.1e}")
    else:
        say(f"[check] dilated pattern vs dense attention on the first batch: max |logit diff| = {err:.2e} "
            "(dilated attention is sparser than dense, a difference is expected)")
    return err


def _measure_memory(model, sp, first: dict, say) -> tuple[list[int], int]:
    """Peak bytes of one forward+backward: each rank's shard on the ring, and one rank holding the whole sequence."""
    from ds_ring.integrations.transformers import local_attention
    from ds_ring.planning.op_memory import measure_peak_bytes
    from ds_ring.training.data import shard_batch
    from ds_ring.training.loss import causal_lm_loss

    def peak_of(run) -> int:
        with _stderr_silenced():  # the profiler behind measure_peak_bytes prints start/stop lines on stderr
            return measure_peak_bytes(run)

    local = shard_batch(first, sp)
    labels = local.pop("shift_labels")

    def ring_step():
        causal_lm_loss(model(**local).logits, labels, sp).backward()

    def whole_step():
        with local_attention(model):
            model(input_ids=first["input_ids"], labels=first["labels"]).loss.backward()

    ring_peak, whole_peak = peak_of(ring_step), peak_of(whole_step)
    model.zero_grad(set_to_none=True)
    peaks = [None] * sp.sp_size
    torch.distributed.all_gather_object(peaks, ring_peak)
    say("[memory] peak bytes of one forward+backward, per rank: "
        + ", ".join(f"rank {r}: {p / 2**20:.1f} MiB" for r, p in enumerate(peaks))
        + f"  vs one rank with the whole sequence: {whole_peak / 2**20:.1f} MiB "
        f"({whole_peak / max(peaks):.1f}x more)")
    return peaks, whole_peak


def _train_zero3(model, sp, batches, rank: int, args: argparse.Namespace) -> tuple[list[float], list[float], float]:
    """Train with ZeRO-3 on ``batches`` (full batches) with a progress bar: losses, answer accuracies, seconds."""
    from tqdm.auto import tqdm

    from ds_ring.integrations.deepspeed import initialize
    from ds_ring.training.data import shard_batch
    from ds_ring.training.loss import causal_lm_loss

    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    config = {"train_micro_batch_size_per_gpu": args.batch_size, "gradient_accumulation_steps": 1,
              "gradient_clipping": 1.0, "zero_optimization": {"stage": 3}, "steps_per_print": 10**9}
    engine, *_ = initialize(model, sp, config, optimizer=opt)
    bar = tqdm(total=args.steps, desc="train", disable=rank != 0, dynamic_ncols=True, mininterval=0.5)
    losses, accs, t0 = [], [], time.perf_counter()
    for step, full in enumerate(batches):
        local = shard_batch(full, sp)
        labels = local.pop("shift_labels")
        logits = engine(**local).logits
        loss = causal_lm_loss(logits, labels, sp)
        engine.backward(loss)
        engine.step()
        acc = _answer_accuracy(logits, labels, sp)
        losses.append(loss.item())
        accs.append(acc)
        tok_s = (step + 1) * args.batch_size * args.seq_len / (time.perf_counter() - t0)
        bar.update()
        bar.set_postfix(loss=f"{loss.item():.3f}", acc=f"{acc:.2f}", tok_s=f"{tok_s:.0f}")
    bar.close()
    elapsed = time.perf_counter() - t0
    engine.destroy()
    return losses, accs, elapsed


@contextlib.contextmanager
def _stderr_silenced():
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _answer_accuracy(logits: torch.Tensor, shift_labels: torch.Tensor, sp) -> float:
    """Fraction of answer tokens predicted right, over the whole ring (labels are -100 elsewhere)."""
    valid = shift_labels != IGNORE_INDEX
    stats = torch.tensor([(logits.argmax(-1)[valid] == shift_labels[valid]).sum().item(), valid.sum().item()],
                         dtype=torch.float64)
    torch.distributed.all_reduce(stats, group=sp.group)
    return (stats[0] / stats[1].clamp(min=1)).item()


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ranks", type=int, default=2, help="local CPU ranks in the ring (default 2)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per sequence, split over the ranks (default 256)")
    p.add_argument("--steps", type=int, default=250, help="training steps (default 250)")
    p.add_argument("--pattern", default="dense",
                   help="'dense' (exact ring attention, default) or LongNet 'SEGMENTS:RATES', e.g. '64,256:1,4'")
    p.add_argument("--layout", default="zigzag", choices=list(LAYOUTS), help="sequence layout on the ring")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per step (default 8)")
    p.add_argument("--key-len", type=int, default=1, help="passkey length in tokens (default 1)")
    p.add_argument("--lr", type=float, default=3e-3, help="AdamW learning rate (default 3e-3)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=120.0,
                   help="seconds a rank waits for a dead peer before failing (default 120)")


def run(args: argparse.Namespace) -> list[dict]:
    """Spawn ``args.ranks`` local ranks on 127.0.0.1 and return their results; raise if any rank failed."""
    from .launch import spawn_local

    if args.ranks < 1:
        raise SystemExit("--ranks must be >= 1")
    err = get_layout(args.layout).seq_len_error(args.seq_len, args.ranks)
    if err:
        raise SystemExit(f"--seq-len: {err}")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # the demo runs on CPU ranks; skips DeepSpeed's device probe
    try:  # each rank makes its own process group (ds_ring.init_sequence_parallel, gloo, args.timeout)
        return spawn_local(_rank_main, args.ranks, args, init_gloo=False, timeout_s=args.timeout + 3600)
    except RuntimeError as e:
        raise SystemExit(f"ds-ring demo failed:\n{e}") from None
