"""A ZeRO-3 training step of a small Hugging Face Llama at P=2: ds_ring (dense ring attention) vs DeepSpeed Ulysses.

Both candidates run in the SAME two spawned processes (gloo on 127.0.0.1, one thread each), on the same random
weights (one model built from a config with a fixed seed, deep-copied before either wraps it) and the same data
(random tokens, labels = input_ids), each under its own ``deepspeed.initialize`` with ds_config/zero3.json
("auto" filled: micro batch 1, no accumulation, clipping 1.0, fp32):

  * ds_ring: ``ds_ring.patch`` (dense pattern, zigzag layout), ``shard_batch``, ``causal_lm_loss``, and
    ``ds_ring.deepspeed_initialize`` (which scales the ZeRO-3 loss by sp_size inside ``engine.backward``);
  * Ulysses: ``UlyssesSPAttentionHF.register_with_transformers(model, "sdpa", 2, 1)`` (patches "sdpa", returns the
    mpu passed to ``deepspeed.initialize``), the batch sharded exactly as ``UlyssesSPDataLoaderAdapter`` does
    (global ``position_ids``, labels shifted into ``shift_labels`` before a contiguous split), and the loss of
    transformers' ``deepspeed_sp_compute_loss``: the model's own loss on ``shift_labels``, then a differentiable
    all-gather over the SP group and a mean weighted by valid tokens.

Per sequence length S: step time = forward + ``engine.backward`` + ``engine.step``, barrier before, the slowest
rank's wall time; the two candidates alternate step by step (order rotated every repetition) after warm-up steps,
median reported; ratios are ratios of medians from the same run. Memory per rank, measured once per candidate on a
separate (untimed) step: ``ds_ring.measure_peak_bytes`` (torch profiler's CPU allocation events: peak live bytes
above those live before the step, so ZeRO-3 shards and Adam states held between steps are excluded) and the
process's peak-RSS growth (VmHWM after resetting it through /proc/self/clear_refs, minus RSS before). The first
step's loss of both must agree within 1e-3 (same weights, same data). "Longest S under the cap": the per-token
slope of the peak-bytes fit (least squares, peak = a + b*S over the measured S), extrapolated to the cap.

    python benchmarks/bench_ulysses.py                    # S in 1k, 2k, 4k, 8k; cap 2 GiB
    python benchmarks/bench_ulysses.py --profile          # also: where each candidate's step time goes
    python benchmarks/bench_ulysses.py --quick            # < 60 s smoke run
"""

from __future__ import annotations

import copy
import gc
import json
import logging
import os
import statistics
import time
import warnings
from pathlib import Path

import torch

import _common as C

ROOT = C.ROOT


def _model_config(cfg):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=cfg["vocab"], hidden_size=cfg["hidden"], intermediate_size=cfg["intermediate"],
        num_hidden_layers=cfg["layers"], num_attention_heads=cfg["heads"], num_key_value_heads=cfg["kv_heads"],
        max_position_embeddings=max(cfg["seq_lens"]) * 2, rope_theta=10000.0, rms_norm_eps=1e-5,
        attention_dropout=0.0, tie_word_embeddings=False, use_cache=False, bos_token_id=1, eos_token_id=2,
        pad_token_id=0,
    )


def _ds_config(cfg):
    from ds_ring.integrations.deepspeed import load_config

    return load_config(ROOT / "ds_config" / "zero3.json", fill={
        "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "gradient_clipping": 1.0,
        "bf16.enabled": False,
    })


def _batch(S, vocab, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (1, S), generator=g)
    return {"input_ids": ids, "labels": ids.clone()}


def shard_ulysses(batch, sp_rank, sp_world):
    """This rank's part of a full batch, as DeepSpeed's ``UlyssesSPDataLoaderAdapter.refill`` makes it: global
    ``position_ids``, labels shifted into ``shift_labels`` before a contiguous split."""
    b = dict(batch)
    b["position_ids"] = torch.arange(b["input_ids"].shape[1]).unsqueeze(0)
    labels = torch.nn.functional.pad(b.pop("labels"), (0, 1), value=-100)
    b["shift_labels"] = labels[..., 1:].contiguous()
    chunk = b["input_ids"].shape[1] // sp_world
    return {k: v[:, chunk * sp_rank: chunk * (sp_rank + 1)] for k, v in b.items()}


def ulysses_mean(local_loss, shift_labels, group):
    """transformers' ``deepspeed_sp_compute_loss``: each rank's mean loss, all-gathered (differentiable) over the
    SP group and averaged weighted by valid tokens."""
    import torch.distributed.nn.functional as dist_fn

    losses = torch.stack(dist_fn.all_gather(local_loss, group=group))
    good = (shift_labels != -100).view(-1).sum()
    goods = torch.stack(dist_fn.all_gather(good, group=group))
    safe = torch.where(goods > 0, losses, torch.zeros_like(losses))
    return (safe * goods).sum() / goods.sum().clamp(min=1)


def _worker(rank, world, cfg):
    warnings.filterwarnings("ignore")
    os.environ.setdefault("ACCELERATE_DISABLE_RICH", "1")
    import deepspeed
    import torch.distributed as dist
    import transformers
    from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF
    from deepspeed.utils import logger as ds_logger
    from transformers import AutoModelForCausalLM

    import ds_ring
    from ds_ring.training.data import shard_batch
    from ds_ring.training.loss import causal_lm_loss
    from ds_ring.planning.op_memory import measure_peak_bytes

    ds_logger.setLevel(logging.ERROR)
    transformers.logging.set_verbosity_error()
    deepspeed.init_distributed(dist_backend="gloo")
    sp = ds_ring.init_sequence_parallel(world, layout=cfg["layout"])
    config = _ds_config(cfg)

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(_model_config(cfg), attn_implementation="sdpa")
    model_u = copy.deepcopy(base)
    model_r = ds_ring.patch(base, sp=sp, segment_lengths=None, dilation_rates=None)
    mpu_u = UlyssesSPAttentionHF.register_with_transformers(
        model_name_or_path=model_u, core_attn_implementation="sdpa", sequence_parallel_size=world,
        micro_batch_size=1, seq_length_is_variable=True)
    sp_group_u = mpu_u.get_sequence_parallel_group()
    sp_rank_u, sp_world_u = mpu_u.get_sequence_parallel_rank(), mpu_u.get_sequence_parallel_world_size()

    eng_r, *_ = ds_ring.deepspeed_initialize(model_r, sp, config,
                                             optimizer=torch.optim.AdamW(model_r.parameters(), lr=cfg["lr"]))
    eng_u, *_ = deepspeed.initialize(model=model_u, config=copy.deepcopy(config), mpu=mpu_u,
                                     optimizer=torch.optim.AdamW(model_u.parameters(), lr=cfg["lr"]))

    # ----- one training step of each candidate; returns the loss value --------------------------------------------
    def step_ring(batch):
        local = shard_batch(batch, sp)
        labels = local.pop("shift_labels")
        loss = causal_lm_loss(eng_r(**local, use_cache=False).logits, labels, sp)
        eng_r.backward(loss)
        eng_r.step()
        return loss.item()

    def step_ulysses(batch):
        inputs = shard_ulysses(batch, sp_rank_u, sp_world_u)
        inputs["labels"] = inputs["shift_labels"]  # transformers.integrations.deepspeed.deepspeed_sp_compute_loss
        out = eng_u(**inputs, use_cache=False)
        loss = ulysses_mean(out.loss, inputs["shift_labels"], sp_group_u)
        eng_u.backward(loss)
        eng_u.step()
        return loss.item()

    steps = {"ds_ring": step_ring, "ulysses": step_ulysses}

    def timed(fn, batch):
        dist.barrier()
        t0, c0 = time.perf_counter(), time.process_time()
        loss = fn(batch)
        t = torch.tensor([time.perf_counter() - t0, time.process_time() - c0], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return (t[0].item(), t[1].item()), loss

    results = []
    seed = 0
    for S in cfg["seq_lens"]:
        row = {"S": S}
        names = list(steps)
        # first step of this S: same weights only at the very first S (later S see weights each engine trained);
        # both engines have taken the same number of steps on the same batches, so losses keep agreeing.
        batch = _batch(S, cfg["vocab"], seed)
        seed += 1
        first = {n: timed(steps[n], batch) for n in names}
        row["first_loss"] = {n: first[n][1] for n in names}
        for _ in range(cfg["warmup"] - 1):
            batch = _batch(S, cfg["vocab"], seed)
            seed += 1
            for n in names:
                steps[n](batch)
        samples = {n: [] for n in names}
        losses = {n: [] for n in names}
        cpu = {n: [] for n in names}
        for rep in range(cfg["repeat"]):
            batch = _batch(S, cfg["vocab"], seed)
            seed += 1
            order = names[rep % 2:] + names[: rep % 2]
            got = {}
            for n in order:
                got[n] = timed(steps[n], batch)
            for n in names:
                samples[n].append(got[n][0][0])
                cpu[n].append(got[n][0][1])
                losses[n].append(got[n][1])
        row["step_s"] = {n: statistics.median(samples[n]) for n in names}
        row["step_s_min"] = {n: min(samples[n]) for n in names}
        row["cpu_s"] = {n: statistics.median(cpu[n]) for n in names}
        row["samples"] = samples
        row["cpu_samples"] = cpu
        row["losses"] = losses
        # memory: one untimed step each, same batch
        batch = _batch(S, cfg["vocab"], seed)
        seed += 1
        row["peak_bytes"], row["rss_growth"] = {}, {}
        for n in names:
            gc.collect()
            dist.barrier()
            rss0 = C.reset_peak_rss()
            peak = measure_peak_bytes(lambda: steps[n](batch))
            row["rss_growth"][n] = C.peak_rss() - rss0
            row["peak_bytes"][n] = peak
        if cfg["profile"] and S == max(cfg["seq_lens"]):
            profs = {n: [] for n in names}
            for rep in range(2):  # interleaved, like the timing
                for n in names[rep % 2:] + names[: rep % 2]:
                    profs[n].append(_profile_step(steps[n], _batch(S, cfg["vocab"], seed + rep)))
            row["profile"] = {n: _merge_profiles(profs[n]) for n in names}
        seed += 1
        results.append(row)
        if rank == 0:
            print(f"S={S}: step (median) ds_ring {row['step_s']['ds_ring']:.3f}s ulysses {row['step_s']['ulysses']:.3f}s; "
                  f"peak ds_ring {row['peak_bytes']['ds_ring'] / 2**20:.0f} MiB ulysses "
                  f"{row['peak_bytes']['ulysses'] / 2**20:.0f} MiB; first loss {row['first_loss']}", flush=True)
    eng_r.destroy()
    eng_u.destroy()
    return results


# Self CPU time of profiler ops, by category (first match wins).
_CATEGORIES = (
    ("attention kernel", lambda k: "scaled_dot_product" in k),
    ("matmul", lambda k: k in ("aten::mm", "aten::addmm", "aten::bmm")),
    ("ring autograd shell (P2P waits + Python)", lambda k: k.startswith("_RingDilatedAttention")),
    ("communication ops (incl. waits inside)", lambda k: k.startswith("c10d::") or "all_to_all" in k
     or "alltoall" in k or k in ("_AllGather", "_AllGatherBackward") or "AllGather" in k),
    ("other ops", lambda k: True),
)


def _profile_step(fn, batch):
    """One step under the torch profiler: wall time and self CPU time by op and by category."""
    import torch.distributed as dist
    from torch.profiler import ProfilerActivity, profile

    dist.barrier()
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn(batch)
    wall = time.perf_counter() - t0
    ops = {e.key: [e.self_cpu_time_total / 1e6, e.count] for e in prof.key_averages()}
    return {"wall_s": wall, "ops": ops}


def _merge_profiles(profs):
    """Mean over the profiled steps: wall, self time by category, the top ops."""
    n = len(profs)
    ops = {}
    for p in profs:
        for k, (t, c) in p["ops"].items():
            o = ops.setdefault(k, [0.0, 0])
            o[0] += t / n
            o[1] += c / n
    cats = {name: 0.0 for name, _ in _CATEGORIES}
    for k, (t, _) in ops.items():
        for name, match in _CATEGORIES:
            if match(k):
                cats[name] += t
                break
    wall = sum(p["wall_s"] for p in profs) / n
    total = sum(cats.values())
    cats["not in any op (Python, idle)"] = max(wall - total, 0.0)
    top = sorted(((k, t, c) for k, (t, c) in ops.items()), key=lambda r: -r[1])[:25]
    return {"wall_s": wall, "walls": [p["wall_s"] for p in profs], "categories_s": cats, "top": top}


def _fit(xs, ys):
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx else 0.0
    return my - b * mx, b


def kernel_check(cfg, repeat):
    """Isolated, in this process, one thread: per layer, the attention kernel calls each candidate makes per rank at
    the largest S (forward, then backward), and the two loss functions on one rank's logits (forward + backward).

    ds_ring, zigzag at P=2 with c = S/4: rank 0 holds chunks {0, 3}: causal (2c x 2c) local block, then its c rows of
    chunk 3 against the 2c received keys (backward: two c x c key parts, sent home one by one); rank 1 holds {1, 2}:
    causal local block, then its 2c rows against the c keys of chunk 0. Ulysses: causal S x S over Hq/2, Hkv/2 heads.
    """
    from transformers.loss.loss_utils import ForCausalLMLoss

    import ds_ring
    from ds_ring.training.loss import causal_lm_loss

    fwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    bwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
    S, H, Hkv, D = max(cfg["seq_lens"]), cfg["heads"], cfg["kv_heads"], cfg["hidden"] // cfg["heads"]
    c = S // 4
    g = torch.Generator().manual_seed(0)

    def rnd(h, n):  # HF's layout: (B, L, H, D) transposed to (B, H, L, D)
        return torch.randn(1, n, h, D, generator=g).transpose(1, 2)

    def calls(blocks):  # blocks: (q, k, v, causal) -> fwd and bwd thunks
        prepared = []
        for q, k, v, causal in blocks:
            out, lse = fwd(q, k, v, 0.0, causal)
            prepared.append((q, k, v, causal, out, lse, torch.randn_like(out)))
        return (lambda: [fwd(q, k, v, 0.0, cz) for q, k, v, cz, *_ in prepared],
                lambda: [bwd(d, q, k, v, o, l, 0.0, cz) for q, k, v, cz, o, l, d in prepared])

    qa, ka, va = rnd(H, 2 * c), rnd(Hkv, 2 * c), rnd(Hkv, 2 * c)
    kr, vr = rnd(Hkv, 2 * c).contiguous(), rnd(Hkv, 2 * c).contiguous()  # received buffers are contiguous
    q3 = qa[:, :, c:].contiguous()  # rank 0's rows of chunk 3 (gathered)
    r0f, _ = calls([(qa, ka, va, True), (q3, kr, vr, False)])
    _, r0b = calls([(qa, ka, va, True), (q3, kr[:, :, :c], vr[:, :, :c], False), (q3, kr[:, :, c:], vr[:, :, c:], False)])
    r1f, r1b = calls([(qa, ka, va, True), (qa, kr[:, :, :c], vr[:, :, :c], False)])
    # Ulysses: after the all-to-all the tensors are made contiguous in (B, H/2, S, D)
    qu, ku, vu = rnd(H // 2, S).contiguous(), rnd(Hkv // 2, S).contiguous(), rnd(Hkv // 2, S).contiguous()
    uf, ub = calls([(qu, ku, vu, True)])

    sp1 = ds_ring.init_sequence_parallel(1)
    logits = torch.randn(1, S // 2, cfg["vocab"], generator=g, requires_grad=True)
    labels = torch.randint(0, cfg["vocab"], (1, S // 2), generator=g)

    def loss_ring():
        causal_lm_loss(logits, labels, sp1).backward()

    def loss_hf():
        ForCausalLMLoss(logits, None, cfg["vocab"], shift_labels=labels).backward()

    fns = {"ds_ring rank 0 fwd": r0f, "ds_ring rank 1 fwd": r1f, "Ulysses fwd": uf,
           "ds_ring rank 0 bwd": r0b, "ds_ring rank 1 bwd": r1b, "Ulysses bwd": ub,
           "ds_ring causal_lm_loss fwd+bwd": loss_ring, "HF ForCausalLMLoss fwd+bwd": loss_hf}
    res = C.bench_interleaved(fns, 1, repeat)
    return {k: v["median"] for k, v in res.items()}


def plot(rows, fits, cap, png):
    plt = C.pyplot()
    xs = [r["S"] for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for n, m, c in (("ds_ring", "o", "C0"), ("ulysses", "s", "C1")):
        ax1.plot(xs, [r["step_s"][n] for r in rows], m + "-", color=c, label=f"{n}: wall (median)")
        if "cpu_s" in rows[0]:
            ax1.plot(xs, [r["cpu_s"][n] for r in rows], m + ":", color=c, alpha=0.7, label=f"{n}: CPU time (median)")
        ax2.plot(xs, [r["peak_bytes"][n] / 2**30 for r in rows], m, color=c, label=f"{n}: measured")
        f = fits[n]
        sx = [xs[0], f["longest_S"]]
        ax2.plot(sx, [(f["intercept_bytes"] + f["bytes_per_token"] * x) / 2**30 for x in sx], "--", color=c, lw=1,
                 label=f"{n}: linear fit -> {f['longest_S'] / 1e3:.1f}k tokens at the cap")
    ax2.axhline(cap / 2**30, color="gray", lw=0.8, label=f"cap {cap / 2**30:g} GiB")
    ax1.set(xscale="log", yscale="log", xlabel="sequence length S (tokens, P=2)", ylabel="seconds per step",
            title="ZeRO-3 training step, slowest rank")
    ax1.minorticks_off()
    ax1.set_xticks(xs, [str(x) for x in xs])
    ax2.set(xscale="log", yscale="log", xlabel="sequence length S (tokens, P=2)", ylabel="GiB per rank",
            title="step peak (torch allocations), worst rank")
    for ax in (ax1, ax2):
        ax.legend(fontsize=7)
    C.save_fig(fig, png)


def main():
    p = C.base_parser(__doc__.split("\n\n")[0])
    p.add_argument("--seq-lens", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--intermediate", type=int, default=688)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--layout", default="zigzag", choices=["zigzag", "contiguous"], help="ds_ring's layout")
    p.add_argument("--cap-gib", type=float, default=2.0, help="per-rank cap on the step's peak bytes")
    p.add_argument("--profile", action="store_true", help="profile two steps of each at the largest S")
    p.add_argument("--suffix", default="", help="appended to the output names (e.g. _rerun for a confirmation run)")
    p.set_defaults(warmup=2, repeat=7)
    p.add_argument("--kernels", action="store_true",
                   help="also time the attention kernel calls and loss functions of each candidate in isolation")
    p.add_argument("--replot", type=Path, default=None, help="only redraw the PNG from this JSON")
    args = p.parse_args()
    if args.replot:
        d = json.loads(args.replot.read_text())
        plot(d["rows"], d["fits"], d["cap_bytes"], args.replot.parent.parent.parent / "docs" /
             (args.replot.stem + ".png") if args.out_dir is None else args.out_dir / (args.replot.stem + ".png"))
        return 0
    C.quick_sizes(args, seq_lens=[128], layers=1)
    if args.dtype != "float32":
        p.error("only float32 (CPU, ZeRO-3 fp32) is supported")
    cfg = dict(seq_lens=args.seq_lens, hidden=args.hidden, intermediate=args.intermediate, layers=args.layers,
               heads=args.heads, kv_heads=args.kv_heads, vocab=args.vocab, layout=args.layout, lr=1e-3,
               warmup=max(1, args.warmup), repeat=args.repeat, profile=args.profile, threads=args.threads,
               cap_gib=args.cap_gib)
    print(f"Llama hidden {args.hidden}, {args.layers} layers, {args.heads} heads / {args.kv_heads} kv heads, vocab "
          f"{args.vocab}; ZeRO-3 fp32; P=2 ranks (gloo, 127.0.0.1), torch.set_num_threads({args.threads}) each; "
          f"S={args.seq_lens}; warm-up {cfg['warmup']}, {args.repeat} timed steps per candidate", flush=True)
    t_start = time.perf_counter()
    res = C.run_ranks(_worker, 2, cfg, threads=args.threads)
    elapsed = time.perf_counter() - t_start
    rows = []
    for S_idx, S in enumerate(args.seq_lens):
        per = [r[S_idx] for r in res]
        row = dict(S=S, step_s=per[0]["step_s"], step_s_min=per[0]["step_s_min"], samples=per[0]["samples"],
                   cpu_s=per[0]["cpu_s"], cpu_samples=per[0]["cpu_samples"],
                   first_loss=per[0]["first_loss"], losses=per[0]["losses"],
                   peak_bytes={n: max(r["peak_bytes"][n] for r in per) for n in ("ds_ring", "ulysses")},
                   rss_growth={n: max(r["rss_growth"][n] for r in per) for n in ("ds_ring", "ulysses")},
                   per_rank=[{k: r[k] for k in ("peak_bytes", "rss_growth")} for r in per])
        if "profile" in per[0]:
            row["profile"] = [r["profile"] for r in per]
        row["time_ratio"] = row["step_s"]["ds_ring"] / row["step_s"]["ulysses"]
        row["best_ratio"] = row["step_s_min"]["ds_ring"] / row["step_s_min"]["ulysses"]
        row["cpu_ratio"] = row["cpu_s"]["ds_ring"] / row["cpu_s"]["ulysses"]
        row["mem_ratio"] = row["peak_bytes"]["ds_ring"] / row["peak_bytes"]["ulysses"]
        row["first_loss_diff"] = abs(row["first_loss"]["ds_ring"] - row["first_loss"]["ulysses"])
        rows.append(row)

    kernels = None
    if args.kernels:
        torch.set_num_threads(args.threads)
        k = kernel_check(cfg, max(3, args.repeat))
        L = args.layers
        kernels = dict(per_layer_s=k, ratios={
            "fwd rank 0": k["ds_ring rank 0 fwd"] / k["Ulysses fwd"], "fwd rank 1": k["ds_ring rank 1 fwd"] / k["Ulysses fwd"],
            "bwd rank 0": k["ds_ring rank 0 bwd"] / k["Ulysses bwd"], "bwd rank 1": k["ds_ring rank 1 bwd"] / k["Ulysses bwd"],
            "loss": k["ds_ring causal_lm_loss fwd+bwd"] / k["HF ForCausalLMLoss fwd+bwd"]})
        print(f"\nIsolated (one process, {args.threads} thread), S={max(args.seq_lens)}: attention kernels per layer "
              f"(x{L} layers per step) and the loss on one rank's logits:")
        for name, t in k.items():
            print(f"  {t * 1e3:9.1f} ms  {name}")
        print("  ds_ring / Ulysses: " + ", ".join(f"{n} {v:.3f}" for n, v in kernels["ratios"].items()))
    cap = args.cap_gib * 2**30
    fits = {}
    xs = [r["S"] for r in rows]
    for n in ("ds_ring", "ulysses") if len(set(xs)) > 1 else ():
        a, b = _fit(xs, [r["peak_bytes"][n] for r in rows])
        s_max = (cap - a) / b if b > 0 else float("inf")
        fits[n] = dict(intercept_bytes=a, bytes_per_token=b, longest_S=s_max,
                       longest_pow2=2 ** int(torch.log2(torch.tensor(max(s_max, 1.0))).floor().item()))

    headers = ["S (tokens)", "ds_ring step (s)", "Ulysses step (s)", "ds_ring / Ulysses time (median)",
               "(best)", "CPU time ratio",
               "ds_ring peak / rank (MiB)", "Ulysses peak / rank (MiB)", "ds_ring / Ulysses peak",
               "ds_ring RSS growth (MiB)", "Ulysses RSS growth (MiB)", "first-step loss ds_ring", "Ulysses",
               "|diff|"]
    table = [[r["S"], r["step_s"]["ds_ring"], r["step_s"]["ulysses"], r["time_ratio"], r["best_ratio"],
              r["cpu_ratio"],
              r["peak_bytes"]["ds_ring"] / 2**20, r["peak_bytes"]["ulysses"] / 2**20, r["mem_ratio"],
              r["rss_growth"]["ds_ring"] / 2**20, r["rss_growth"]["ulysses"] / 2**20,
              f"{r['first_loss']['ds_ring']:.6f}", f"{r['first_loss']['ulysses']:.6f}",
              f"{r['first_loss_diff']:.1e}"] for r in rows]
    md = C.markdown_table(headers, table)
    cap_headers = ["candidate", "peak bytes / token (fit)", "intercept (MiB)", f"longest S under {args.cap_gib:g} GiB",
                   "largest power of two"]
    cap_table = [[n, fits[n]["bytes_per_token"], fits[n]["intercept_bytes"] / 2**20, f"{fits[n]['longest_S']:,.0f}",
                  fits[n]["longest_pow2"]] for n in fits]
    cap_md = C.markdown_table(cap_headers, cap_table)
    print()
    print("Training step at P=2, ZeRO-3, median step time (slowest rank), CPU time (process time of the slowest rank, "
          "median), peak memory per rank (worst rank; torch "
          "allocations above the pre-step level, ds_ring.measure_peak_bytes)")
    print(md)
    print()
    if fits:
        print(f"Longest sequence under a {args.cap_gib:g} GiB per-rank cap on the step's peak bytes (linear fit over "
              f"S={xs}, extrapolated)")
        print(cap_md)
    ok = all(r["first_loss_diff"] < 1e-3 for r in rows)
    print(f"\nfirst-step losses agree within 1e-3 at every S: {ok}; max |loss diff| over all steps: "
          f"{max(max(abs(a - b) for a, b in zip(r['losses']['ds_ring'], r['losses']['ulysses'])) for r in rows):.2e}")
    for r in rows:
        if "profile" not in r:
            continue
        for rank, prof in enumerate(r["profile"]):
            for n in ("ds_ring", "ulysses"):
                pr = prof[n]
                print(f"\nprofile S={r['S']} rank {rank} {n}: wall {pr['wall_s']:.2f}s (mean of "
                      f"{len(pr['walls'])} profiled steps); self CPU time by category:")
                for key, t in pr["categories_s"].items():
                    print(f"  {t:8.3f}s  {key}")
                print("  top ops by self time:")
                for key, t, cnt in pr["top"][:10]:
                    print(f"  {t:8.3f}s  {cnt:6.0f}  {key}")
    prof_rows = [r for r in rows if "profile" in r]
    prof_md = None
    if prof_rows:
        r = prof_rows[-1]
        cats = list(r["profile"][0]["ds_ring"]["categories_s"])
        cols = [(rank, n) for rank in range(len(r["profile"])) for n in ("ds_ring", "ulysses")]
        prof_md = C.markdown_table(
            ["self CPU time (s), S=%d" % r["S"]] + [f"rank {rank} {n}" for rank, n in cols],
            [[c] + [r["profile"][rank][n]["categories_s"][c] for rank, n in cols] for c in cats]
            + [["wall (profiled step)"] + [r["profile"][rank][n]["wall_s"] for rank, n in cols]])
        print("\nProfile by category (mean of the profiled steps, both ranks):")
        print(prof_md)
    print(f"\n(whole run {elapsed:.0f} s)")

    C.finish(args, "bench_ulysses" + args.suffix,
             dict(cfg=cfg, cap_bytes=cap, fits=fits, rows=rows, first_loss_agree=ok, table_markdown=md,
                  cap_table_markdown=cap_md, profile_table_markdown=prof_md, kernels=kernels, elapsed_s=elapsed),
             (lambda png: plot(rows, fits, cap, png)) if fits else None)
    return 0


if __name__ == "__main__":
    main()
