"""DeepSpeed ZeRO 1/2/3/3+offload under SP=2 (and ZeRO-2/3 under DP=2 x SP=2) against one process training the
same tiny Llama on full sequences.

One spawn of 2 real gloo ranks runs every stage (DeepSpeed import and startup cost seconds). Each case compares the
reduced gradients after the first step (gradient_clipping off), DeepSpeed's global gradient norm, and the losses of a
few AdamW steps. The checkpoint case saves after 2 steps, rebuilds a differently initialised engine, loads, and must
reproduce the uninterrupted run's later losses.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from batches import padded_batches
from dist_utils import run_distributed

pytestmark = pytest.mark.hf  # DeepSpeed ZeRO: also run on the declared dependency floors (.ci/floors)

VOCAB, SEQ, BATCH, STEPS, LR = 64, 32, 2, 3, 1e-2
CASES = {  # name: (zero_optimization, layout)
    "zero1": ({"stage": 1}, "contiguous"),
    "zero2": ({"stage": 2}, "zigzag"),
    "zero3": ({"stage": 3}, "contiguous"),
    "zero3_offload": (
        {"stage": 3, "offload_optimizer": {"device": "cpu"}, "offload_param": {"device": "cpu"}}, "zigzag"),
}


def build_model(seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, use_cache=False)
    return LlamaForCausalLM(cfg).float()


def make_batches(seed: int, n: int) -> list[dict[str, torch.Tensor]]:
    return padded_batches(seed, n, BATCH, SEQ, VOCAB, pad=11)


def reference(batches_per_ring, seed: int):
    """One process, full sequences, eager attention: first-step gradients and each ring's per-step losses.

    With several data-parallel rings the objective is the mean of the rings' losses (what data parallelism averages).
    """
    model = build_model(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    losses, grads = [], None
    for i, step_batches in enumerate(zip(*batches_per_ring)):
        ring_losses = [model(**b).loss for b in step_batches]  # HF shifts labels and averages over valid targets
        (sum(ring_losses) / len(ring_losses)).backward()
        if i == 0:
            grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        opt.step()
        opt.zero_grad()
        losses.append([x.item() for x in ring_losses])
    return grads, losses


def ds_config(zero: dict) -> dict:
    return {"train_micro_batch_size_per_gpu": BATCH, "gradient_accumulation_steps": 1, "gradient_clipping": 0.0,
            "zero_optimization": zero, "zero_force_ds_cpu_optimizer": False, "steps_per_print": 10**9}


def _train(sp, zero, batches, seed, *, grads_at=None, ckpt=None):
    """Run the batches through a fresh engine; returns losses, first-step grads/norm. ``ckpt=(dir, 'save'|'load', k)``:
    save after step k, or load before running (then only batches[k:] are run)."""
    from deepspeed.utils import safe_get_full_grad

    from ds_ring.training.data import shard_batch
    from ds_ring.integrations.deepspeed import initialize
    from ds_ring.training.loss import causal_lm_loss
    from ds_ring.integrations.transformers import patch

    model = patch(build_model(seed), sp=sp)
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    engine, *_ = initialize(model, sp, ds_config(zero), optimizer=opt)
    start = 0
    if ckpt and ckpt[1] == "load":
        engine.load_checkpoint(ckpt[0])
        start = ckpt[2]
    losses, grads, norm = [], None, None
    for i in range(start, len(batches)):
        local = shard_batch(batches[i], sp)
        labels = local.pop("shift_labels")
        loss = causal_lm_loss(engine(**local).logits, labels, sp)
        engine.backward(loss)
        if i == 0 and grads_at is not None:
            grads = {n: safe_get_full_grad(p).detach().clone().numpy() for n, p in engine.module.named_parameters()}
        engine.step()
        if i == 0:
            norm = float(engine.get_global_grad_norm())
        losses.append(loss.item())
        if ckpt and ckpt[1] == "save" and i + 1 == ckpt[2]:
            engine.save_checkpoint(ckpt[0])
            break
    engine.destroy()
    return losses, grads, norm


def _worker(rank, world, batches, seed, ckpt_dir):
    import ds_ring

    sp0 = ds_ring.init_sequence_parallel(world)
    out = {}
    for name, (zero, layout) in CASES.items():
        sp = dataclasses.replace(sp0, layout=layout)
        losses, grads, norm = _train(sp, zero, batches, seed, grads_at=0)
        out[name] = (losses, grads if rank == 0 else None, norm)
    sp = sp0
    zero = CASES["zero3"][0]
    first, _, _ = _train(sp, zero, batches, seed, ckpt=(ckpt_dir, "save", 2))
    resumed, _, _ = _train(sp, zero, batches, seed + 1, ckpt=(ckpt_dir, "load", 2))
    out["resume"] = (first, resumed)
    return out


def _worker_dp(rank, world, batches_per_ring, seed):
    """DP=2 x SP=2: ring r trains on batches_per_ring[r]."""
    import ds_ring

    sp = ds_ring.init_sequence_parallel(2)
    out = {}
    for name in ("zero2", "zero3"):
        zero, layout = CASES[name]
        losses, grads, norm = _train(dataclasses.replace(sp, layout=layout), zero, batches_per_ring[sp.dp_rank], seed,
                                     grads_at=0)
        out[name] = (losses, grads if rank == 0 else None, norm)
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    seed = int(torch.randint(0, 10**6, ()).item())  # fresh inputs and weights every run
    batches = make_batches(seed, STEPS + 1)
    grads, losses = reference([batches], seed)
    dist_out = run_distributed(_worker, 2, batches, seed, str(tmp_path_factory.mktemp("ckpt")), timeout_s=400)
    return (grads, [l[0] for l in losses]), dist_out


@pytest.fixture(scope="module")
def runs_dp(runs):
    seed = int(torch.randint(0, 10**6, ()).item())
    per_ring = [make_batches(seed, 2), make_batches(seed + 1, 2)]
    return reference(per_ring, seed), run_distributed(_worker_dp, 4, per_ring, seed, timeout_s=400)


@pytest.mark.parametrize("case", list(CASES))
def test_zero_stage_matches_single_process(runs, case):
    (ref_grads, ref_losses), outs = runs
    losses, grads, norm = outs[0][case]
    assert outs[1][case][0] == losses, "ranks of one ring must report the same loss"
    worst = max(((torch.from_numpy(grads[n]) - g).norm() / g.norm()).item() for n, g in ref_grads.items())
    assert worst < 1e-4, f"{case}: worst relative gradient error {worst:.2e}"
    ref_norm = math.sqrt(sum((g.double() ** 2).sum().item() for g in ref_grads.values()))
    assert norm == pytest.approx(ref_norm, rel=1e-4), f"{case}: DeepSpeed grad norm {norm} vs {ref_norm}"
    assert losses == pytest.approx(ref_losses, rel=1e-4, abs=1e-5)


@pytest.mark.parametrize("case", ["zero2", "zero3"])
def test_dp2_x_sp2_matches_single_process(runs_dp, case):
    """4 ranks, 2 rings of 2: gradients are summed over each ring and averaged over the rings, like one process
    averaging the two rings' losses."""
    (ref_grads, ref_losses), outs = runs_dp
    _, grads, norm = outs[0][case]
    worst = max(((torch.from_numpy(grads[n]) - g).norm() / g.norm()).item() for n, g in ref_grads.items())
    assert worst < 1e-4, f"{case}: worst relative gradient error {worst:.2e}"
    ref_norm = math.sqrt(sum((g.double() ** 2).sum().item() for g in ref_grads.values()))
    assert norm == pytest.approx(ref_norm, rel=1e-4)
    for rank, ring in ((0, 0), (1, 0), (2, 1), (3, 1)):
        assert outs[rank][case][0] == pytest.approx([l[ring] for l in ref_losses], rel=1e-4, abs=1e-5)


def test_checkpoint_resume_is_exact(runs):
    (_, ref_losses), outs = runs
    full = outs[0]["zero3"][0]
    first, resumed = outs[0]["resume"]
    assert first == full[:2]
    assert resumed == pytest.approx(full[2:], rel=1e-6, abs=1e-6), (resumed, full)
