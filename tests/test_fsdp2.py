"""``ds_ring.fully_shard`` (torch FSDP2 with the ring's gradient rule) on real gloo ranks against one process.

SP=2 (one spawn: plain, the memory switch, bf16 MixedPrecisionPolicy, CPU offload, checkpoint and resume) and
SP=2 x DP=2 (one spawn), a tiny Llama, padded rows, SGD with momentum, 3 steps; the reference is one process training
the same model on the full sequences (with DP: the mean of the rings' mean losses). FSDP2 without the rule divides
every ring's gradient by sp_size (test_without_the_rule_the_update_is_off shows the tests can see that).
"""

from __future__ import annotations

import os

import pytest
import torch
from batches import padded_batches
from dist_utils import run_distributed
from transformers import LlamaConfig, LlamaForCausalLM

VOCAB, SEQ, BATCH, LR, MOMENTUM = 64, 32, 2, 0.2, 0.9
STEPS, SAVE_AT = 3, 2  # exactness after STEPS; the checkpoint case saves after SAVE_AT and runs to SAVE_AT + 2
CASES = ("plain", "memory", "bf16", "offload", "no_rule")


def build_model(seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, use_cache=False)
    return LlamaForCausalLM(cfg).float()


def reference(batches_per_ring, seed: int, steps: int):
    """One process, full sequences: the parameters after ``steps`` SGD steps on the mean of the rings' losses."""
    model = build_model(seed)
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    for step_batches in list(zip(*batches_per_ring))[:steps]:
        losses = [model(**b).loss for b in step_batches]  # HF shifts labels and averages over valid targets
        (sum(losses) / len(losses)).backward()
        opt.step()
        opt.zero_grad()
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _full_params(model) -> dict[str, torch.Tensor]:
    return {n: p.full_tensor().detach().float().clone() for n, p in model.named_parameters()}


def _train(sp, case: str, batches, seed: int, *, steps: int, model=None, save_dir=None, resume_dir=None):
    """Steps of SGD on ``ds_ring.fully_shard``; returns (losses, full parameters, per-parameter (local, full) numel)."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy

    import ds_ring
    from ds_ring.integrations import fsdp2

    model = ds_ring.patch(model if model is not None else build_model(seed), sp=sp)
    if case == "memory":
        ds_ring.optimize_memory(model, sp)
    kwargs = {}
    if case == "bf16":
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    if case == "offload":
        kwargs["offload_policy"] = CPUOffloadPolicy(pin_memory=False)
    if case == "no_rule":  # torch's fully_shard as a user would call it: the average over the mesh
        for layer in fsdp2.decoder_layers(model):
            torch.distributed.fsdp.fully_shard(layer)
        torch.distributed.fsdp.fully_shard(model)
    else:
        ds_ring.fully_shard(model, sp, **kwargs)
    numels = {n: (p.to_local().numel(), p.numel()) for n, p in model.named_parameters()}
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    start = 0
    if resume_dir is not None:  # the optimizer state (momentum) from the distributed checkpoint
        osd = get_optimizer_state_dict(model, opt)
        dcp.load({"optim": osd}, checkpoint_id=f"{resume_dir}/dcp")
        set_optimizer_state_dict(model, opt, osd)
        start = SAVE_AT
    losses = []
    for i in range(start, steps):
        local = ds_ring.shard_batch(batches[i], sp)
        labels = local.pop("shift_labels")
        if case == "memory":  # the chunked loss: no logits
            loss = model(**local, shift_labels=labels).loss
        else:
            loss = ds_ring.causal_lm_loss(model(**local).logits, labels, sp)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
        if save_dir is not None and i + 1 == SAVE_AT:
            full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
            if dist.get_rank() == 0:
                model.save_pretrained(f"{save_dir}/hf", state_dict=full)
            dcp.save({"optim": get_optimizer_state_dict(model, opt)}, checkpoint_id=f"{save_dir}/dcp")
            dist.barrier()
            saved = _full_params(model)
    out = {"losses": losses, "params": _full_params(model), "numels": numels}
    if save_dir is not None:
        out["saved"] = saved
    return out


def _worker(rank, world, batches_per_ring, seed, ckpt_dir, cases):
    from transformers import AutoModelForCausalLM

    import ds_ring

    sp = ds_ring.init_sequence_parallel(2, layout="zigzag")
    batches = batches_per_ring[sp.dp_rank]
    out = {}
    for case in cases:
        if case == "plain" and ckpt_dir is not None:  # runs on to SAVE_AT + 2, saving after SAVE_AT
            out[case] = _train(sp, case, batches, seed, steps=SAVE_AT + 2, save_dir=ckpt_dir)
        else:
            out[case] = _train(sp, case, batches, seed, steps=STEPS)
    if ckpt_dir is not None:  # resume: plain from_pretrained weights, the optimizer from the distributed checkpoint
        reloaded = AutoModelForCausalLM.from_pretrained(f"{ckpt_dir}/hf")
        out["reloaded"] = {n: p.detach().clone() for n, p in reloaded.named_parameters()}
        out["resume"] = _train(sp, "plain", batches, seed, steps=SAVE_AT + 2, model=reloaded, resume_dir=ckpt_dir)
    return out if rank == 0 else {k: v["losses"] for k, v in out.items() if isinstance(v, dict) and "losses" in v}


def _off(params: dict, ref: dict, start: dict) -> float:
    """Worst, over parameters, of |params - ref| / |ref - start|: the error as a fraction of the update."""
    return max(((params[n] - ref[n]).norm() / (ref[n] - start[n]).norm()).item() for n in ref)


@pytest.fixture(scope="module")
def sp2(tmp_path_factory):
    seed = int(torch.randint(0, 10**6, ()).item())  # fresh inputs and weights every run
    batches = padded_batches(seed, SAVE_AT + 2, BATCH, SEQ, VOCAB, pad=11)
    start = {n: p.detach().clone() for n, p in build_model(seed).named_parameters()}
    ref = reference([batches], seed, STEPS)
    ref_end = reference([batches], seed, SAVE_AT + 2)
    outs = run_distributed(_worker, 2, [batches], seed, str(tmp_path_factory.mktemp("fsdp2")), CASES, timeout_s=400)
    return start, ref, ref_end, outs


@pytest.fixture(scope="module")
def dp2(sp2):
    seed = int(torch.randint(0, 10**6, ()).item())
    per_ring = [padded_batches(seed + r, STEPS, BATCH, SEQ, VOCAB, pad=11) for r in range(2)]
    start = {n: p.detach().clone() for n, p in build_model(seed).named_parameters()}
    return start, reference(per_ring, seed, STEPS), run_distributed(_worker, 4, per_ring, seed, None, ("plain",),
                                                                     timeout_s=400)


@pytest.mark.parametrize("case", ["plain", "memory", "offload"])
def test_sp2_matches_one_process_sgd(sp2, case):
    start, ref, ref_end, outs = sp2
    params = outs[0][case]["params"]
    if case == "plain":  # it ran on past STEPS (the checkpoint case): compare its end with the reference's
        ref = ref_end
    assert _off(params, ref, start) < 1e-3
    assert outs[0][case]["losses"] == outs[1][case], "the ranks of a ring must report the same loss"


def test_sp2_bf16_mixed_precision(sp2):
    """bf16 parameters and activations, fp32 gradient reduction: bf16 noise, far below the 1 / sp_size error."""
    start, ref, _, outs = sp2
    assert _off(outs[0]["bf16"]["params"], ref, start) < 0.05


def test_without_the_rule_the_update_is_off(sp2):
    """torch's fully_shard alone averages over the ring: the tests above would see it."""
    start, ref, _, outs = sp2
    assert _off(outs[0]["no_rule"]["params"], ref, start) > 0.2


def test_parameters_are_sharded(sp2):
    numels = sp2[3][0]["plain"]["numels"].values()
    assert all(local <= -(-full // 2) for local, full in numels)  # a rank holds at most its half (rounded up)
    assert sum(local for local, _ in numels) < 0.6 * sum(full for _, full in numels)


def test_dp2_x_sp2_matches_one_process_sgd(dp2):
    """4 ranks, 2 rings of 2: the sum over each ring, the mean over the rings."""
    start, ref, outs = dp2
    assert _off(outs[0]["plain"]["params"], ref, start) < 1e-3
    for local, full in outs[0]["plain"]["numels"].values():
        assert local <= -(-full // 4)
    assert outs[0]["plain"]["losses"] == outs[1]["plain"] and outs[2]["plain"] == outs[3]["plain"]
    assert outs[0]["plain"]["losses"] != outs[2]["plain"], "the rings must see different batches"


def test_full_state_dict_loads_with_plain_from_pretrained(sp2):
    out = sp2[3][0]
    for n, p in out["plain"]["saved"].items():
        torch.testing.assert_close(out["reloaded"][n], p, rtol=0, atol=0)


def test_resume_reproduces_steps_3_and_4(sp2):
    start, _, ref_end, outs = sp2
    plain, resumed = outs[0]["plain"], outs[0]["resume"]
    assert resumed["losses"] == pytest.approx(plain["losses"][SAVE_AT:], rel=1e-6, abs=1e-6)
    assert _off(resumed["params"], plain["params"], start) < 1e-5
    assert _off(resumed["params"], ref_end, start) < 1e-3


def test_one_rule_for_every_engine():
    """The factors each engine gets from ds_ring.parallel.gradients, for the reductions measured on DeepSpeed 0.19
    (ZeRO-1/2 with the mpu: sum over the ring, mean over rings; ZeRO-3: mean over every rank) and FSDP2/DDP."""
    from ds_ring.integrations.deepspeed import gradient_factor
    from ds_ring.parallel.gradients import gradient_divisor, loss_factor
    from ds_ring.parallel.groups import SequenceParallel

    for sp_size, dp_size in ((2, 1), (2, 2), (4, 3), (1, 4)):
        sp = SequenceParallel(None, None, sp_size, 0, dp_size, 0)
        assert gradient_divisor(sp) == dp_size
        assert gradient_factor({"zero_optimization": {"stage": 3}}, sp) == sp_size
        for stage in (0, 1, 2):
            assert gradient_factor({"zero_optimization": {"stage": stage}}, sp) == 1.0
        assert loss_factor(sp, sp.world_size) == sp_size
    with pytest.raises(ValueError, match="averaged_over=5"):
        loss_factor(SequenceParallel(None, None, 2, 0, 2, 0), 5)


# ----- the Trainer under FSDP ---------------------------------------------------------------------------------------


def _trainer_worker(rank, world, root):
    """What SequenceParallelTrainer says on CPU ranks configured for FSDP2 and FSDP1 (accelerate: MULTI_CPU)."""
    from transformers import TrainingArguments

    from ds_ring import SequenceParallelTrainer

    rows = padded_batches(0, 1, 2, SEQ, VOCAB, pad=3)
    rows = [{k: v[i] for k, v in rows[0].items()} for i in range(2)]
    import ds_ring

    out = {}
    sp = ds_ring.init_sequence_parallel(2)
    sharded = ds_ring.fully_shard(ds_ring.patch(build_model(0), sp=sp), sp)
    for name, model in (("unpatched", build_model(0)), ("twice", sharded)):
        try:
            ds_ring.fully_shard(model, sp)
            out[name] = "accepted"
        except ValueError as e:
            out[name] = str(e)
    args = TrainingArguments(output_dir=f"{root}/sharded", use_cpu=True, report_to=[])
    try:
        SequenceParallelTrainer(model=sharded, args=args, train_dataset=rows, sp=sp)
        out["sharded"] = "accepted"
    except Exception as e:  # noqa: BLE001
        out["sharded"] = f"{type(e).__name__}: {e}"
    for version, extra in ((2, {}), (1, {"sync_module_states": False}), ("launch", None)):
        if version == "launch":  # what `accelerate launch --config_file integrations/accelerate/fsdp2.yaml` sets
            os.environ.update(ACCELERATE_USE_FSDP="true", FSDP_VERSION="2")
            args = TrainingArguments(output_dir=f"{root}/launch", use_cpu=True, report_to=[])
        else:
            args = TrainingArguments(output_dir=f"{root}/v{version}", use_cpu=True, fsdp=True, report_to=[],
                                     fsdp_config={"version": version, **extra})
        try:
            SequenceParallelTrainer(model=build_model(0), args=args, train_dataset=rows, sp_size=2)
            out[version] = "accepted"
        except Exception as e:  # noqa: BLE001 (the test reads the type and message)
            out[version] = f"{type(e).__name__}: {e}"
    return out


def test_trainer_refuses_fsdp_it_cannot_apply(tmp_path):
    """On CPU accelerate would train an FSDP2 configuration as plain DDP: refused, naming the reason, on every rank;
    FSDP1 is refused for its gradient averaging (where accelerate builds its plugin at all); so is a model sharded
    before the trainer (the Trainer would skip accelerate's wrapping, and with it the gradient rule). ds_ring.fully_shard
    refuses an unpatched model (the rule would count each rank's whole-sequence gradient) and a sharded one."""
    for out in run_distributed(_trainer_worker, 2, str(tmp_path), timeout_s=300):
        assert out[2].startswith("RuntimeError: SequenceParallelTrainer: FSDP is configured but accelerate does not "
                                 "apply it on this machine (distributed type MULTI_CPU"), out[2]
        assert out[1].startswith("ValueError: SequenceParallelTrainer: FSDP version 1 is not supported"), out[1]
        assert out["launch"] == out[2]
        assert out["unpatched"].startswith("ds_ring.fully_shard: the model is not patched for this sp")
        assert out["twice"].startswith("ds_ring.fully_shard: the model is already an FSDP2 module")
        assert out["sharded"].startswith("ValueError: SequenceParallelTrainer: the model is already sharded with "
                                         "FSDP2"), out["sharded"]
