"""The longest sequence a ZeRO-3 training step fits under a per-rank memory cap: ds_ring with and without its memory
options (``ds_ring.optimize_memory``) against DeepSpeed ALST, with ``ds_ring.plan``'s predictions next to each.

CPU (default): P=2 spawned ranks (gloo on 127.0.0.1, one thread each), a Llama-shaped model built from a config
(random weights, fp32, 32k vocabulary, untied head), ds_config/zero3.json (micro batch 1, clipping 1.0), random tokens
with labels = input_ids, all candidates on the same weights:

  * ``ds_ring``: ring attention (``ds_ring.patch``, zigzag), ``causal_lm_loss`` on full logits: the switch off;
  * ``ds_ring+ckpt``: the same with activation checkpointing only (``optimize_memory`` with every other part off);
  * ``ds_ring tiled``: chunked loss and tiled MLP, no checkpointing;
  * ``ds_ring long``: ``ds_ring.optimize_memory(model, sp)``: all of it (checkpoint offload is a no-op on CPU);
  * ``ds_ring long keep`` (only when named): the same, but ZeRO-3 keeps gathered parameters as DeepSpeed does by default
    (``deepspeed_initialize(..., release_parameters=False)``): what the release costs in time;
  * ``ds_ring long DPO``: one DPO step of TRL's ``DPOTrainer`` through ``ds_ring.SequenceParallelMixin`` with
    ``memory="long"`` on the same model and ZeRO-3 config, a frozen reference copy in TRL's own ZeRO-3 engine; S is
    the length of EACH sequence of the pair (prompt S // 2 tokens, chosen and rejected completions S - S // 2 each),
    so a step runs the policy forward and backward on 2 x S tokens and the reference forward on 2 x S (see
    ``_build_dpo``);
  * ``FSDP2 long``: the same model and switch, sharded by torch FSDP2 instead of ZeRO-3 (``ds_ring.fully_shard``:
    each decoder layer and the root over both ranks, fp32, torch AdamW, ``clip_grad_norm_`` 1.0 as the ZeRO config);
  * ``ALST``: DeepSpeed Ulysses attention with ArcticTraining's recipe: activation checkpointing, DeepSpeed's
    ``TiledMLP`` on every MLP (ceil(L / hidden) tiles agreed by an all-reduce per layer), the decoder called on its
    own and ``TiledFusedLogitsLoss`` over the LM head (sum, then the valid-token mean and the SP weighted mean), and
    DeepSpeed's ``CheckpointHiddenStatesOffload`` context (a no-op on CPU). Its loss chunks hold as many logits as
    ds_ring's (ArcticTraining's default of 1 GiB of fp32 logits per chunk would not fit a 2 GiB cap).

Memory of one step (forward, ``engine.backward``, ``engine.step``): ``ds_ring.measure_peak_bytes`` (peak live torch
CPU allocations above the level before the step; ZeRO-3 shards and Adam states held between steps are excluded, the
optimizer states having been created by warm-up steps), the worse of the two ranks. The longest sequence is SEARCHED
by real steps, each candidate in its own pair of processes: two calibration lengths, then a step where
``ds_ring.plan`` predicts the limit (ALST: where ds_ring long's search ended), then steps next to it, each aimed by the
line through the two measured peaks nearest the cap, until a length that fits and one that does not are within
``--resolution`` (on a grid of ``--grid`` tokens). A second shape (``--planner-check``) is measured at two lengths per
ds_ring candidate for the planner. Time per token: the ds_ring candidates in one pair of processes, steps interleaved
(order rotated) at each of ``--time-seq-lens``, median of ``--repeat``; their first step's losses must agree. Exactness:
the LM head and loss at the model's shape against float64, ds_ring's chunked loss, ``causal_lm_loss`` and ALST's.

    python benchmarks/bench_longest.py                         # CPU: searches, planner check, timing, exactness, plot
    python benchmarks/bench_longest.py --quick                 # a few minutes: tiny model and cap (a smoke run)
    python benchmarks/bench_longest.py --quick --candidates "ds_ring long" "FSDP2 long"   # ZeRO-3 against FSDP2
    python benchmarks/bench_longest.py --candidates "ds_ring long" ALST --at 81920 82944 --suffix _at   # lengths only
    python benchmarks/bench_longest.py --time-only --time-candidates ds_ring "ds_ring long" --suffix _time  # times only
    python benchmarks/bench_longest.py --candidates "ds_ring long DPO" --sft-longest 82944 \
        --grid 256 --budget-s 1800 --max-runs 4 --suffix _dpo        # DPO pairs (docs/performance.md section 10b)
    python benchmarks/bench_longest.py --gpu --candidates "ds_ring long" --budget-s 400   # one GPU: Llama-3.2-1B
        # shape (untied), bf16, ds_config/zero3_offload.json; a step "fits" when it does not run out of memory
"""

from __future__ import annotations

import contextlib
import copy
import gc
import logging
import math
import os
import statistics
import time
import warnings
from pathlib import Path

import torch

import _common as C
from bench_ulysses import _batch, shard_ulysses, ulysses_mean

ROOT = C.ROOT
NAMES = ("ds_ring", "ds_ring+ckpt", "ds_ring tiled", "ds_ring long", "ds_ring long DPO", "FSDP2 long", "ALST",
         "ds_ring long keep")
# named only on request (not in the default --candidates / --time-candidates): what ZeRO-3's release of gathered
# parameters under the memory switch costs in time (ds_ring.deepspeed_initialize(..., release_parameters=False))
ON_REQUEST = ("ds_ring long keep",)
DPO = "ds_ring long DPO"
DPO_BETA = 0.1
DPO_AIM = 0.45  # the DPO search's first aim, as a fraction of ds_ring long's longest when searched in the same run
# optimize_memory arguments of the ds_ring candidates (None: not optimized)
DS_RING_OPTIONS = {
    "ds_ring": None,
    "ds_ring+ckpt": dict(checkpointing=True, chunked_loss=False, tiled_mlp=False, offload_checkpoints=False,
                         lean_norms=False),
    "ds_ring tiled": dict(checkpointing=False, offload_checkpoints=False, lean_norms=False),
    "ds_ring long": {},
    "ds_ring long keep": {},
}
# ds_ring.plan's options for each candidate
PLAN_OPTIONS = {
    "ds_ring": dict(checkpointing=False, chunked_loss=False, tiled_mlp=False, lean_norms=False),
    "ds_ring+ckpt": dict(checkpointing=True, chunked_loss=False, tiled_mlp=False, lean_norms=False),
    "ds_ring tiled": dict(checkpointing=False, chunked_loss=True, tiled_mlp=True, lean_norms=False),
    "ds_ring long": dict(checkpointing=True, chunked_loss=True, tiled_mlp=True, lean_norms=True),
    "ds_ring long keep": dict(checkpointing=True, chunked_loss=True, tiled_mlp=True, lean_norms=True,
                              release_parameters=False),
}


def model_config(cfg):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=cfg["vocab"], hidden_size=cfg["hidden"], intermediate_size=cfg["intermediate"],
        num_hidden_layers=cfg["layers"], num_attention_heads=cfg["heads"], num_key_value_heads=cfg["kv_heads"],
        head_dim=cfg["head_dim"], max_position_embeddings=1 << 22, rope_theta=cfg.get("rope_theta", 10000.0),
        rms_norm_eps=1e-5, attention_dropout=0.0, tie_word_embeddings=cfg.get("tied", False), use_cache=False,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )


def ds_config(cfg):
    from ds_ring.integrations.deepspeed import load_config

    return load_config(ROOT / "ds_config" / cfg["ds_config"], fill={
        "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "gradient_clipping": 1.0,
        "bf16.enabled": cfg["dtype"] == "bfloat16",
    })


# ----- the candidates: an engine and a step function ---------------------------------------------------------------

def build_candidate(name, base, cfg, world):
    """(engine, step(batch) -> loss value, context(): the step's context) for candidate ``name`` on a copy of base."""
    import deepspeed

    import ds_ring
    from ds_ring.training.data import shard_batch
    from ds_ring.training.loss import causal_lm_loss

    model = copy.deepcopy(base)
    config = ds_config(cfg)
    if name == DPO:
        return _build_dpo(model, copy.deepcopy(base), config, world)
    if name == "FSDP2 long":
        return _build_fsdp2(model, world)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    if name != "ALST":
        sp = ds_ring.init_sequence_parallel(world, layout="zigzag")
        ds_ring.patch(model, sp=sp)
        options = DS_RING_OPTIONS[name]
        if options is not None:
            ds_ring.optimize_memory(model, sp, **options)
        engine, *_ = ds_ring.deepspeed_initialize(model, sp, config, optimizer=opt,
                                                  release_parameters=False if name in ON_REQUEST else None)

        def step(batch):
            local = shard_batch(batch, sp)
            labels = local.pop("shift_labels")
            if options is not None and options.get("chunked_loss", True):
                loss = engine(**local, shift_labels=labels).loss
            else:
                loss = causal_lm_loss(engine(**local).logits, labels, sp)
            engine.backward(loss)
            engine.step()
            return loss.item()

        return engine, step, lambda: ds_ring.offload_context(model)
    return _build_alst(model, config, opt, cfg, world)


class _NoEngine:
    def destroy(self):
        pass


def _build_fsdp2(model, world):
    """``ds_ring long`` under torch FSDP2: patch, the memory switch, ``ds_ring.fully_shard``, AdamW over the shards."""
    import ds_ring
    from ds_ring.training.data import shard_batch

    sp = ds_ring.init_sequence_parallel(world, layout="zigzag")
    ds_ring.optimize_memory(ds_ring.patch(model, sp=sp), sp)
    ds_ring.fully_shard(model, sp)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def step(batch):
        local = shard_batch(batch, sp)
        labels = local.pop("shift_labels")
        loss = model(**local, shift_labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return _NoEngine(), step, lambda: ds_ring.offload_context(model)


class _TrainerEngine:
    def __init__(self, trainer):
        self.trainer = trainer

    def destroy(self):
        self.trainer.accelerator.free_memory()  # the policy's engine (what accelerate prepared)
        self.trainer.ref_model.destroy()  # TRL's DeepSpeed engine of the reference model


def _word_tokenizer(vocab):
    """Offline tokenizer for the random-weight model: "w<i>" is token i, "<eos>" the last one, "w0" padding (TRL
    needs one to build its dataset; the measured steps give it token ids directly)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {f"w{i}": i for i in range(vocab - 1)} | {"<eos>": vocab - 1}
    tok = Tokenizer(models.WordLevel(words, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0", pad_token="w0", eos_token="<eos>")


def _build_dpo(model, ref, config, world):
    """``ds_ring long DPO``: TRL's ``DPOTrainer`` itself through ``ds_ring.SequenceParallelMixin`` with
    ``memory="long"`` (ds_ring's DPO adapter: checkpointing, tiled MLP and offload on the policy; TRL's fused LM
    head in place of the chunked loss, sharded over the ring by the adapter), ZeRO-3 from the same config as the other
    candidates (micro batch 1 pair, clipping 1.0), TRL's AdamW, sigmoid loss (beta 0.1), a frozen reference copy of
    the same weights passed as ``ref_model=``: TRL wraps it in its own ZeRO-3 DeepSpeed engine (``prepare_deepspeed``,
    no optimizer), so its parameters are sharded over the ranks like the policy's and its shards, held between steps,
    are not counted, as the policy's are not; its forward (under no_grad) and the parameters ZeRO-3 gathers for it
    are. One warm-up ``trainer.train()`` of one step creates the engine and the optimizer states; each measured step
    is ``trainer.training_step`` on one pair as TRL's ``DataCollatorForPreference`` batches it (chosen and rejected
    rows of S tokens each: a prompt of S // 2 tokens, completions of S - S // 2): the policy's fused forward on both
    rows, the reference's under no_grad, TRL's DPO loss from the ring-summed sequence log-probabilities, and
    accelerate's backward, which is ``engine.backward`` and ``engine.step``. S is the length of ONE sequence of the
    pair.

    The adapter's memory switch also tiles the reference's MLPs and norms and bounds TRL's fused LM-head tile to
    ds_ring's loss chunk rows (``ds_ring.integrations.dpo.DPOAdapter.setup``): before it did (e0e72e1), TRL's head
    tile alone held over 4 GiB on this CPU whatever S."""
    import tempfile

    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    import ds_ring

    class SPDPO(ds_ring.SequenceParallelMixin, DPOTrainer):
        pass

    vocab = model.config.vocab_size
    args = DPOConfig(
        output_dir=tempfile.mkdtemp(prefix="bench_longest_dpo_"), per_device_train_batch_size=1,
        gradient_accumulation_steps=1, max_steps=1, learning_rate=1e-3, optim="adamw_torch",
        lr_scheduler_type="constant", max_grad_norm=1.0, beta=DPO_BETA, max_length=None, use_cpu=True, bf16=False,
        deepspeed=copy.deepcopy(config), report_to=[], disable_tqdm=True, save_strategy="no", logging_steps=10**9,
        dataset_num_proc=None, seed=0)
    row = {"prompt": " ".join(f"w{i % (vocab - 3) + 3}" for i in range(64)),
           "chosen": " " + " ".join(f"w{i % (vocab - 3) + 3}" for i in range(5, 69)), "rejected": " w4 w5"}
    trainer = SPDPO(model=model, ref_model=ref, args=args, processing_class=_word_tokenizer(vocab),
                    train_dataset=Dataset.from_list([row]), memory="long")
    trainer.train()  # one step: the policy's DeepSpeed engine (accelerate's prepare) and its optimizer states
    collate = trainer.data_collator

    def step(batch):
        ids = batch["input_ids"][0]
        S = ids.shape[0]
        prompt, chosen = ids[: S // 2].tolist(), ids[S // 2:].tolist()
        pair = collate([{"prompt_ids": prompt, "chosen_ids": chosen, "rejected_ids": chosen[::-1]}])
        trainer.model_wrapped.train()
        return trainer.training_step(trainer.model_wrapped, pair).item()

    # the mixin's training_step enters ds_ring.offload_context itself
    return _TrainerEngine(trainer), step, contextlib.nullcontext


def _build_alst(model, config, opt, cfg, world):
    import deepspeed
    import torch.distributed as dist
    from deepspeed.runtime.activation_checkpointing.offload_activations import (
        get_checkpoint_hidden_states_offloading_ctx_manager,
    )
    from deepspeed.runtime.sequence_parallel.ulysses_sp import TiledFusedLogitsLoss, TiledMLP, UlyssesSPAttentionHF

    from ds_ring.training.loss import LOSS_CHUNK_ELEMENTS

    if world > 1:
        mpu = UlyssesSPAttentionHF.register_with_transformers(
            model_name_or_path=model, core_attn_implementation="sdpa", sequence_parallel_size=world,
            micro_batch_size=1, seq_length_is_variable=True)
        group, rank = mpu.get_sequence_parallel_group(), mpu.get_sequence_parallel_rank()
    else:  # one GPU: ALST's recipe without Ulysses
        mpu, group, rank = None, None, 0
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})

    def tiled_mlp_forward(self, x):  # ArcticTraining's tiled_mlp_forward_common, on DeepSpeed 0.19's TiledMLP
        shards = torch.tensor(math.ceil(x.shape[1] / x.shape[2]), device=x.device)
        dist.all_reduce(shards, op=dist.ReduceOp.MAX)
        params = [self.down_proj.weight, self.gate_proj.weight, self.up_proj.weight]
        return TiledMLP.apply(lambda m, t: m.down_proj(m.act_fn(m.gate_proj(t)) * m.up_proj(t)), self, x,
                              int(shards.item()), params)

    for layer in model.model.layers:
        layer.mlp.forward = tiled_mlp_forward.__get__(layer.mlp)
    engine, *_ = deepspeed.initialize(model=model, config=copy.deepcopy(config), mpu=mpu, optimizer=opt)
    offload = get_checkpoint_hidden_states_offloading_ctx_manager()

    def loss_fn(self, x, y):  # ArcticTraining's fused_logits_loss_fn: sum of token losses of one chunk
        logits = self.lm_head(x)
        good = (y != -100).sum()
        if good == 0:
            return (logits.sum() * 0.0).float()
        return self.loss_function(logits=logits, labels=None, vocab_size=self.config.vocab_size,
                                  shift_labels=y) * good

    def step(batch):
        inputs = shard_ulysses(batch, rank, world)
        labels = inputs.pop("shift_labels")
        hidden = engine.module.model(**inputs, use_cache=False).last_hidden_state
        shards = math.ceil(labels.numel() * cfg["vocab"] / LOSS_CHUNK_ELEMENTS)
        total = TiledFusedLogitsLoss.apply(loss_fn, engine.module, hidden, labels, None, shards,
                                           [engine.module.lm_head.weight], "sum")
        loss = ulysses_mean(total / (labels != -100).sum().clamp(min=1), labels, group)
        engine.backward(loss)
        engine.step()
        return loss.item()

    return engine, step, lambda: offload


# ----- worker: search or time --------------------------------------------------------------------------------------

def _setup(cfg):
    warnings.filterwarnings("ignore")
    os.environ.setdefault("ACCELERATE_DISABLE_RICH", "1")
    import deepspeed
    import transformers
    from deepspeed.utils import logger as ds_logger
    from transformers import AutoModelForCausalLM

    ds_logger.setLevel(logging.ERROR)
    transformers.logging.set_verbosity_error()
    deepspeed.init_distributed(dist_backend="gloo" if not torch.cuda.is_available() else "nccl")
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(model_config(cfg), attn_implementation="sdpa",
                                            dtype=C.dtype_of(cfg["dtype"]))
    return base.to("cuda" if torch.cuda.is_available() else "cpu")


def _measure(step, context, S, cfg, seed):
    """One step at S: its peak bytes above the level before it (worse rank), on CUDA also the absolute peak, and its
    wall time; ``peak`` is None when it ran out of memory (CUDA)."""
    import torch.distributed as dist

    from ds_ring.planning.op_memory import measure_peak_bytes

    cuda = cfg["device"] == "cuda"
    batch = {k: v.to(cfg["device"]) for k, v in _batch(S, cfg["vocab"], seed).items()}
    gc.collect()
    dist.barrier()
    t0 = time.perf_counter()
    stats = torch.zeros(4, dtype=torch.float64, device=cfg["device"])  # peak, absolute peak, wall, out of memory
    try:
        with context():
            if cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
                before = torch.cuda.memory_allocated()
                step(batch)
                stats[0], stats[1] = torch.cuda.max_memory_allocated() - before, torch.cuda.max_memory_allocated()
            else:
                stats[0] = measure_peak_bytes(lambda: step(batch))
    except torch.cuda.OutOfMemoryError:
        stats[3] = 1
    del batch
    stats[2] = time.perf_counter() - t0
    dist.all_reduce(stats, op=dist.ReduceOp.MAX)
    peak = None if stats[3].item() else int(stats[0].item())
    return {"S": S, "peak": peak, "total": int(stats[1].item()) if cuda and peak else None, "wall": stats[2].item()}


def _fit(points):
    """Least-squares line (intercept, slope) through (S, peak) points."""
    xs, ys = zip(*points)
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx else 0.0
    return my - b * mx, b


def _aim(runs, cap, lo, grid):
    """Where the next step goes: between the longest fitting and the shortest failing length, the line through their
    peaks (its slope is positive whatever the run-to-run noise); with no failure yet, the least-squares line through
    the fitting ones, at most 1.5x the longest that fits."""
    fit = [(r["S"], r["peak"]) for r in runs if r["fits"]]
    over = [(r["S"], r["peak"]) for r in runs if not r["fits"] and r["peak"] is not None]
    if fit and over:
        (s1, p1), (s2, p2) = max(fit), min(over)
        if s2 > s1 and p2 > p1:
            return int(s1 + (cap - p1) * (s2 - s1) / (p2 - p1))
        return (s1 + s2) // 2
    if over:  # nothing fits yet (or the step ran out of memory): halve
        return min(s for s, _ in over) // 2
    a, b = _fit(fit) if len({s for s, _ in fit}) > 1 else (0.0, 0.0)
    target = int((cap - a) / b) if b > 0 else 2 * max(lo, grid)
    return min(target, int(1.5 * max(lo, grid)))


def search_worker(rank, world, payload):
    """Calibration steps, then the search for the longest S under the cap; every rank takes the same decisions."""
    import torch.distributed as dist

    cfg, name = payload
    cfg = dict(cfg, device="cuda" if torch.cuda.is_available() else "cpu")
    base = _setup(cfg)
    engine, step, context = build_candidate(name, base, cfg, world)
    del base
    cap, grid, deadline = cfg["cap_bytes"], cfg["grid"], time.monotonic() + cfg["budget_s"]
    runs, seed = [], 0

    def run(S):
        nonlocal seed
        r = _measure(step, context, S, cfg, seed)
        seed += 1
        r["fits"] = r["peak"] is not None and (cfg["device"] == "cuda" or r["peak"] <= cap)
        runs.append(r)
        if rank == 0:
            state = "OOM" if r["peak"] is None else ("fits" if r["fits"] else "over the cap")
            peak = "-" if r["peak"] is None else f"{r['peak'] / 2**20:,.0f} MiB"
            print(f"  [{name}] S={S:,}: step peak {peak} ({state}), {r['wall']:.1f} s", flush=True)
        return r["fits"]

    for S in cfg["warmup_seq_lens"]:  # optimizer states, ZeRO-3's trace; not data points
        _measure(step, context, S, cfg, 10**6 + S)
    for S in cfg["calibration"].get(name, []):
        run(S)
    lo = max([r["S"] for r in runs if r["fits"]], default=0)
    hi = min([r["S"] for r in runs if not r["fits"]], default=None)
    target = cfg["aim"].get(name)
    for _ in range(cfg["max_runs"]):
        step_size = max(grid, int(lo * cfg["resolution"]) // grid * grid)
        if (hi is not None and hi - lo <= step_size) or time.monotonic() > deadline:
            break
        if target is None:
            target = _aim(runs, cap, lo, grid)
        target = target // grid * grid
        if target <= lo:  # always inside (lo, hi), one step away from what is known
            target = lo + step_size
        if hi is not None and target >= hi:
            target = max(lo + grid, (hi - step_size) // grid * grid)
        if run(target):
            lo = target
        else:
            hi = target if hi is None else min(hi, target)
        target = None
    engine.destroy()
    dist.barrier()
    return {"runs": runs, "longest": lo, "shortest_over": hi}


def time_worker(rank, world, payload):
    """Step time of each candidate at each of ``cfg['time_seq_lens']``: steps interleaved (order rotated), the
    slowest rank's wall time, after ``cfg['warmup']`` steps each; also every step's loss (same batches; the same
    weights at the first length's first step only, so only those losses must agree: after it each candidate has taken
    its own AdamW steps, which turn rounding differences between implementations into visible ones)."""
    import torch.distributed as dist

    cfg, names = payload
    cfg = dict(cfg, device="cuda" if torch.cuda.is_available() else "cpu")
    base = _setup(cfg)
    cands = {n: build_candidate(n, base, cfg, world) for n in names}
    del base
    out = {}
    for S in cfg["time_seq_lens"]:
        samples, losses = {n: [] for n in names}, {n: [] for n in names}
        for rep in range(cfg["warmup"] + cfg["repeat"]):
            batch = {k: v.to(cfg["device"]) for k, v in _batch(S, cfg["vocab"], 1000 + rep).items()}
            for n in list(names[rep % len(names):]) + list(names[: rep % len(names)]):
                _, step, context = cands[n]
                dist.barrier()
                t0 = time.perf_counter()
                with context():
                    loss = step(batch)
                t = torch.tensor([time.perf_counter() - t0], dtype=torch.float64, device=cfg["device"])
                dist.all_reduce(t, op=dist.ReduceOp.MAX)
                if rep >= cfg["warmup"]:
                    samples[n].append(t.item())
                losses[n].append(loss)
        out[S] = {"samples": samples, "losses": losses}
        if rank == 0:
            print(f"  S={S:,}: " + ", ".join(f"{n} {statistics.median(v):.2f} s" for n, v in samples.items()),
                  flush=True)
    for engine, _, _ in cands.values():
        engine.destroy()
    return out


# ----- exactness of the loss (in this process) ---------------------------------------------------------------------

def exactness(cfg, tokens, threads):
    """The LM head + loss of the benchmark model's shape on ``tokens`` random hidden states (10 % of targets
    ignored), fp32: ``chunked_causal_lm_loss``, ``causal_lm_loss`` on full logits, and ALST's recipe
    (``TiledFusedLogitsLoss`` summing chunk losses, then the division by the valid tokens), each against float64."""
    import torch.nn.functional as F
    from deepspeed.runtime.sequence_parallel.ulysses_sp import TiledFusedLogitsLoss

    import ds_ring
    from ds_ring.training.loss import LOSS_CHUNK_ELEMENTS

    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    V, h = cfg["vocab"], cfg["hidden"]
    head = torch.nn.Linear(h, V, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.randn(V, h, generator=g) / h**0.5)
    x0 = torch.randn(1, tokens, h, generator=g)
    y = torch.randint(0, V, (1, tokens), generator=g)
    y[torch.rand(1, tokens, generator=g) < 0.1] = -100

    def run(fn, dtype):
        x = x0.to(dtype).clone().requires_grad_(True)
        head.to(dtype).zero_grad(set_to_none=True)
        loss = fn(x)
        loss.backward()
        return loss.double(), x.grad.double(), head.weight.grad.double()

    ref = run(lambda x: F.cross_entropy(head(x).reshape(-1, V), y.reshape(-1), ignore_index=-100), torch.float64)

    def alst(x):
        shards = math.ceil(tokens * V / LOSS_CHUNK_ELEMENTS)
        total = TiledFusedLogitsLoss.apply(
            lambda m, xs, ys: F.cross_entropy(m(xs).float().reshape(-1, V), ys.reshape(-1), ignore_index=-100,
                                              reduction="sum"), head, x, y, None, shards, [head.weight], "sum")
        return total / (y != -100).sum()

    cands = {"ds_ring chunked_causal_lm_loss": lambda x: ds_ring.chunked_causal_lm_loss(x, head, y, None),
             "causal_lm_loss (full logits)": lambda x: ds_ring.causal_lm_loss(head(x), y, None),
             "ALST TiledFusedLogitsLoss, sum / valid tokens": alst}
    out = {}
    for name, fn in cands.items():
        got = run(fn, torch.float32)
        rel = [((a - b).norm() / b.norm()).item() for a, b in zip(got, ref)]
        out[name] = dict(loss=rel[0], hidden_grad=rel[1], weight_grad=rel[2],
                         weight_grad_norm_ratio=(got[2].norm() / ref[2].norm()).item())
    return {"tokens": tokens, "valid": int((y != -100).sum()), "errors": out}


# ----- main --------------------------------------------------------------------------------------------------------

RUN_TIMEOUT_S = 12 * 3600  # one spawn runs a whole search: hours at the longest lengths on a shared 2-core box
# Llama-3.2-1B's shape (random weights); its head is tied to the embedding, which ALST's loss cannot train under ZeRO-3,
# so the GPU comparison unties it unless --tied.
LLAMA_1B = dict(vocab=128256, hidden=2048, intermediate=8192, layers=16, heads=32, kv_heads=8, head_dim=64,
                rope_theta=500000.0)


def plan_for(name, cfg, S, world, count_held=False, device_memory=None):
    import ds_ring

    return ds_ring.plan(model_config(cfg), S, sp_size=world, dtype=cfg["dtype"], ds_config=ds_config(cfg),
                        device_memory=device_memory, count_held=count_held, **PLAN_OPTIONS[name])


def plot(result, png):
    plt = C.pyplot()
    cfg, world = result["cfg"], result["world"]
    fig, ax = plt.subplots(figsize=(8, 5))
    top = 0
    for k, (name, srch) in enumerate(result["searches"].items()):
        pts = sorted((r["S"], r["peak"]) for r in srch["runs"] if r["peak"] is not None)
        if not pts:
            continue
        top = max(top, max(s for s, _ in pts))
        ax.plot([s for s, _ in pts], [p / 2**30 for _, p in pts], "o", color=f"C{k}",
                label=f"{name}: measured, longest {srch['longest']:,}")
        if name in PLAN_OPTIONS and not result["gpu"]:
            grain = 2 * world
            xs = sorted({int(pts[0][0] * 0.8 * 1.15**i) // grain * grain for i in range(60)
                         if pts[0][0] * 0.8 * 1.15**i <= 1.2 * pts[-1][0]})
            ys = [plan_for(name, dict(cfg, dtype="fp32"), x, world).step_peak_bytes / 2**30 for x in xs]
            ax.plot(xs, ys, "--", color=f"C{k}", lw=1, label=f"{name}: ds_ring.plan")
    if not result["gpu"]:
        ax.axhline(result["cap_bytes"] / 2**30, color="gray", lw=0.8, label=f"cap {result['cap_bytes'] / 2**30:g} GiB")
    ax.set(xscale="log", yscale="log", xlabel=f"sequence length S (tokens, P={world})",
           ylabel="step peak per rank (GiB)" + (" above the level before the step" if not result["gpu"] else ""),
           title="one ZeRO-3 training step: peak memory per rank")
    ax.legend(fontsize=7)
    C.save_fig(fig, png)


def add_model_shape_args(p) -> None:
    """The Llama-shaped model's sizes (the check shape of section 10 by default); bench_timeline.py takes them too."""
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--intermediate", type=int, default=2816)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=32)


def main():
    p = C.base_parser(__doc__.split("\n\n")[0])
    p.add_argument("--candidates", nargs="+", default=[n for n in NAMES if n not in ON_REQUEST], choices=NAMES)
    add_model_shape_args(p)
    p.add_argument("--tied", action="store_true", help="LM head tied to the embedding (default: separate; ALST's "
                   "TiledFusedLogitsLoss fails on a tied head under ZeRO-3: the weight's gradient enters DeepSpeed's "
                   "reduce bucket twice)")
    p.add_argument("--cap-gib", type=float, default=2.0, help="per-rank cap on one step's peak (CPU)")
    p.add_argument("--grid", type=int, default=1024, help="searched lengths are multiples of this")
    p.add_argument("--resolution", type=float, default=0.04, help="stop when fit and over are this close (relative)")
    p.add_argument("--max-runs", type=int, default=6, help="search steps per candidate after calibration")
    p.add_argument("--budget-s", type=float, default=1e9, help="no new search step after this many seconds")
    p.add_argument("--time-seq-lens", type=int, nargs="*", default=[4096, 6144], help="where step times are compared")
    p.add_argument("--time-candidates", nargs="*",
                   default=[n for n in NAMES if n not in ("ALST", DPO) + ON_REQUEST],
                   choices=[n for n in NAMES if n != DPO],
                   help="timed side by side in one pair of processes (each holds its own engine)")
    p.add_argument("--planner-check", type=str, default="512,1376,4,8,4,64",
                   help="a second shape (hidden,intermediate,layers,heads,kv_heads,head_dim; untied) measured at "
                   "two lengths per ds_ring candidate against ds_ring.plan ('' to skip)")
    p.add_argument("--sft-longest", type=int, default=None,
                   help="ds_ring long's longest from an earlier run of this script (docs/performance.md section 10), "
                   "where it is not searched in this run: the DPO search's first aim and the 'x ds_ring long' column")
    p.add_argument("--gpu", action="store_true", help="one GPU: Llama-3.2-1B shape, bf16, ds_config/zero3_offload.json")
    p.add_argument("--suffix", default="")
    p.add_argument("--at", type=int, nargs="+", default=None, help="measure each candidate at these lengths only: no "
                   "search, planner check, timing or exactness (to look again at a search's boundary)")
    p.add_argument("--time-only", action="store_true", help="step times only (--time-candidates at --time-seq-lens): "
                   "no search, planner check or exactness")
    p.set_defaults(warmup=1, repeat=3)
    args = p.parse_args()
    world = 1 if args.gpu else 2
    cfg = dict(vocab=args.vocab, hidden=args.hidden, intermediate=args.intermediate, layers=args.layers,
               heads=args.heads, kv_heads=args.kv_heads, head_dim=args.head_dim, tied=args.tied,
               dtype="float32", ds_config="zero3.json", cap_bytes=int(args.cap_gib * 2**30), grid=args.grid,
               resolution=args.resolution, max_runs=args.max_runs, budget_s=args.budget_s,
               warmup_seq_lens=[256, 512], warmup=args.warmup, repeat=args.repeat,
               time_seq_lens=args.time_seq_lens)
    calibration = {"ds_ring": [2048, 4096], "ds_ring+ckpt": [2048, 4096], "ds_ring tiled": [8192, 16384],
                   "ds_ring long": [8192, 16384], DPO: [8192, 16384], "FSDP2 long": [8192, 16384],
                   "ALST": [8192, 16384], "ds_ring long keep": [8192, 16384]}
    # quick: four candidates (no memory option, all of them, all of them for a DPO step, DeepSpeed's ALST) at one
    # length each, no search
    if C.quick_sizes(args, planner_check="", candidates=["ds_ring", "ds_ring long", DPO, "ALST"],
                     time_candidates=["ds_ring", "ds_ring long"]):
        cfg.update(vocab=512, hidden=64, intermediate=176, layers=1, cap_bytes=96 * 2**20, grid=128, max_runs=0,
                   warmup_seq_lens=[128], time_seq_lens=[256], warmup=0, repeat=1)
        calibration = {n: [256] for n in NAMES}
    if args.gpu:
        if not torch.cuda.is_available():
            p.error("--gpu needs a CUDA device")
        if DPO in args.candidates:
            p.error(f"--gpu: {DPO} runs on the CPU ranks only (TRL's DPOConfig(use_cpu=True))")
        cfg.update(LLAMA_1B, tied=args.tied, dtype="bfloat16", ds_config="zero3_offload.json", grid=16384,
                   warmup_seq_lens=[4096], time_seq_lens=[])
        calibration = {}
    if args.at:
        calibration = {n: args.at for n in NAMES}
        cfg.update(max_runs=0, time_seq_lens=[])
        args.planner_check = ""
    if args.time_only:
        args.candidates, args.planner_check = list(args.time_candidates), ""
    cfg["calibration"] = calibration
    device_memory = torch.cuda.mem_get_info()[1] if args.gpu else None
    dtype_name = "bf16" if cfg["dtype"] == "bfloat16" else "fp32"
    cfg["dtype"] = dtype_name
    print(f"Llama-shaped model: hidden {cfg['hidden']}, intermediate {cfg['intermediate']}, {cfg['layers']} layers, "
          f"{cfg['heads']} heads / {cfg['kv_heads']} KV heads of {cfg['head_dim']}, vocabulary {cfg['vocab']}"
          f"{' (tied)' if cfg['tied'] else ''}; {dtype_name}; ZeRO-3 ({cfg['ds_config']}) or FSDP2; P={world}; "
          + (f"device memory {device_memory / 2**30:.1f} GiB" if args.gpu else
             f"cap {cfg['cap_bytes'] / 2**30:g} GiB per rank on one step's peak"), flush=True)
    cfg["dtype"] = "bfloat16" if args.gpu else "float32"
    t_start = time.perf_counter()

    # where to look first: the planner for ds_ring's ZeRO-3 candidates, ds_ring long's result for ALST and FSDP2
    searches, aims = {}, {}
    plan_cfg = dict(cfg, dtype=dtype_name)
    for name in [] if args.time_only else args.candidates:
        if name in PLAN_OPTIONS:
            aims[name] = plan_for(name, plan_cfg, None, world, count_held=args.gpu,
                                  device_memory=device_memory or cfg["cap_bytes"]).longest_seq_len
        elif name == DPO and (searches.get("ds_ring long", {}).get("longest") or args.sft_longest):
            # a pair is two sequences of S (policy forward and backward on both, a reference forward): a little
            # under half of SFT's longest
            aims[name] = int(DPO_AIM * (searches.get("ds_ring long", {}).get("longest") or args.sft_longest))
        elif "ds_ring long" in searches:
            aims[name] = searches["ds_ring long"]["longest"]
        print(f"\n{name}: search (first aim {aims.get(name) or 'from the calibration line'})", flush=True)
        res = C.run_ranks(search_worker, world, (dict(cfg, aim={name: aims.get(name)}), name),
                          threads=args.threads, timeout_s=RUN_TIMEOUT_S)[0]
        searches[name] = res
    # planner check on a second shape: two lengths per ds_ring candidate
    check = {}
    if args.planner_check and not args.gpu:
        h, i, n, hq, hkv, d = (int(x) for x in args.planner_check.split(","))
        cfg2 = dict(cfg, hidden=h, intermediate=i, layers=n, heads=hq, kv_heads=hkv, head_dim=d, tied=False,
                    max_runs=0, calibration={"ds_ring": [4096, 8192], "ds_ring+ckpt": [4096, 8192],
                                             "ds_ring tiled": [16384, 32768], "ds_ring long": [16384, 32768]})
        for name in [c for c in args.candidates if c in PLAN_OPTIONS]:
            print(f"\nplanner check, shape {args.planner_check}: {name}", flush=True)
            check[name] = C.run_ranks(search_worker, world, (dict(cfg2, aim={}), name), threads=args.threads, timeout_s=RUN_TIMEOUT_S)[0]
    # step times
    timing = {}
    time_names = [n for n in args.time_candidates if n in args.candidates]
    if cfg["time_seq_lens"] and time_names:
        print(f"\nstep time, interleaved: {time_names} at S={cfg['time_seq_lens']}", flush=True)
        timing = C.run_ranks(time_worker, world, (cfg, tuple(time_names)), threads=args.threads, timeout_s=RUN_TIMEOUT_S)[0]
    exact = None if args.gpu or args.at or args.time_only else exactness(cfg, 4096 if not args.quick else 256, args.threads)
    elapsed = time.perf_counter() - t_start

    # ----- tables
    off = searches.get("ds_ring", {}).get("longest")
    sft = searches.get("ds_ring long", {}).get("longest") or args.sft_longest
    rows = []
    for name, srch in searches.items():
        at = next((r for r in srch["runs"] if r["S"] == srch["longest"]), None)
        pred = aims.get(name) if name in PLAN_OPTIONS else None
        rows.append([name, f"{srch['longest']:,}", "-" if srch["shortest_over"] is None else
                     f"{srch['shortest_over']:,}", "-" if at is None or at["peak"] is None else at["peak"] / 2**20,
                     "-" if pred is None else f"{pred:,}",
                     "-" if not pred or not srch["longest"] else pred / srch["longest"],
                     "-" if not off else srch["longest"] / off, "-" if not sft else srch["longest"] / sft,
                     len(srch["runs"])])
    long_md = C.print_table(
        "Longest sequence by real steps (a length that fits and the shortest that did not), and ds_ring.plan's "
        f"prediction ({DPO}: S is each sequence of the chosen/rejected pair)",
        ["candidate", "longest S that fits", "shortest S over", "step peak there (MiB)", "ds_ring.plan's longest",
         "plan / measured", "x ds_ring (off)", "x ds_ring long", "steps run"], rows)
    pv = []
    for src, results in (("main", searches), ("check", check)):
        for name, srch in results.items():
            if name not in PLAN_OPTIONS or args.gpu:
                continue
            shape_cfg = dict(plan_cfg) if src == "main" else dict(
                plan_cfg, **dict(zip(("hidden", "intermediate", "layers", "heads", "kv_heads", "head_dim"),
                                     (int(x) for x in args.planner_check.split(",")))), tied=False)
            for r in srch["runs"]:
                pl = plan_for(name, shape_cfg, r["S"], world)
                r["plan"] = pl.step_peak_bytes
                pv.append([src, name, f"{r['S']:,}", r["peak"] / 2**20, pl.step_peak_bytes / 2**20,
                           pl.step_peak_bytes / r["peak"], pl.peak_phase])
    plan_md = C.print_table("ds_ring.plan's step peak against every measured step (per rank)",
                            ["shape", "candidate", "S", "measured (MiB)", "planned (MiB)", "planned / measured",
                             "planned peak moment"], pv) if pv else None
    time_md = None
    if timing:
        base_names = [n for n in ("ds_ring", "ds_ring+ckpt", "ds_ring long", "ds_ring long keep") if n in time_names]
        trows = []
        for S, t in timing.items():
            med = {n: statistics.median(v) for n, v in t["samples"].items()}
            for n in time_names:
                first = t["losses"][n][0]
                trows.append([f"{S:,}", n, med[n], med[n] / S * 1e6, min(t["samples"][n])]
                             + [med[n] / med[b] for b in base_names]
                             + [f"{first:.6f}", f"{abs(first - t['losses'][time_names[0]][0]):.1e}"])
        time_md = C.print_table(
            "Step time (slowest rank, median of interleaved steps) and the first step's loss at each length (same "
            "batch; same weights at the first length only: then each candidate's own AdamW steps)",
            ["S", "candidate", "step (s)", "us / token", "best (s)"] + [f"/ {b}" for b in base_names]
            + ["first-step loss", f"|diff| vs {time_names[0]}"], trows)
    exact_md = None
    if exact:
        exact_md = C.print_table(
            f"LM head + loss, fp32, {exact['tokens']} tokens ({exact['valid']} valid targets), vocabulary "
            f"{cfg['vocab']}, hidden {cfg['hidden']}: relative error against float64",
            ["loss", "value", "dL/d hidden", "dL/d weight", "|dW| / |dW float64|"],
            [[n, e["loss"], e["hidden_grad"], e["weight_grad"], e["weight_grad_norm_ratio"]]
             for n, e in exact["errors"].items()])
    print(f"\n(whole run {elapsed / 60:.0f} min)")
    result = dict(cfg=cfg, world=world, gpu=args.gpu, cap_bytes=cfg["cap_bytes"], device_memory=device_memory,
                  searches=searches, aims=aims, planner_check=check, timing={str(k): v for k, v in timing.items()},
                  exactness=exact, sft_longest_given=args.sft_longest,
                  tables=dict(longest=long_md, planner=plan_md, time=time_md, exactness=exact_md),
                  elapsed_s=elapsed)
    C.finish(args, "bench_longest" + ("_gpu" if args.gpu else "") + args.suffix, result,
             None if args.time_only else lambda png: plot(result, png))
    return 0


if __name__ == "__main__":
    main()
