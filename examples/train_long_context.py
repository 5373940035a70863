#!/usr/bin/env python
"""Train a Hugging Face causal LM on long sequences split over a ring of ranks, with ds_ring + DeepSpeed ZeRO or
torch FSDP2 (``ds_ring.fully_shard``).

Any launcher that sets RANK/WORLD_SIZE/MASTER_ADDR works (CPU: gloo; GPU: NCCL):

    deepspeed --num_gpus 2 examples/train_long_context.py --deepspeed ds_config/zero3.json --sp-size 2
    torchrun --nproc_per_node 2 examples/train_long_context.py --deepspeed ds_config/zero3.json --sp-size 2
    accelerate launch --config_file integrations/accelerate/zero3.yaml examples/train_long_context.py --sp-size 2
    torchrun --nproc_per_node 2 examples/train_long_context.py --fsdp2 --sp-size 2
    accelerate launch --config_file integrations/accelerate/fsdp2.yaml examples/train_long_context.py --sp-size 2

Under ``accelerate launch`` the DeepSpeed config comes from the accelerate YAML (``deepspeed_config_file``); an FSDP
YAML (``fsdp_version: 2``) selects FSDP2 with its mixed precision (bf16: ``MixedPrecisionPolicy`` with fp32
reduction), ``fsdp_offload_params`` (``CPUOffloadPolicy``) and ``fsdp_reshard_after_forward``; FSDP1 is refused.
accelerate is used as a launcher only: no ``Accelerator.prepare``, so it never shards the data across the ranks of a
ring (``ds_ring.sp_dataloader`` shards over data-parallel ranks only) and ds_ring passes its own groups to DeepSpeed.

Data: ``--data passkey`` (synthetic passkey retrieval, default) or a UTF-8 text file tokenised with the model's
tokenizer and cut into ``--seq-len`` chunks. The model: ``--model`` (a hub id or local path; downloads only if the
id is not cached) or, by default, the tiny Llama config shipped with ds_ring (random weights, no download).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import resource
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

import ds_ring
from ds_ring.training.data import shard_batch, sp_dataloader
from ds_ring.integrations.deepspeed import ConfigError, check_config, check_sequence_length, load_config
from ds_ring.integrations.deepspeed import initialize as ds_initialize
from ds_ring.tools.demo import passkey_batch, parse_pattern, tiny_llama_config
from ds_ring.op.layouts import LAYOUTS
from ds_ring.training.loss import causal_lm_loss
from ds_ring.training.memory_switch import parse_memory_options
from ds_ring.integrations.transformers import patch

log = logging.getLogger("train_long_context")
DEFAULT_DS_CONFIG = Path(__file__).resolve().parent.parent / "ds_config" / "zero3.json"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="hub id or local path (default: ds_ring's tiny Llama config)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow the model's own code (off by default)")
    p.add_argument("--deepspeed", default=None,
                   help="DeepSpeed config JSON (default: accelerate's deepspeed_config_file, else "
                   "ds_config/zero3.json)")
    p.add_argument("--fsdp2", action="store_true",
                   help="train with torch FSDP2 (ds_ring.fully_shard) instead of DeepSpeed; on under accelerate "
                   "launch with an FSDP config (integrations/accelerate/fsdp2.yaml)")
    p.add_argument("--sp-size", type=int, default=None, help="ranks per sequence-parallel ring (default: all)")
    p.add_argument("--ulysses-size", type=int, default=1,
                   help="two-dimensional SP: Ulysses all-to-all inside groups of this many consecutive ranks (one "
                   "node), the ring across them (default 1: the ring alone)")
    p.add_argument("--layout", default="zigzag", choices=list(LAYOUTS), help="sequence layout on a ring")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per sequence (split over the ring)")
    p.add_argument("--no-pad", action="store_true", help="refuse sequence lengths the ring cannot shard evenly")
    p.add_argument("--pattern", default="dense", help="'dense' (exact) or LongNet 'SEGMENTS:RATES', e.g. '256,512:1,2'")
    p.add_argument("--memory", default="off", help="memory options (ds_ring.optimize_memory): 'off', 'long' (all), or "
                   "a comma list of checkpointing,chunked_loss,tiled_mlp,offload_checkpoints,lean_norms")
    p.add_argument("--data", default="passkey", help="'passkey' (synthetic) or a path to a UTF-8 text file")
    p.add_argument("--steps", type=int, default=100, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=1, help="sequences per ring per micro-step")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-steps per optimizer step")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--grad-clip", type=float, default=1.0, help="gradient clipping (0: off)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint-dir", default=None,
                   help="where checkpoints go (DeepSpeed's, or torch.distributed.checkpoint directories with --fsdp2)")
    p.add_argument("--save-every", type=int, default=0, help="save every N steps (0: only at the end)")
    p.add_argument("--resume", action="store_true", help="resume from the latest checkpoint in --checkpoint-dir")
    p.add_argument("--log-every", type=int, default=10, help="print the loss every N steps (rank 0)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds a rank waits for a dead peer before failing")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed's
    args = p.parse_args(argv)
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":  # accelerate launch with an FSDP config
        if os.environ.get("FSDP_VERSION", "1") != "2":
            p.error("the accelerate config asks for FSDP1, which cannot train a ring exactly (it averages every "
                    "rank's gradient with no way to set the divisor): set fsdp_version: 2")
        args.fsdp2 = True
    if args.fsdp2 and args.deepspeed:
        p.error("--fsdp2 and --deepspeed select two engines: pass one")
    if args.resume and not args.checkpoint_dir:
        p.error("--resume needs --checkpoint-dir")
    return args


def build_model(args, sp, config: dict, memory: dict | None):
    from transformers import AutoConfig, AutoModelForCausalLM

    segments, rates = parse_pattern(args.pattern)
    if args.model is None:
        torch.manual_seed(args.seed)
        model = AutoModelForCausalLM.from_config(tiny_llama_config())
    else:
        if config is not None and config["zero_optimization"]["stage"] == 3:
            # Kept alive while loading: transformers then builds the weights partitioned (deepspeed.zero.Init).
            from transformers.integrations import HfDeepSpeedConfig

            hf_ds = HfDeepSpeedConfig(config)  # noqa: F841
        cfg = AutoConfig.from_pretrained(args.model, trust_remote_code=args.trust_remote_code)
        cfg.use_cache = False
        model = AutoModelForCausalLM.from_pretrained(args.model, config=cfg, trust_remote_code=args.trust_remote_code)
    patch(model, sp=sp, segment_lengths=segments, dilation_rates=rates)
    return model if memory is None else ds_ring.optimize_memory(model, sp, **memory)


class TextChunks(torch.utils.data.Dataset):
    """A text file tokenised once and cut into ``seq_len`` token chunks (the tail is dropped)."""

    def __init__(self, path: str, tokenizer, seq_len: int):
        ids = tokenizer(Path(path).read_text(encoding="utf-8"), return_tensors="pt").input_ids[0]
        n = ids.numel() // seq_len
        if n == 0:
            raise ConfigError(f"--data {path} has {ids.numel()} tokens, fewer than --seq-len {seq_len}")
        self.chunks = ids[: n * seq_len].view(n, seq_len)

    def __len__(self) -> int:
        return len(self.chunks)

    def __getitem__(self, i):
        return {"input_ids": self.chunks[i], "labels": self.chunks[i]}


def batches(args, sp, vocab_size: int, start_step: int):
    """Yield (step, micro-batch) from ``start_step`` on; the same step always gets the same data (exact resume)."""
    micro = args.grad_accum
    if args.data == "passkey":
        for step in range(start_step, args.steps):
            for m in range(micro):
                # Seeded by step and data-parallel rank: the ranks of a ring draw the same batch, rings differ.
                g = torch.Generator().manual_seed(hash((args.seed, step, m, sp.dp_rank)) % 2**63)
                yield step, passkey_batch(args.batch_size, args.seq_len, vocab_size, 1, g)
        return
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(args.model, trust_remote_code=args.trust_remote_code)
    loader = sp_dataloader(TextChunks(args.data, tok, args.seq_len), sp, batch_size=args.batch_size, seed=args.seed,
                           drop_last=True)
    per_epoch = len(loader) // micro
    if per_epoch == 0:
        raise ConfigError(f"--data {args.data} yields fewer than --grad-accum {micro} batches per data-parallel rank")
    step = start_step
    while step < args.steps:
        loader.set_epoch(step // per_epoch)
        it = iter(loader)
        for _ in range((step % per_epoch) * micro):  # skip what the resumed run already consumed this epoch
            next(it)
        for _ in range(step % per_epoch, per_epoch):
            for _ in range(micro):
                yield step, next(it)
            step += 1
            if step >= args.steps:
                return


def fsdp2_options(bf16: bool) -> dict:
    """``fully_shard`` keyword arguments: from accelerate's FSDP config when launched with one (its environment),
    else bf16 mixed precision where the GPU supports it."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy

    env = os.environ
    precision = env.get("ACCELERATE_MIXED_PRECISION", "bf16" if bf16 else "no")
    if precision not in ("no", "bf16"):
        raise ConfigError(f"mixed precision {precision!r} with FSDP2: use bf16 or no")
    kwargs = {"reshard_after_forward": env.get("FSDP_RESHARD_AFTER_FORWARD", "true").lower() == "true"}
    if precision == "bf16":  # bf16 compute, fp32 parameters and gradient reduction
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    if env.get("FSDP_OFFLOAD_PARAMS", "false").lower() == "true":
        kwargs["offload_policy"] = CPUOffloadPolicy(pin_memory=torch.cuda.is_available())
    return kwargs


class FSDP2Engine:
    """What the training loop uses of a DeepSpeed engine, for a model under ``ds_ring.fully_shard``: gradient
    accumulation as DeepSpeed does it (loss / grad_accum, an optimizer step every grad_accum micro-steps), clipping
    (``clip_grad_norm_`` sees the DTensor gradients' true norm), and checkpoints as torch.distributed.checkpoint
    directories (model and optimizer, sharded) with a ``latest`` file, like DeepSpeed's."""

    def __init__(self, model, optimizer, grad_accum: int, clip: float):
        self.module, self.optimizer, self.grad_accum, self.clip, self.micro = model, optimizer, grad_accum, clip, 0

    def __call__(self, **kwargs):
        return self.module(**kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.grad_accum).backward()

    def step(self) -> None:
        self.micro += 1
        if self.micro % self.grad_accum:
            return
        if self.clip:
            torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.clip)
        self.optimizer.step()
        self.optimizer.zero_grad()

    def _states(self):
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model, optim = get_state_dict(self.module, self.optimizer)
        return {"model": model, "optim": optim}

    def save_checkpoint(self, root: str, tag: str, client_state: dict) -> None:
        import torch.distributed.checkpoint as dcp

        dcp.save(self._states(), checkpoint_id=os.path.join(root, tag))
        if dist.get_rank() == 0:
            Path(root, tag, "client_state.json").write_text(json.dumps(client_state))
            Path(root, "latest").write_text(tag)
        dist.barrier()

    def load_checkpoint(self, root: str):
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_state_dict

        latest = Path(root, "latest")
        if not latest.is_file():
            return None, None
        path = Path(root, latest.read_text().strip())
        states = self._states()
        dcp.load(states, checkpoint_id=str(path))
        set_state_dict(self.module, self.optimizer, model_state_dict=states["model"],
                       optim_state_dict=states["optim"])
        return str(path), json.loads(Path(path, "client_state.json").read_text())

    def destroy(self) -> None:
        pass


def peak_memory_bytes() -> int:
    """Peak memory of this rank: CUDA allocator peak on GPU, else the process's peak resident set."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def setup_logging(rank: int) -> None:
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.ERROR, format="%(message)s", stream=sys.stdout)
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")
    import transformers
    from deepspeed.utils import logger as ds_logger

    ds_logger.setLevel(logging.WARNING if rank == 0 else logging.ERROR)
    if rank != 0:
        transformers.logging.set_verbosity_error()


def main(argv=None) -> int:
    args = parse_args(argv)
    ds_ring.init_distributed(timeout=args.timeout)
    code = train(args)
    # After train() has returned, so that nothing holds the process groups any more: wait for every rank, free
    # them and destroy the default group (ds_ring created it above). Ending otherwise can abort at exit (SIGABRT).
    ds_ring.teardown()
    return code


def train(args) -> int:
    rank = dist.get_rank()
    setup_logging(rank)
    try:  # every rank checks the same arguments: all stop together, rank 0 says why
        sp = ds_ring.init_sequence_parallel(args.sp_size, layout=args.layout, ulysses_size=args.ulysses_size)
        ds_path = args.deepspeed or os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE") or str(DEFAULT_DS_CONFIG)
        seq_len = check_sequence_length(args.seq_len, sp, pad=not args.no_pad)
        bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        if args.fsdp2:
            config, fsdp_kwargs = None, fsdp2_options(bf16)
        else:
            config = load_config(ds_path, fill={
                "train_micro_batch_size_per_gpu": args.batch_size, "gradient_accumulation_steps": args.grad_accum,
                "gradient_clipping": args.grad_clip, "bf16.enabled": bf16,
            })
            check_config(config, sp)
        parse_pattern(args.pattern)
        memory = parse_memory_options(args.memory)
        if args.data != "passkey" and args.model is None:
            raise ConfigError("--data with a text file needs --model (for its tokenizer); the tiny default has none")
    except (ConfigError, ValueError) as e:
        if rank == 0:
            print(f"error: {e}", file=sys.stderr)
        return 2
    if seq_len != args.seq_len:
        log.info(f"--seq-len {args.seq_len} padded to {seq_len} so that it shards over the ring")

    model = build_model(args, sp, config, memory)
    if args.fsdp2:  # shard first: the optimizer is made over the DTensor shards
        ds_ring.fully_shard(model, sp, **fsdp_kwargs)
        engine = FSDP2Engine(model, torch.optim.AdamW(model.parameters(), lr=args.lr), args.grad_accum, args.grad_clip)
        what = "FSDP2 (" + ", ".join(f"{k}={v}" for k, v in fsdp_kwargs.items()) + ")"
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
        engine, *_ = ds_initialize(model, sp, config, optimizer=opt)
        what = f"ZeRO-{config['zero_optimization']['stage']} ({ds_path})"
    log.info(f"ds_ring: world {sp.world_size} = {sp.dp_size} ring(s) x sp_size {sp.sp_size} ({sp.ring_size} ring "
             f"positions x Ulysses {sp.ulysses_size}), layout {sp.layout}, "
             f"pattern {args.pattern}, {what}, seq_len {seq_len} ({seq_len // sp.sp_size} tokens per rank)")

    start = 0
    if args.resume:
        path, client = engine.load_checkpoint(args.checkpoint_dir)
        if path is None:
            log.info(f"--resume: no checkpoint in {args.checkpoint_dir}, starting from step 0")
        else:
            start = client["step"]
            log.info(f"resumed from {path} at step {start}")

    from tqdm.auto import tqdm

    bar = tqdm(total=args.steps, initial=start, desc="train", disable=rank != 0, dynamic_ncols=True)
    tokens_per_step = args.batch_size * args.grad_accum * seq_len * sp.dp_size
    t0, loss_sum, n_micro, last_loss = time.perf_counter(), 0.0, 0, math.nan
    for step, batch in batches(args, sp, engine.module.config.vocab_size, start):
        local = shard_batch(batch, sp, pad_token_id=engine.module.config.pad_token_id or 0)
        labels = local.pop("shift_labels")
        with ds_ring.offload_context(engine.module):  # a no-op unless --memory offloads checkpoints
            if memory and memory["chunked_loss"]:
                loss = engine(**local, shift_labels=labels).loss  # the chunked loss: no logits
            else:
                loss = causal_lm_loss(engine(**local).logits, labels, sp)
            engine.backward(loss)
        engine.step()
        loss_sum, n_micro = loss_sum + loss.item(), n_micro + 1
        if n_micro == args.grad_accum:  # the engine stepped the optimizer
            last_loss, loss_sum, n_micro = loss_sum / n_micro, 0.0, 0
            done = step + 1
            tok_s = (done - start) * tokens_per_step / (time.perf_counter() - t0)
            bar.update(1)
            bar.set_postfix(loss=f"{last_loss:.4f}", tok_s=f"{tok_s:.0f}")
            if rank == 0 and done % args.log_every == 0:
                bar.write(f"step {done} loss {last_loss:.6f}", file=sys.stdout)
            if args.checkpoint_dir and ((args.save_every and done % args.save_every == 0) or done == args.steps):
                engine.save_checkpoint(args.checkpoint_dir, tag=f"step{done}", client_state={"step": done})
    bar.close()

    peaks = [None] * sp.world_size
    dist.all_gather_object(peaks, peak_memory_bytes())
    elapsed = time.perf_counter() - t0
    log.info(f"done: {args.steps - start} steps in {elapsed:.1f}s, "
             f"{(args.steps - start) * tokens_per_step / max(elapsed, 1e-9):.0f} tokens/s, final loss {last_loss:.4f}")
    log.info("peak memory per rank: " + ", ".join(f"rank {r}: {p / 2**20:.0f} MiB" for r, p in enumerate(peaks))
             + (" (CUDA allocator)" if torch.cuda.is_available() else " (process peak RSS)"))
    engine.destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
