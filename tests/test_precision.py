"""Mixed precision: a patched model follows autocast as SDPA does, and its error against float64 is SDPA's.

A tiny Llama on a padded batch, run four ways against the same model in float64 (the definition, one process):
transformers' sdpa (unpatched, one process) and ds_ring (patched, over P = 1 and P = 2 real gloo ranks), each in
the same precision mode: bf16 autocast (``TrainingArguments(bf16=True)``), fp16 autocast, and bf16 weights
(DeepSpeed bf16: no autocast). The error of the logits (real tokens) and of the parameter gradients of the mean
next-token loss must be no worse than 1.5x sdpa's. fp16 training with a GradScaler tracks the fp32 run.

fp16 training runs twice: a loop of its own (autocast fp16 around the forward and loss,
``GradScaler.scale(loss).backward()``, ``scaler.step``, ``scaler.update``, with CPU autocast and
``torch.amp.GradScaler("cpu")``), and ``SequenceParallelTrainer(fp16=True)``. On a CPU-only machine accelerate runs
``fp16=True`` in fp32 without a GradScaler (``Accelerator.native_amp`` is False for fp16 on CPU), so the Trainer test
switches on the autocast and GradScaler accelerate uses on a GPU.
"""

from __future__ import annotations

import copy
import random

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

import ds_ring
from batches import padded_batches
from dist_utils import run_distributed
from ds_ring.parallel.sharding import gather_sequence

VOCAB, SEQ, PAD = 128, 48, 13
MODES = ("bf16 autocast", "fp16 autocast", "bf16 weights")
RATIO = 1.5


def build(seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, use_cache=False)
    return LlamaForCausalLM(cfg).train()


def autocast_for(mode: str):
    if mode.endswith("autocast"):
        return torch.autocast("cpu", dtype=torch.bfloat16 if mode.startswith("bf16") else torch.float16)
    return torch.autocast("cpu", enabled=False)


def in_mode(model: torch.nn.Module, mode: str) -> torch.nn.Module:
    return model.to(torch.bfloat16) if mode == "bf16 weights" else model


def float64_reference(model, batch):
    """The same model in float64, unpatched, on the whole batch: logits and gradients of the mean next-token loss."""
    model = copy.deepcopy(model).double()
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    target = F.pad(batch["labels"], (0, 1), value=-100)[:, 1:]
    F.cross_entropy(logits.flatten(0, 1), target.flatten(), ignore_index=-100).backward()
    return logits.detach(), {n: p.grad for n, p in model.named_parameters()}


def sdpa_run(model, batch, mode):
    """transformers' sdpa path in ``mode``: the model's own ``labels=`` loss (ForCausalLMLoss, in fp32)."""
    model = in_mode(copy.deepcopy(model), mode)
    with autocast_for(mode):
        out = model(**batch)
    out.loss.backward()
    return out.logits.detach(), {n: p.grad for n, p in model.named_parameters()}, out.logits.dtype


def ring_run(model, batch, mode, sp):
    """ds_ring's path in ``mode``: shard_batch, the patched model, causal_lm_loss; logits gathered over the ring and
    gradient shares summed over it (in float64, so that the sum adds no rounding of its own)."""
    model = ds_ring.patch(in_mode(copy.deepcopy(model), mode), sp=sp)
    local = ds_ring.shard_batch(batch, sp)
    labels = local.pop("shift_labels")
    with autocast_for(mode):
        logits = model(**local).logits
        loss = ds_ring.causal_lm_loss(logits, labels, sp)
    assert loss.dtype == torch.float32, loss.dtype
    loss.backward()
    grads = {}
    for n, p in model.named_parameters():
        assert p.grad.dtype == p.dtype, (n, p.grad.dtype, p.dtype)  # gradients come back in the inputs' dtypes
        grads[n] = p.grad.double()
        if sp.sp_size > 1:
            dist.all_reduce(grads[n], group=sp.group)
    full = gather_sequence(logits.detach(), 1, sp.group, sp.layout)[:, : batch["input_ids"].shape[1]]
    return full, grads, logits.dtype


def errors(got, ref, real: torch.Tensor) -> dict[str, float]:
    """Relative (Frobenius) error of the logits on real tokens and of all parameter gradients together."""
    (logits, grads, _), (ref_logits, ref_grads) = got, ref
    lg = (logits.double()[real] - ref_logits[real]).norm() / ref_logits[real].norm()
    diff = torch.cat([(grads[n].double() - ref_grads[n]).flatten() for n in ref_grads])
    gr = diff.norm() / torch.cat([g.flatten() for g in ref_grads.values()]).norm()
    return {"logits": lg.item(), "grads": gr.item()}


def _precision_worker(rank, world, seed):
    sp = ds_ring.init_sequence_parallel(world, layout="zigzag")
    model = build(seed)
    batch = padded_batches(seed, 1, 2, SEQ, VOCAB, PAD)[0]
    ref = float64_reference(model, batch)
    real = batch["attention_mask"].bool()
    out = {}
    for mode in MODES:
        sdpa, ring = sdpa_run(model, batch, mode), ring_run(model, batch, mode, sp)
        out[mode] = {"sdpa": errors(sdpa, ref, real), "ring": errors(ring, ref, real),
                     "dtypes": (str(sdpa[2]), str(ring[2]))}
    return out


@pytest.fixture(scope="module", params=[1, 2], ids=lambda p: f"P{p}")
def precision(request):
    seed = random.randrange(10**6)
    return seed, run_distributed(_precision_worker, request.param, seed)


@pytest.mark.parametrize("mode", MODES)
def test_error_against_float64_is_sdpas(precision, mode):
    """Logits and parameter gradients, patched (P = 1, 2) and sdpa, in the same mode, against float64."""
    seed, results = precision
    for rank, res in enumerate(results):
        r = res[mode]
        assert r["dtypes"][0] == r["dtypes"][1], r["dtypes"]  # the logits come out in sdpa's dtype
        for what in ("logits", "grads"):
            ring, sdpa = r["ring"][what], r["sdpa"][what]
            assert sdpa > 1e-4, (mode, what, sdpa)  # power: the mode really computes in half precision
            assert ring <= RATIO * sdpa, f"seed {seed} rank {rank} {mode} {what}: ring {ring:.3e} vs sdpa {sdpa:.3e}"


def test_op_follows_autocast_like_sdpa():
    """The op itself (one rank): under autocast q/k/v of mixed dtypes (what RoPE gives) are cast to the autocast
    dtype, the output is in it, and the gradients reach q, k, v in their own dtypes."""
    torch.manual_seed(random.randrange(10**6))
    q, k = torch.randn(2, 4, 24, 16, requires_grad=True), torch.randn(2, 2, 24, 16, requires_grad=True)
    v = torch.randn(2, 2, 24, 16, dtype=torch.bfloat16, requires_grad=True)
    mask = torch.ones(2, 24, dtype=torch.bool)
    mask[1, 17:] = False
    for dtype in (torch.bfloat16, torch.float16):
        with torch.autocast("cpu", dtype=dtype):
            out = ds_ring.ring_dilated_attention(q, k, v, causal=True, key_padding_mask=mask)
            ref = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
                                                 attn_mask=mask[:, None, None, :] & torch.ones(24, 24).tril().bool())
        assert out.dtype == ref.dtype == dtype
        assert (out.float() - ref.float()).abs().max() < 2e-2
        out.float().sum().backward()
        assert (q.grad.dtype, k.grad.dtype, v.grad.dtype) == (torch.float32, torch.float32, torch.bfloat16)
        q.grad = k.grad = v.grad = None
    with pytest.raises(ValueError, match="share a dtype"):  # outside autocast mixed dtypes are refused, as by SDPA
        ds_ring.ring_dilated_attention(q, k, v)


def test_losses_are_fp32_whatever_the_logits_dtype():
    """causal_lm_loss and the chunked loss on half-precision logits (half weights, or autocast): an fp32 loss equal
    to the float64 cross-entropy of the same half-precision logits (a half-precision reduction would be ~1e-3 off)."""
    g = torch.Generator().manual_seed(random.randrange(10**6))
    x32 = torch.randn(2, 40, 16, generator=g)
    y = torch.randint(0, 50, (2, 40), generator=g)
    y[1, 25:] = -100
    for dtype, autocast in ((torch.bfloat16, False), (torch.float16, False), (torch.bfloat16, True)):
        head = torch.nn.Linear(16, 50, bias=False)
        x = x32
        if not autocast:
            head, x = head.to(dtype), x32.to(dtype)
        with torch.autocast("cpu", dtype=dtype, enabled=autocast):
            logits = head(x)
            full = ds_ring.causal_lm_loss(logits, y, None)
            chunked = ds_ring.chunked_causal_lm_loss(x, head, y, None, chunk_tokens=7)
        assert logits.dtype == dtype and full.dtype == chunked.dtype == torch.float32
        ref = F.cross_entropy(logits.double().flatten(0, 1), y.flatten(), ignore_index=-100)
        for loss in (full, chunked):
            assert abs(loss.double() - ref) / ref < 1e-6, (dtype, autocast, loss.item(), ref.item())


# ---- fp16 training with a GradScaler tracks the fp32 run -------------------------------------------------------

STEPS, LR = 4, 0.5


def _train(model, batches, sp, fp16: bool) -> tuple[list[float], float]:
    """SGD steps of the mean next-token loss, as Trainer(fp16=True) runs them on a GPU: autocast fp16 around the
    forward and the loss, the loss scaled for backward, gradients unscaled (and the step skipped on inf/NaN) by the
    GradScaler. Gradient shares are summed over the ring before the scaler looks at them, so every rank makes the
    same skip decision. Returns the losses and the final loss scale."""
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, enabled=fp16)
    losses = []
    for batch in batches:
        local = ds_ring.shard_batch(batch, sp)
        labels = local.pop("shift_labels")
        with torch.autocast("cpu", dtype=torch.float16, enabled=fp16):
            loss = ds_ring.causal_lm_loss(model(**local).logits, labels, sp)
        scaler.scale(loss).backward()
        if sp.sp_size > 1:
            for p in model.parameters():
                dist.all_reduce(p.grad, group=sp.group)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        losses.append(loss.item())
    return losses, scaler.get_scale() if fp16 else 1.0


def _fp16_worker(rank, world, seed):
    sp = ds_ring.init_sequence_parallel(world, layout="zigzag")
    batches = padded_batches(seed, 1, 2, SEQ, VOCAB, PAD) * STEPS  # one batch, fitted: the loss must fall
    fp32 = _train(ds_ring.patch(build(seed), sp=sp), batches, sp, fp16=False)
    fp16 = _train(ds_ring.patch(build(seed), sp=sp), batches, sp, fp16=True)
    return fp32, fp16


def test_fp16_with_grad_scaler_tracks_fp32():
    from ds_ring.parallel.groups import SequenceParallel

    seed = random.randrange(10**6)
    (fp32, _), (fp16, scale) = run_distributed(_fp16_worker, 2, seed)[0]
    one = SequenceParallel(None, None, 1, 0, 1, 0, "zigzag")  # transformers' sdpa in this process: its fp16 drift
    sdpa16, _ = _train(build(seed), padded_batches(seed, 1, 2, SEQ, VOCAB, PAD) * STEPS, one, fp16=True)
    assert scale > 1.0  # the scaler was in the loop (a loss scale of 1 would not test it)
    ours = max(abs(a - b) / b for a, b in zip(fp16, fp32))
    theirs = max(abs(a - b) / b for a, b in zip(sdpa16, fp32))
    assert fp32[-1] < fp32[0]  # it trains
    assert ours < 1e-2 and ours <= max(RATIO * theirs, 1e-3), (seed, fp32, fp16, sdpa16)


# ---- the Trainer in each precision: SP=2 tracks the plain Trainer's fp32 run -----------------------------------

# name: (ZeRO config or None for DDP, TrainingArguments precision). DDP runs first: a DeepSpeed Trainer leaves
# accelerate's process-wide DeepSpeed switch on, and a later Trainer in the same process would run under DeepSpeed.
TRAINER_MODES = {
    "bf16 autocast / DDP": (None, {"bf16": True}),
    "fp16 autocast + GradScaler / DDP": (None, {"fp16": True}),
    "bf16 weights / ZeRO-1": ({"stage": 1}, {"bf16": True}),  # DeepSpeed bf16: the weights, no autocast
    "bf16 weights / ZeRO-2": ({"stage": 2}, {"bf16": True}),
    "bf16 weights / ZeRO-3": ({"stage": 3}, {"bf16": True}),
}


def _trainer_worker(rank, world, root, seed, rows):
    from test_trainer import build_model, logged_losses, training_args

    from ds_ring import SequenceParallelTrainer

    out = {}
    for name, (zero, precision) in TRAINER_MODES.items():
        trainer = SequenceParallelTrainer(
            model=build_model(seed), args=training_args(f"{root}/{name}", seed, zero=zero, **precision),
            train_dataset=rows, sp_size=2)
        acc = trainer.accelerator
        if precision.get("fp16"):
            # On a CPU-only machine accelerate leaves fp16 off (no autocast, no GradScaler: native_amp is False for
            # fp16 on CPU); turn on what it turns on on a GPU, so that the Trainer's own fp16 path runs: autocast in
            # compute_loss, accelerator.backward scaling the loss, the prepared optimizer unscaling and stepping.
            assert not acc.native_amp and acc.scaler is None
            acc.native_amp, acc.scaler = True, torch.amp.GradScaler("cpu", init_scale=2.0**12)
        trainer.train()
        if precision.get("fp16"):
            assert acc.scaler._scale is not None and acc.scaler.get_scale() > 1.0  # the loss was scaled
        dtypes = {str(p.dtype) for p in trainer.model_wrapped.parameters()}
        out[name] = {"losses": logged_losses(trainer), "dtypes": dtypes, "autocast": trainer.accelerator.native_amp,
                     "deepspeed": trainer.is_deepspeed_enabled}
    return out


def test_trainer_precisions_track_fp32(tmp_path):
    """SequenceParallelTrainer at SP=2 with bf16=True under DDP (autocast) and ZeRO-1/2/3 (DeepSpeed's bf16 weights):
    and with fp16=True (autocast and accelerate's GradScaler, switched on as on a GPU: see the worker): every logged
    loss within 2% of the plain Trainer's fp32 run (one process)."""
    from test_trainer import make_rows, plain_trainer_run

    seed = random.randrange(10**6)
    rows = make_rows(seed, 12)
    fp32 = plain_trainer_run(seed, rows, rows[:2], str(tmp_path / "fp32"), 2, sequential=False)[0]
    outs = run_distributed(_trainer_worker, 2, str(tmp_path), seed, rows, timeout_s=600)
    for rank, out in enumerate(outs):
        for name in ("bf16 autocast / DDP", "fp16 autocast + GradScaler / DDP"):
            assert out[name]["autocast"] and not out[name]["deepspeed"] and out[name]["dtypes"] == {"torch.float32"}, \
                (name, out[name])
        for name in ("bf16 weights / ZeRO-1", "bf16 weights / ZeRO-2", "bf16 weights / ZeRO-3"):
            assert "torch.bfloat16" in out[name]["dtypes"], (name, out[name]["dtypes"])
        for name, r in out.items():
            assert r["losses"] == pytest.approx(fp32, rel=2e-2), (seed, rank, name, r["losses"], fp32)
