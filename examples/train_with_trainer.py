#!/usr/bin/env python
"""Fine-tune a Hugging Face causal LM on long sequences with ``ds_ring.SequenceParallelTrainer``: the plain
``transformers.Trainer`` workflow, with each sequence split over a ring of ``--sp_size`` ranks.

Any launcher works (CPU: gloo; GPU: NCCL); every ``TrainingArguments`` flag is accepted:

    deepspeed --num_gpus 2 examples/train_with_trainer.py --deepspeed ds_config/zero3.json --sp_size 2
    torchrun --nproc_per_node 2 examples/train_with_trainer.py --deepspeed ds_config/zero3.json --sp_size 2
    accelerate launch --config_file integrations/accelerate/zero3.yaml examples/train_with_trainer.py --sp_size 2
    accelerate launch --config_file integrations/accelerate/fsdp2.yaml examples/train_with_trainer.py --sp_size 2

Under ``accelerate launch`` the DeepSpeed or FSDP config comes from the YAML. FSDP2 (``fsdp_version: 2``, or
``--fsdp true --fsdp_config '{"version": 2}'``) trains with ds_ring's gradient rule; accelerate applies FSDP only on
GPUs, and on a CPU machine the trainer refuses the FSDP config rather than train as DDP (use
``examples/train_long_context.py --fsdp2`` there). FSDP1 is refused. ``--per_device_train_batch_size`` is the
batch of one ring. Data: synthetic passkey retrieval (the key at the start of each sequence, the question at the
end, the loss on the answer only), so a ring must attend across its ranks to learn it. Model: ``--model`` (hub id
or local path) or, by default, the tiny Llama config shipped with ds_ring (random weights, no download).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

import torch
from transformers import AutoModelForCausalLM, HfArgumentParser, TrainingArguments

import ds_ring
from ds_ring.tools.demo import parse_pattern, passkey_batch, tiny_llama_config


@dataclass
class ScriptArguments:
    model: str | None = field(default=None, metadata={"help": "hub id or local path (default: ds_ring's tiny Llama)"})
    trust_remote_code: bool = field(default=False, metadata={"help": "allow the model's own code"})
    sp_size: int | None = field(default=None, metadata={"help": "ranks per sequence-parallel ring (default: all)"})
    layout: str = field(default="zigzag", metadata={"help": "sequence layout on a ring: zigzag or contiguous"})
    ulysses_size: int = field(default=1, metadata={"help": "two-dimensional SP: Ulysses all-to-all inside groups of "
                                                           "this many consecutive ranks, the ring across them"})
    pattern: str = field(default="dense", metadata={"help": "'dense' (exact) or LongNet 'SEGMENTS:RATES'"})
    memory: str = field(default="off", metadata={"help": "long-sequence memory options (ds_ring.optimize_memory): "
                                                         "'off', 'long' (all) or a comma list of checkpointing,"
                                                         "chunked_loss,tiled_mlp,offload_checkpoints,lean_norms"})
    seq_len: int = field(default=512, metadata={"help": "tokens per sequence (split over the ring)"})
    key_len: int = field(default=4, metadata={"help": "passkey tokens"})
    train_samples: int = field(default=512)
    eval_samples: int = field(default=32)


class Passkeys(torch.utils.data.Dataset):
    """``n`` passkey sequences; sample ``i`` is the same on every rank and in every run with the same seed."""

    def __init__(self, n: int, seq_len: int, vocab_size: int, key_len: int, seed: int):
        self.n, self.args = n, (seq_len, vocab_size, key_len)
        self.seed = seed

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        batch = passkey_batch(1, *self.args, torch.Generator().manual_seed(self.seed * 1_000_003 + i))
        return {k: v[0] for k, v in batch.items()}


def parse(argv: list[str] | None = None) -> tuple[ScriptArguments, TrainingArguments]:
    parser = HfArgumentParser((ScriptArguments, TrainingArguments))
    cuda = torch.cuda.is_available()
    parser.set_defaults(
        output_dir="output/train_with_trainer", report_to="none", max_steps=100, learning_rate=1e-3,
        per_device_train_batch_size=1, logging_steps=10, save_strategy="no",
        use_cpu=not cuda,  # accelerate sets up CPU ranks (gloo) only with use_cpu
        bf16=cuda and torch.cuda.is_bf16_supported(),
    )
    return parser.parse_args_into_dataclasses(args=argv)


def build(script: ScriptArguments, training: TrainingArguments):
    """The model (unpatched: the trainer patches it) and the train / eval datasets."""
    if script.model is None:
        torch.manual_seed(training.seed)
        model = AutoModelForCausalLM.from_config(tiny_llama_config())
    else:  # under ZeRO-3 (TrainingArguments(deepspeed=...)) transformers loads the weights partitioned
        model = AutoModelForCausalLM.from_pretrained(script.model, trust_remote_code=script.trust_remote_code)
    data = (script.seq_len, model.config.vocab_size, script.key_len)
    train = Passkeys(script.train_samples, *data, training.seed)
    return model, train, Passkeys(script.eval_samples, *data, -1 - training.seed)


def run(argv: list[str] | None = None) -> None:
    script, training = parse(argv)
    model, train, val = build(script, training)
    segments, rates = parse_pattern(script.pattern)
    trainer = ds_ring.SequenceParallelTrainer(
        model=model, args=training, train_dataset=train, eval_dataset=val,
        sp_size=script.sp_size, layout=script.layout, ulysses_size=script.ulysses_size, segment_lengths=segments,
        dilation_rates=rates, memory=script.memory,
    )
    trainer.train(resume_from_checkpoint=training.resume_from_checkpoint)
    metrics = trainer.evaluate()
    trainer.save_model()  # the full model, loadable by from_pretrained without ds_ring
    if trainer.is_world_process_zero():
        sp = trainer.sp
        print(f"ds_ring: world {sp.world_size} = {sp.dp_size} ring(s) x sp_size {sp.sp_size}, layout {sp.layout}, "
              f"pattern {script.pattern}, seq_len {script.seq_len}")
        for entry in trainer.state.log_history:
            if "loss" in entry:
                print(f"step {entry['step']} loss {entry['loss']:.6f}")
        print(f"eval_loss {metrics['eval_loss']:.6f}")
        print(f"saved {training.output_dir}")
    trainer.accelerator.free_memory()  # destroys the DeepSpeed engine (its hooks keep the model and groups alive)


def main(argv: list[str] | None = None) -> int:
    run(argv)  # the trainer, its engine and the patched model are gone when run() returns
    # The one place this script ends the distributed run (exit code 0 under every launcher): accelerate, not ds_ring,
    # initialised the default group, so ds_ring is told to destroy it.
    ds_ring.teardown(destroy_default=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
