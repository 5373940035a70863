"""Two-dimensional sequence parallelism on 4 CPU ranks: (Ulysses u, ring R) = (1, 4), (2, 2), (4, 1).

Causal attention fwd+bwd of one layer (zigzag over ring positions, GQA), all three factorizations in the SAME four
spawned processes (gloo on 127.0.0.1, one thread each), interleaved step by step (order rotated every repetition):
per factorization the slowest rank's wall time and CPU time (median), per-rank peak bytes (``measure_peak_bytes``),
and the bytes each rank sends (all-to-all, K/V, dK/dV) next to ``ds_ring.planning.cost_model``'s count.

The machine has 2 cores for 4 processes: ranks take turns on a core, so a rank waiting for a peer that is not
running costs wall time that a real cluster would not pay, and the wall times mostly measure that contention. CPU
time per step (what each rank computes and copies) and the bytes are the meaningful columns here; on GPUs the cost
model (``ds-ring plan``) predicts the time.

    python benchmarks/bench_2d.py                 # S = 4096 and 8192
    python benchmarks/bench_2d.py --quick         # seconds
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.distributed as dist

import _common as C
import ds_ring

GRIDS = [(1, 4), (2, 2), (4, 1)]


def _job(rank: int, world: int, cfg: dict) -> dict:
    from ds_ring.planning.cost_model import AttentionShape, Cluster, predict

    sps = {u: ds_ring.init_sequence_parallel(world, ulysses_size=u, layout="zigzag") for u, _ in GRIDS}
    out = {}
    for S in cfg["seq_lens"]:
        B, H, HKV, D = 1, cfg["heads"], cfg["kv_heads"], cfg["head_dim"]
        g = torch.Generator().manual_seed(0)
        full = [torch.randn(B, h, S, D, generator=g) for h in (H, HKV, HKV, H)]
        local = {}
        for u, sp in sps.items():
            pos = sp.sequence_layout.positions(S // world, world, sp.sp_rank)
            local[u] = [t[:, :, pos].contiguous() for t in full]

        def step(u):
            sp = sps[u]
            q, k, v = (t.clone().requires_grad_() for t in local[u][:3])
            o = ds_ring.ring_dilated_attention(q, k, v, causal=True, group=sp.ring_group, layout=sp.layout,
                                               ulysses_group=sp.ulysses_group)
            o.backward(local[u][3])

        wall, cpu = {u: [] for u, _ in GRIDS}, {u: [] for u, _ in GRIDS}
        for rep in range(cfg["warmup"] + cfg["repeat"]):
            order = [u for u, _ in GRIDS]
            order = order[rep % 3:] + order[: rep % 3]
            for u in order:
                dist.barrier()
                t0, c0 = time.perf_counter(), time.process_time()
                step(u)
                dt, dc = time.perf_counter() - t0, time.process_time() - c0
                slowest = torch.tensor([dt, dc], dtype=torch.float64)
                dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
                if rep >= cfg["warmup"]:
                    wall[u].append(slowest[0].item())
                    cpu[u].append(slowest[1].item())
        for u, R in GRIDS:
            peak = ds_ring.measure_peak_bytes(lambda: step(u))
            with ds_ring.count_comm() as c:
                step(u)
            want = predict(AttentionShape(H, HKV, D, 4), S, world, u, Cluster(4, 1.0, 1.0, 1.0, 1.0),
                           causal=True, layout="zigzag").per_position[sps[u].ring_rank]
            out[(S, u)] = dict(wall=statistics.median(wall[u]), cpu=statistics.median(cpu[u]), peak=peak,
                               a2a=c.sent_bytes.get("ulysses all-to-all", 0),
                               ring=c.sent_bytes.get("kv", 0) + c.sent_bytes.get("dkv", 0),
                               model_a2a=want.a2a_intra + want.a2a_inter, model_ring=want.ring_intra + want.ring_inter)
    return out


def plot(rows, png):
    plt = C.pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, key, label in zip(axes, ("cpu_s", "peak_mib", "sent_mib"),
                              ("CPU time per step, slowest rank (s)", "peak MiB per rank", "MiB sent per rank")):
        for S in sorted({r["S"] for r in rows}):
            sel = [r for r in rows if r["S"] == S]
            ax.bar([f"{r['grid']}\nS={S}" for r in sel], [r[key] for r in sel])
        ax.set_title(label, fontsize=9)
        ax.tick_params(labelsize=7)
    fig.suptitle("(Ulysses u, ring R) on 4 CPU ranks, causal fwd+bwd of one attention layer", fontsize=10)
    C.save_fig(fig, png)


def main():
    p = C.base_parser(__doc__.split("\n\n")[0])
    p.add_argument("--seq-lens", type=int, nargs="+", default=[4096, 8192])
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=64)
    args = p.parse_args()
    C.quick_sizes(args, seq_lens=[128])
    cfg = dict(seq_lens=args.seq_lens, heads=args.heads, kv_heads=args.kv_heads, head_dim=args.head_dim,
               warmup=args.warmup, repeat=args.repeat)
    res = C.run_ranks(_job, 4, cfg, threads=args.threads)
    rows = []
    for S in args.seq_lens:
        for u, R in GRIDS:
            per_rank = [r[(S, u)] for r in res]
            rows.append(dict(S=S, grid=f"({u}, {R})", u=u, R=R, wall_s=per_rank[0]["wall"], cpu_s=per_rank[0]["cpu"],
                             peak_mib=max(r["peak"] for r in per_rank) / 2**20,
                             sent_mib=max(r["a2a"] + r["ring"] for r in per_rank) / 2**20,
                             bytes_match=all(r["a2a"] == r["model_a2a"] and r["ring"] == r["model_ring"]
                                             for r in per_rank),
                             a2a_mib=max(r["a2a"] for r in per_rank) / 2**20,
                             ring_mib=max(r["ring"] for r in per_rank) / 2**20))
    md = C.print_table(
        f"Causal attention fwd+bwd of one layer on 4 CPU ranks (2 cores), H={args.heads}, Hkv={args.kv_heads}, "
        f"D={args.head_dim}, fp32, zigzag; median of {args.repeat} interleaved steps",
        ["S", "(u, R)", "wall s (slowest rank)", "CPU s (slowest rank)", "peak MiB / rank", "all-to-all MiB sent",
         "ring MiB sent", "bytes = cost model"],
        [[r["S"], r["grid"], r["wall_s"], r["cpu_s"], r["peak_mib"], r["a2a_mib"], r["ring_mib"],
          "yes" if r["bytes_match"] else "NO"] for r in rows])
    C.finish(args, "bench_2d", dict(threads=args.threads, rows=rows, table_markdown=md), lambda png: plot(rows, png))


if __name__ == "__main__":
    main()
