"""ds_ring.SequenceParallelTrainer on real gloo ranks against the plain transformers.Trainer in one process.

Same tiny Llama, same rows (right- and left-padded ones among them), same seed, SGD with a constant learning rate
and no clipping (a wrong gradient scale shows in the next loss), gradient accumulation 2. One spawn per world size
runs every backend (no DeepSpeed: DDP; ZeRO-2; ZeRO-3):

- SP=2 on 2 ranks: one ring = one data-parallel rank, shuffled data (the ring must draw the plain Trainer's order,
  across an epoch boundary); a ZeRO-3 and a DDP run stopped after 2 steps and resumed from their checkpoints;
- SP=2 x DP=2 on 4 ranks (contiguous layout): the plain Trainer over 2 data-parallel ranks equals one process with
  twice the batch when the sampler is sequential; DDP, ZeRO-2, and ZeRO-3 with the memory switch (``memory=``).
Compared: the logged loss of every step, the eval loss, and the final parameters as written by save_model (loaded
with from_pretrained), all to 1e-4 relative. Misuse is refused before training.
"""

from __future__ import annotations

import random

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from dist_utils import run_distributed

pytestmark = pytest.mark.hf  # the Trainer: also run on the declared dependency floors (.ci/floors)

VOCAB, SEQ, BATCH, LR = 64, 32, 2, 1.0
TRAIN_ROWS, EVAL_ROWS, STEPS, CKPT_STEP = 12, 8, 4, 2
ZERO = {
    "ddp": None,
    "zero2": {"stage": 2},
    "zero3": {"stage": 3, "stage3_gather_16bit_weights_on_model_save": True},
}
RESUMED = ("ddp", "zero3")
# SP=2 x DP=2: DDP, ZeRO-2, and ZeRO-3 with the memory switch (chunked loss over a partitioned LM head, tiled MLP with
# 4 tiles per shard agreed over the ZeRO group, checkpointing): the objective must not move (plain ZeRO-3 at this
# grid: tests/test_deepspeed_exactness.py)
MEMORY = {"checkpointing": True, "chunked_loss": True, "tiled_mlp": True, "mlp_chunk_tokens": 4, "loss_chunk_tokens": 5}
DP2_RUNS = {"ddp": (None, None), "zero2": (ZERO["zero2"], None), "zero3 memory": (ZERO["zero3"], MEMORY)}
SP2_RUNS = {name: (zero, None) for name, zero in ZERO.items()}


def build_model(seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return LlamaForCausalLM(cfg)


def make_rows(seed: int, n: int) -> list[dict[str, torch.Tensor]]:
    """Fresh random rows of SEQ tokens; every third row right-padded, every third left-padded (mask 0, label -100),
    so shards and rows hold unequal numbers of targets."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        ids = torch.randint(1, VOCAB, (SEQ,), generator=g)
        mask = torch.ones(SEQ, dtype=torch.long)
        pad = int(torch.randint(1, SEQ // 2, (), generator=g))
        if i % 3 == 1:
            mask[SEQ - pad:] = 0
        elif i % 3 == 2:
            mask[:pad] = 0
        rows.append({"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)})
    return rows


def training_args(out: str, seed: int, *, zero: dict | None = None, batch: int = BATCH, sequential: bool = False,
                  save: bool = False, **kw):
    """Shuffled data (unless ``sequential``) with accelerate's non-seedable sampler: it seeds itself from the global
    RNG, so the ranks of a ring draw the same order only if the trainer hands them the same RNG state."""
    from transformers import TrainingArguments

    ds = None if zero is None else {
        "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
        "zero_optimization": zero, "zero_force_ds_cpu_optimizer": False, "steps_per_print": 10**9}
    return TrainingArguments(
        output_dir=out, per_device_train_batch_size=batch, per_device_eval_batch_size=batch,
        gradient_accumulation_steps=2, max_steps=STEPS, optim="sgd", learning_rate=LR, lr_scheduler_type="constant",
        max_grad_norm=0.0, weight_decay=0.0, logging_steps=1, seed=seed, report_to=[], disable_tqdm=True,
        use_cpu=True, deepspeed=ds, train_sampling_strategy="sequential" if sequential else "random",
        save_strategy="steps" if save else "no", save_steps=CKPT_STEP, include_num_input_tokens_seen="non_padding",
        accelerator_config={"use_seedable_sampler": False}, **kw)


def logged_losses(trainer, after: int = 0) -> list[float]:
    return [h["loss"] for h in trainer.state.log_history if "loss" in h and h["step"] > after]


def plain_trainer_run(seed: int, train, evald, out: str, batch: int, sequential: bool):
    """The reference: transformers.Trainer, one process, unpatched model (sdpa)."""
    from transformers import Trainer

    trainer = Trainer(model=build_model(seed), args=training_args(out, seed, batch=batch, sequential=sequential),
                      train_dataset=train, eval_dataset=evald)
    trainer.train()
    params = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    return logged_losses(trainer), trainer.evaluate()["eval_loss"], params, trainer.state.num_input_tokens_seen


def _sp_runs(rank, root, seed, train, evald, sp_size, layout, sequential, runs, resumed):
    import torch.distributed as dist

    from ds_ring import SequenceParallelTrainer

    out = {}
    for name, (zero, memory) in runs.items():
        path = f"{root}/{name}"
        trainer = SequenceParallelTrainer(
            model=build_model(seed), args=training_args(path, seed, zero=zero, sequential=sequential,
                                                        save=name in resumed),
            train_dataset=train, eval_dataset=evald, sp_size=sp_size, layout=layout, memory=memory)
        if memory:
            assert trainer.model.forward.__func__.__name__ == "_chunked_loss_forward"
        if rank % sp_size:  # ranks of a ring whose RNG drifted apart (user code, a callback) still see the same data
            torch.rand(7)
        trainer.train()
        out[name] = {"losses": logged_losses(trainer), "eval_loss": trainer.evaluate()["eval_loss"],
                     "tokens": trainer.state.num_input_tokens_seen}
        trainer.save_model(f"{path}/final")
        del trainer
        if name in resumed:  # a fresh trainer (other initial weights) resumes from the step-2 checkpoint
            trainer = SequenceParallelTrainer(
                model=build_model(seed + 1), args=training_args(path, seed, zero=zero, sequential=sequential),
                train_dataset=train, eval_dataset=evald, sp_size=sp_size, layout=layout)
            trainer.train(resume_from_checkpoint=f"{path}/checkpoint-{CKPT_STEP}")
            out[name]["resumed"] = logged_losses(trainer, after=CKPT_STEP)
            del trainer
        dist.barrier()
    return out


def _refused(make) -> str:
    try:
        make()
    except (ValueError, RuntimeError, NotImplementedError) as e:
        return f"{type(e).__name__}: {e}"
    return "accepted"


def _worker_sp2(rank, world, root, seed, train, evald):
    from ds_ring import SequenceParallelTrainer

    def trainer(**kw):
        args = kw.pop("args", None) or training_args(f"{root}/refused", seed)
        return SequenceParallelTrainer(model=build_model(seed), args=args, train_dataset=train, **kw)

    refused = {
        "sp_size=3": _refused(lambda: trainer(sp_size=3)),
        "parallelism_config": _refused(lambda: trainer(sp_size=2, args=training_args(
            f"{root}/refused", seed, zero=ZERO["zero2"], parallelism_config=_accelerate_sp(2)))),
    }
    return refused, _sp_runs(rank, root, seed, train, evald, 2, "zigzag", False, SP2_RUNS, RESUMED)


def _worker_dp2(rank, world, root, seed, train, evald):
    from ds_ring import SequenceParallelTrainer

    refused = _refused(lambda: SequenceParallelTrainer(
        model=build_model(seed), args=training_args(f"{root}/refused", seed), train_dataset=train, sp_size=3))
    return refused, _sp_runs(rank, root, seed, train, evald, 2, "contiguous", True, DP2_RUNS, ())


def _accelerate_sp(size: int):
    from accelerate import ParallelismConfig

    return ParallelismConfig(sp_size=size, sp_backend="deepspeed", dp_shard_size=1)


def load_saved(path: str) -> dict[str, torch.Tensor]:
    """A saved model through plain from_pretrained: it must not ask for ds_ring's attention."""
    model = LlamaForCausalLM.from_pretrained(path)
    assert model.config._attn_implementation != "ring_dilated"
    return {n: p.detach() for n, p in model.named_parameters()}


def worst_relative(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(((a[n] - b[n]).norm() / b[n].norm()).item() for n in b)


@pytest.fixture(scope="module")
def sp2(tmp_path_factory):
    seed = random.randrange(10**6)  # fresh weights and data every run
    train, evald = make_rows(seed, TRAIN_ROWS), make_rows(seed + 1, EVAL_ROWS)
    ref = plain_trainer_run(seed, train, evald, str(tmp_path_factory.mktemp("ref")), BATCH, sequential=False)
    root = str(tmp_path_factory.mktemp("sp2"))
    return ref, root, run_distributed(_worker_sp2, 2, root, seed, train, evald, timeout_s=600)


@pytest.fixture(scope="module")
def dp2(tmp_path_factory):
    seed = random.randrange(10**6)
    train, evald = make_rows(seed, TRAIN_ROWS), make_rows(seed + 1, EVAL_ROWS)
    # 2 rings of batch 2 with a sequential sampler == one process with batch 4
    ref = plain_trainer_run(seed, train, evald, str(tmp_path_factory.mktemp("ref")), 2 * BATCH, sequential=True)
    root = str(tmp_path_factory.mktemp("dp2"))
    return ref, root, run_distributed(_worker_dp2, 4, root, seed, train, evald, timeout_s=600)


def check_against_plain(ref, root, outs, name):
    ref_losses, ref_eval, ref_params, ref_tokens = ref
    run = outs[0][1][name]
    assert len(ref_losses) == STEPS
    for rank, (_, other) in enumerate(outs):
        # every rank logs the same global numbers (the ring's loss, averaged over the rings)
        assert other[name]["losses"] == run["losses"] and other[name]["eval_loss"] == run["eval_loss"], rank
    assert run["losses"] == pytest.approx(ref_losses, rel=1e-4), name
    assert run["eval_loss"] == pytest.approx(ref_eval, rel=1e-4), name
    assert run["tokens"] == ref_tokens, "tokens seen must count each ring's batch once"
    worst = worst_relative(load_saved(f"{root}/{name}/final"), ref_params)
    assert worst < 1e-4, f"{name}: final parameters off by {worst:.2e} (relative)"


@pytest.mark.parametrize("name", list(ZERO))
def test_sp2_matches_plain_trainer(sp2, name):
    ref, root, outs = sp2
    check_against_plain(ref, root, outs, name)


@pytest.mark.parametrize("name", list(DP2_RUNS))
def test_dp2_x_sp2_matches_plain_trainer(dp2, name):
    ref, root, outs = dp2
    check_against_plain(ref, root, outs, name)


@pytest.mark.parametrize("name", RESUMED)
def test_resume_reproduces_later_losses(sp2, name):
    _, _, outs = sp2
    run = outs[0][1][name]
    assert run["resumed"] == pytest.approx(run["losses"][CKPT_STEP:], rel=1e-6), name


def test_misuse_is_refused_on_every_rank(sp2, dp2):
    for refused, _ in sp2[2]:
        assert refused["sp_size=3"].startswith("ValueError: sp_size=3 is larger than the world size 2")
        assert refused["parallelism_config"].startswith("ValueError: accelerate's own sequence/context parallelism")
    for refused, _ in dp2[2]:
        assert refused.startswith("ValueError: sp_size=3 must divide the world size 4")


def test_misuse_is_refused_in_one_process(tmp_path):
    from transformers import BertConfig, BertForMaskedLM

    from ds_ring import SequenceParallelTrainer

    rows = make_rows(0, 2)
    args = training_args(str(tmp_path), 0)
    with pytest.raises(ValueError, match="sp_size=2 needs a distributed launch"):
        SequenceParallelTrainer(model=build_model(0), args=args, train_dataset=rows, sp_size=2)
    with pytest.raises(ValueError, match="compute_loss_func is not supported"):
        SequenceParallelTrainer(model=build_model(0), args=args, train_dataset=rows, compute_loss_func=lambda *a: 0)
    bert = BertForMaskedLM(BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                      intermediate_size=64))
    with pytest.raises(NotImplementedError, match="trains causal language models"):
        SequenceParallelTrainer(model=bert, args=args, train_dataset=rows)


def test_unpatch_undoes_the_trainer_memory_switch_and_patch(tmp_path):
    """One process: the trainer patches the model, switches the memory options on and overrides three accelerator
    methods, all recorded in the model's one state object; ds_ring.unpatch undoes all of it (the model then gives a
    fresh model's logits on fresh random input)."""
    import ds_ring
    from ds_ring import SequenceParallelTrainer
    from ds_ring.training.memory_switch import _checkpointing_on  # either transformers name (floor and latest)

    seed = int(torch.randint(0, 10**6, ()))
    fresh = build_model(seed)
    trainer = SequenceParallelTrainer(model=build_model(seed), args=training_args(str(tmp_path), 0),
                                      train_dataset=make_rows(0, 2), memory="long")
    overridden = ("gather", "prepare", "prepare_data_loader")
    model, acc = trainer.model, trainer.accelerator
    assert all(name in vars(acc) for name in overridden) and model.config._attn_implementation == "ring_dilated"
    ds_ring.unpatch(model)
    assert not any(name in vars(acc) for name in overridden)  # the Accelerator class's methods again
    assert not any(hasattr(m, "_ds_ring") or "forward" in vars(m) for m in model.modules())
    assert model.config._attn_implementation == fresh.config._attn_implementation
    assert not _checkpointing_on(model)
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(seed))
    assert torch.equal(model.eval()(input_ids=ids).logits, fresh.eval()(input_ids=ids).logits)
