"""Memory scaling: measured per-rank bytes of ring_dilated_attention forward+backward vs ds_ring.memory_estimate,
for P = 1, 2, 4 at a fixed global sequence length (strong scaling).

Per rank, excluding the caller's q, k, v and upstream gradient (as the estimate does):
  * measured peak: peak of live torch CPU allocations during forward + autograd.grad, from the torch profiler's
    per-allocation events (ds_ring.planning.op_memory.measure_peak_bytes); compared with ``memory_estimate(...).peak_bytes``;
  * saved: bytes autograd keeps between forward and backward (saved-tensor hooks, unique storages, inputs included
    as the op saves them); compared with ``memory_estimate(...).saved_bytes``;
  * peak RSS growth: Linux VmHWM (reset through /proc/self/clear_refs) minus RSS before, malloc's mmap threshold
    pinned so freed blocks leave the RSS; an upper bound that includes allocator slack and communication buffers
    inside gloo.
P=1 runs the op with ``local=True`` in one process. Ranks are spawned processes over gloo on 127.0.0.1, one thread
each (the timing does not matter here; P=4 on a 2-core machine is fine).

    python benchmarks/bench_memory.py                 # S=8192, B=1, H=8, D=64, float32, P in {1, 2, 4}
    python benchmarks/bench_memory.py --dtype bfloat16 --seq-len 16384
    python benchmarks/bench_memory.py --quick
"""

from __future__ import annotations

import gc

import torch

import _common as C


def _estimate_fn():
    try:
        from ds_ring import memory_estimate
    except ImportError:
        from ds_ring.planning.op_memory import memory_estimate
    return memory_estimate


def _worker(rank, world, cfg):
    import ds_ring
    from ds_ring.planning.op_memory import measure_peak_bytes

    causal = cfg["causal"]
    q, k, v, g = C.sharded_inputs(cfg, world)

    def step():
        o = ds_ring.ring_dilated_attention(q, k, v, causal=causal, local=world == 1)
        return torch.autograd.grad(o, (q, k, v), g)

    step()  # warm-up: plan cache, lazy init
    gc.collect()
    rss0 = C.reset_peak_rss()
    step()
    rss_growth = C.peak_rss() - rss0
    torch_peak = measure_peak_bytes(step)

    storages = {}

    def pack(t):
        st = t.untyped_storage()
        storages[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        o = ds_ring.ring_dilated_attention(q, k, v, causal=causal, local=world == 1)
    saved = sum(storages.values())
    torch.autograd.grad(o, (q, k, v), g)
    return dict(rank=rank, rss_growth=rss_growth, torch_peak=torch_peak, saved=saved)


def main():
    p = C.base_parser(__doc__.split("\n\n")[0])
    p.add_argument("--seq-len", type=int, default=8192)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--world-sizes", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--causal", action="store_true")
    args = p.parse_args()
    C.quick_sizes(args, seq_len=256, world_sizes=[2])
    memory_estimate = _estimate_fn()
    S = args.seq_len
    cfg = dict(B=args.batch, H=args.heads, S=S, D=args.head_dim, dtype=args.dtype, causal=args.causal)
    dtype = C.dtype_of(args.dtype)
    print(f"S={S} B={args.batch} H={args.heads} D={args.head_dim} {args.dtype} causal={args.causal}; "
          f"torch.set_num_threads({args.threads}) per process")
    rows = []
    for P in args.world_sizes:
        res = C.run_ranks(_worker, P, cfg, threads=args.threads)
        est = memory_estimate(S, args.batch, args.heads, args.head_dim, P, dtype=dtype,
                              communicates=P > 1)
        worst = max(res, key=lambda r: r["torch_peak"])
        row = dict(P=P, torch_peak=worst["torch_peak"], saved=max(r["saved"] for r in res),
                   rss_growth=max(r["rss_growth"] for r in res),
                   est_peak=est.peak_bytes, est_saved=est.saved_bytes,
                   est_reduction=est.memory_reduction_factor, per_rank=res)
        rows.append(row)
        print(f"P={P}: torch peak {row['torch_peak'] / 2**20:.1f} MiB (estimate {est.peak_bytes / 2**20:.1f}), "
              f"saved {row['saved'] / 2**20:.1f} MiB (estimate {est.saved_bytes / 2**20:.1f}), "
              f"RSS growth {row['rss_growth'] / 2**20:.1f} MiB", flush=True)
    base = next((r for r in rows if r["P"] == 1), None)
    for r in rows:
        r["measured_reduction"] = base["torch_peak"] / r["torch_peak"] if base else None

    headers = ["P", "measured peak (MiB)", "estimate peak (MiB)", "measured / estimate", "measured saved (MiB)",
               "estimate saved (MiB)", "saved meas/est", "peak RSS growth (MiB)", "reduction vs P=1 (measured)",
               "memory_reduction_factor (estimate)"]
    table = [[r["P"], r["torch_peak"] / 2**20, r["est_peak"] / 2**20, r["torch_peak"] / r["est_peak"],
              r["saved"] / 2**20, r["est_saved"] / 2**20, r["saved"] / r["est_saved"], r["rss_growth"] / 2**20,
              "-" if r["measured_reduction"] is None else r["measured_reduction"], r["est_reduction"]]
             for r in rows]
    md = C.print_table(f"Per-rank memory, forward+backward, S={S}, B={args.batch}, H={args.heads}, D={args.head_dim}, "
          f"{args.dtype}, causal={args.causal}; worst rank", headers, table)

    def draw(png):
        plt = C.pyplot()
        fig, ax = plt.subplots(figsize=(6.5, 4.3))
        Ps = [r["P"] for r in rows]
        ax.plot(Ps, [r["torch_peak"] / 2**20 for r in rows], "o-", label="measured torch alloc peak")
        ax.plot(Ps, [r["est_peak"] / 2**20 for r in rows], "s--", label="memory_estimate().peak_bytes")
        ax.plot(Ps, [r["rss_growth"] / 2**20 for r in rows], "^:", label="measured peak RSS growth")
        ax.plot(Ps, [r["saved"] / 2**20 for r in rows], "o-", alpha=0.6, label="measured saved for backward")
        ax.plot(Ps, [r["est_saved"] / 2**20 for r in rows], "s--", alpha=0.6, label="memory_estimate().saved_bytes")
        if base:
            ax.plot(Ps, [base["torch_peak"] / P / 2**20 for P in Ps], color="gray", lw=0.8, label="P=1 peak / P")
        ax.set(xscale="log", yscale="log", xlabel="ranks P (fixed S)", ylabel="MiB per rank",
               title=f"Per-rank memory, S={S}, H={args.heads}, D={args.head_dim}, {args.dtype}")
        ax.minorticks_off()
        ax.set_xticks(Ps, [str(P) for P in Ps])
        ax.legend(fontsize=7)
        C.save_fig(fig, png)

    C.finish(args, "bench_memory", dict(cfg=cfg, rows=rows, table_markdown=md), draw)


if __name__ == "__main__":
    main()
