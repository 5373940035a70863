"""TRL's SFTTrainer through ds_ring.SequenceParallelMixin on real gloo ranks against the plain SFTTrainer in one
process; and trainers whose loss the mixin does not implement, refused at construction.

A tiny Llama and an offline word-level tokenizer; a prompt-completion dataset (so SFTTrainer's default
``completion_only_loss`` puts -100 on the prompts: the loss and the metrics count completion tokens only), packed
(BFD: one padding-free row per batch, restarting position_ids) and padded (one row per example, right padding).
fp32, SGD with a constant learning rate, no clipping, gradient accumulation 2, at SP=2 under DDP, ZeRO-2 and
ZeRO-3: every value SFTTrainer logs (loss, entropy, mean_token_accuracy, num_tokens, learning rate, epoch; the eval
loss and eval metrics; train_loss and, under DDP, total_flos at the end) equals the plain run's to 1e-4. With bf16
autocast (TRL's default) it runs and its losses track the plain bf16 run.
"""

from __future__ import annotations

import random

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from dist_utils import run_distributed

VOCAB, LR, STEPS, MAX_LEN = 64, 0.5, 3, 40
ZERO3 = {"stage": 3, "stage3_gather_16bit_weights_on_model_save": True}
TIMING = ("train_runtime", "train_samples_per_second", "train_steps_per_second", "eval_runtime",
          "eval_samples_per_second", "eval_steps_per_second")


def build_model(seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0,
                      eos_token_id=1, bos_token_id=2)
    return LlamaForCausalLM(cfg)


def tokenizer():
    """Word-level, offline: "w<id>" -> id; w0 pads, w1 ends a sequence."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(VOCAB)}, unk_token="w3"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w3", pad_token="w0", eos_token="w1",
                                   bos_token="w2")


def make_rows(seed: int, n: int) -> list[dict[str, str]]:
    """Prompt-completion examples of random lengths (words w4..w63)."""
    rng = random.Random(seed)

    def words(lo, hi):
        return " ".join(f"w{rng.randrange(4, VOCAB)}" for _ in range(rng.randrange(lo, hi)))

    return [{"prompt": words(3, 10), "completion": words(3, 12)} for _ in range(n)]


def sft_args(out: str, seed: int, packing: bool, *, zero: dict | None = None, bf16: bool = False):
    from trl import SFTConfig

    ds = None if zero is None else {
        "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
        "zero_optimization": zero, "zero_force_ds_cpu_optimizer": False, "steps_per_print": 10**9}
    return SFTConfig(
        output_dir=out, per_device_train_batch_size=2, per_device_eval_batch_size=2, gradient_accumulation_steps=2,
        max_steps=STEPS, optim="sgd", learning_rate=LR, lr_scheduler_type="constant", max_grad_norm=0.0,
        weight_decay=0.0, logging_steps=1, seed=seed, report_to=[], disable_tqdm=True, use_cpu=True, deepspeed=ds,
        save_strategy="no", bf16=bf16, packing=packing, max_length=MAX_LEN, dataset_num_proc=None,
        eval_strategy="no")


def run_sft(trainer_cls, seed, rows, eval_rows, out, packing, **kw) -> dict:
    from datasets import Dataset

    zero, bf16 = kw.pop("zero", None), kw.pop("bf16", False)
    trainer = trainer_cls(model=build_model(seed), args=sft_args(out, seed, packing, zero=zero, bf16=bf16),
                          train_dataset=Dataset.from_list(rows), eval_dataset=Dataset.from_list(eval_rows),
                          processing_class=tokenizer(), **kw)
    trainer.train()
    trainer.evaluate()
    logs = [{k: v for k, v in entry.items() if k not in TIMING} for entry in trainer.state.log_history]
    return {"logs": logs, "completion_only": trainer.completion_only_loss, "autocast": trainer.accelerator.native_amp,
            "deepspeed": trainer.is_deepspeed_enabled}


def _sp_worker(rank, world, root, seed, rows, eval_rows):
    from trl import SFTTrainer

    from ds_ring import SequenceParallelMixin

    class SPSFT(SequenceParallelMixin, SFTTrainer):
        pass

    out = {}
    # every DDP run first: a DeepSpeed Trainer leaves accelerate's process-wide DeepSpeed switch on, and a later
    # Trainer in the same process would run under DeepSpeed
    for packing in (True, False):
        out[packing, "ddp"] = run_sft(SPSFT, seed, rows, eval_rows, f"{root}/{packing}-ddp", packing, sp_size=2)
        out[packing, "bf16"] = run_sft(SPSFT, seed, rows, eval_rows, f"{root}/{packing}-bf16", packing, bf16=True,
                                       sp_size=2)
    for packing in (True, False):
        for engine, zero in (("zero2", {"stage": 2}), ("zero3", ZERO3)):
            out[packing, engine] = run_sft(SPSFT, seed, rows, eval_rows, f"{root}/{packing}-{engine}", packing,
                                           zero=zero, sp_size=2)
    return out


@pytest.fixture(scope="module")
def sft(tmp_path_factory):
    from trl import SFTTrainer

    seed = random.randrange(10**6)
    rows, eval_rows = make_rows(seed, 16), make_rows(seed + 1, 4)
    root = tmp_path_factory.mktemp("sft")
    plain = {(packing, bf16): run_sft(SFTTrainer, seed, rows, eval_rows, f"{root}/plain-{packing}-{bf16}", packing,
                                      bf16=bf16)
             for packing in (True, False) for bf16 in (False, True)}
    return seed, plain, run_distributed(_sp_worker, 2, str(root), seed, rows, eval_rows, timeout_s=900)


def _values(logs: list[dict]) -> list[tuple[str, int, float]]:
    return [(k, e["step"], v) for e in logs for k, v in sorted(e.items()) if k != "step"]


@pytest.mark.parametrize("engine", ["ddp", "zero2", "zero3"])
@pytest.mark.parametrize("packing", [True, False], ids=["packed", "padded"])
def test_sft_logs_what_plain_sft_logs(sft, packing, engine):
    seed, plain, outs = sft
    ref = plain[packing, False]
    assert ref["completion_only"]  # the prompts carry no target: completion_only_loss is in play
    want = _values(ref["logs"])
    keys = {k for k, _, _ in want}
    assert {"loss", "entropy", "mean_token_accuracy", "num_tokens", "eval_loss", "eval_entropy",
            "eval_mean_token_accuracy", "train_loss"} <= keys, keys
    for rank, out in enumerate(outs):
        assert out[packing, engine]["deepspeed"] == (engine != "ddp")
        got = _values(out[packing, engine]["logs"])
        if engine == "zero3":  # transformers estimates FLOPs from p.numel(), which ZeRO-3 partitions
            got, want = ([v for v in vals if v[0] != "total_flos"] for vals in (got, _values(ref["logs"])))
        assert [(k, s) for k, s, _ in got] == [(k, s) for k, s, _ in want], (rank, got, want)
        for (k, s, g), (_, _, w) in zip(got, want):
            assert g == pytest.approx(w, rel=1e-4, abs=1e-6), f"seed {seed} rank {rank} step {s} {k}: {g} vs {w}"


@pytest.mark.parametrize("packing", [True, False], ids=["packed", "padded"])
def test_sft_bf16_autocast_tracks_plain_bf16(sft, packing):
    seed, plain, outs = sft
    ref = [e["loss"] for e in plain[packing, True]["logs"] if "loss" in e]
    assert plain[packing, True]["autocast"]
    for out in outs:
        assert out[packing, "bf16"]["autocast"] and not out[packing, "bf16"]["deepspeed"]
        got = [e["loss"] for e in out[packing, "bf16"]["logs"] if "loss" in e]
        assert len(got) == len(ref) == STEPS
        assert got == pytest.approx(ref, rel=2e-2), (seed, got, ref)


def test_trainer_without_an_adapter_is_refused_at_construction(tmp_path):
    """KTOTrainer (its own preference loss), and a user's Trainer subclass that computes its own loss below the
    mixin: refused when the class is instantiated, before the Trainer or any group is set up."""
    from transformers import Trainer, TrainingArguments
    from trl import KTOTrainer

    from ds_ring import SequenceParallelMixin

    class SPKTO(SequenceParallelMixin, KTOTrainer):
        pass

    class Weighted(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch) * 2

    class SPWeighted(SequenceParallelMixin, Weighted):
        pass

    for cls, owner in ((SPKTO, r"KTOTrainer \(computes its loss in trl\.trainer\.kto_trainer\.KTOTrainer"),
                       (SPWeighted, r"Weighted \(computes its loss in test_trl\.")):
        with pytest.raises(NotImplementedError, match=rf"^{cls.__name__}: .*loss of {owner}.*Supported: "
                                                      r"transformers\.Trainer .*trl\.SFTTrainer.*trl\.DPOTrainer"):
            cls(model=build_model(0), args=TrainingArguments(str(tmp_path), use_cpu=True, report_to=[]))


def test_sft_options_it_does_not_implement_are_refused(tmp_path):
    from datasets import Dataset
    from trl import SFTTrainer

    from ds_ring import SequenceParallelMixin

    class SPSFT(SequenceParallelMixin, SFTTrainer):
        pass

    data = Dataset.from_list(make_rows(0, 4))
    with pytest.raises(ValueError, match="chunked_loss.*fused LM head"):
        SPSFT(model=build_model(0), args=sft_args(str(tmp_path), 0, True), train_dataset=data,
              processing_class=tokenizer(), memory="long")
