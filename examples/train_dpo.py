#!/usr/bin/env python
"""Preference training (DPO) on long prompts with TRL's ``DPOTrainer`` and ds_ring: every prompt + completion
sequence, of the policy and of the reference model, is split over a ring of ``--sp_size`` ranks.

Any launcher works (CPU: gloo; GPU: NCCL); every ``DPOConfig`` flag is accepted:

    deepspeed --num_gpus 2 examples/train_dpo.py --deepspeed ds_config/zero3.json --sp_size 2
    torchrun --nproc_per_node 2 examples/train_dpo.py --sp_size 2
    accelerate launch --config_file integrations/accelerate/zero3.yaml examples/train_dpo.py --sp_size 2

``--per_device_train_batch_size`` is the number of preference pairs of one ring (TRL runs 2x that many sequences:
chosen then rejected). ``--precompute_ref_log_probs`` computes the reference once, over the ring, before training
(no reference model kept). Data: synthetic long prompts (a key at the start, the question at the end); the chosen
completion repeats the key, the rejected one is random, so the ring must attend across its ranks to prefer it.
Model: ``--model`` (hub id or local path, with its tokenizer; ``--trust_remote_code`` is DPOConfig's) or, by default, the tiny Llama config shipped with
ds_ring and a word-level tokenizer built here (random weights, nothing downloaded).
"""

from __future__ import annotations

import os
import random
import sys
from dataclasses import dataclass, field

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, HfArgumentParser

import ds_ring
from ds_ring.tools.demo import tiny_llama_config


@dataclass
class ScriptArguments:
    model: str | None = field(default=None, metadata={"help": "hub id or local path (default: ds_ring's tiny Llama)"})
    sp_size: int | None = field(default=None, metadata={"help": "ranks per sequence-parallel ring (default: all)"})
    layout: str = field(default="zigzag", metadata={"help": "sequence layout on a ring: zigzag or contiguous"})
    memory: str = field(default="off", metadata={"help": "long-sequence memory options (ds_ring.optimize_memory): "
                                                         "'off', 'long' or a comma list of checkpointing,tiled_mlp,"
                                                         "offload_checkpoints,lean_norms (TRL's fused LM head "
                                                         "already keeps no logits)"})
    prompt_len: int = field(default=256, metadata={"help": "prompt words per pair"})
    key_len: int = field(default=4, metadata={"help": "key words (the chosen completion)"})
    train_samples: int = field(default=256)


def parse(argv: list[str] | None = None):
    from trl import DPOConfig

    parser = HfArgumentParser((ScriptArguments, DPOConfig))
    cuda = torch.cuda.is_available()
    parser.set_defaults(
        output_dir="output/train_dpo", report_to="none", max_steps=50, learning_rate=1e-4,
        per_device_train_batch_size=1, logging_steps=5, save_strategy="no", max_length=None,
        use_cpu=not cuda,  # accelerate sets up CPU ranks (gloo) only with use_cpu
        bf16=cuda and torch.cuda.is_bf16_supported(),
    )
    return parser.parse_args_into_dataclasses(args=argv)


def word_tokenizer(vocab_size: int):
    """Offline tokenizer for the default model: "w<i>" is token i, "<eos>" the last one, "w0" padding."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(vocab_size - 1)} | {"<eos>": vocab_size - 1}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0", pad_token="w0", eos_token="<eos>")


def pairs(n: int, prompt_len: int, key_len: int, seed: int) -> list[dict[str, str]]:
    """``n`` preference pairs, the same on every rank for one seed: prompt ``key ... filler ... "w3 w3"``, chosen the
    key, rejected random words; prompt lengths vary by up to 25 % so batches are padded."""
    g = random.Random(seed)

    def words(k: int) -> str:
        return " ".join(f"w{g.randrange(4, 100)}" for _ in range(k))

    out = []
    for _ in range(n):
        key = words(key_len)
        filler = words(max(0, prompt_len - key_len - 2 - g.randrange(prompt_len // 4 + 1)))
        out.append({"prompt": f"{key} {filler} w3 w3", "chosen": " " + key, "rejected": " " + words(key_len)})
    return out


def build(script: ScriptArguments, training):
    """(policy, reference or None, tokenizer, train dataset). The dataset is saved under the output directory once
    and read from there: TRL's reference precompute caches its result next to the dataset's files."""
    from datasets import Dataset, load_from_disk

    def load():
        if script.model is None:
            torch.manual_seed(training.seed)
            return AutoModelForCausalLM.from_config(tiny_llama_config())
        return AutoModelForCausalLM.from_pretrained(script.model, trust_remote_code=training.trust_remote_code)

    model = load()
    ref = None if training.precompute_ref_log_probs else load()  # same initial weights: the frozen reference
    if script.model is None:
        tok = word_tokenizer(model.config.vocab_size)
    else:
        tok = AutoTokenizer.from_pretrained(script.model, trust_remote_code=training.trust_remote_code)
    path = os.path.join(training.output_dir, "pairs")
    with training.main_process_first(desc="preference pairs"):
        if not os.path.isdir(path):
            Dataset.from_list(pairs(script.train_samples, script.prompt_len, script.key_len,
                                    training.seed)).save_to_disk(path)
    return model, ref, tok, load_from_disk(path)


def run(argv: list[str] | None = None) -> None:
    from trl import DPOTrainer

    class SequenceParallelDPOTrainer(ds_ring.SequenceParallelMixin, DPOTrainer):
        """TRL's DPOTrainer with each sequence split over a ring."""

    script, training = parse(argv)
    model, ref, tok, train = build(script, training)
    trainer = SequenceParallelDPOTrainer(
        model=model, ref_model=ref, args=training, train_dataset=train, processing_class=tok,
        sp_size=script.sp_size, layout=script.layout, memory=script.memory,
    )
    trainer.train()
    trainer.save_model()  # the full model, loadable by from_pretrained without ds_ring
    if trainer.is_world_process_zero():
        sp = trainer.sp
        print(f"ds_ring: world {sp.world_size} = {sp.dp_size} ring(s) x sp_size {sp.sp_size}, layout {sp.layout}, "
              f"prompt_len {script.prompt_len}")
        for entry in trainer.state.log_history:
            if "loss" in entry:
                print(f"step {entry['step']} loss {entry['loss']:.6f} margin {entry['rewards/margins']:.6f} "
                      f"accuracy {entry['rewards/accuracies']:.3f}")
        print(f"saved {training.output_dir}")
    trainer.accelerator.free_memory()  # destroys the DeepSpeed engine (its hooks keep the model and groups alive)


def main(argv: list[str] | None = None) -> int:
    run(argv)
    # accelerate, not ds_ring, initialised the default group: ds_ring is told to destroy it (exit code 0 everywhere)
    ds_ring.teardown(destroy_default=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
