"""Ring attention at P=2 (two CPU processes over gloo on 127.0.0.1, one thread each) vs the same attention in one
process with one thread: time per token and peak memory per rank, causal with contiguous vs zigzag, overlap on/off.

Each configuration runs forward + ``torch.autograd.grad`` w.r.t. the local q, k, v. A ring repetition's time is the
slowest rank's (max over ranks, all-reduced), after a barrier. The one-process baseline is the same op with
``local=True`` on the whole sequence, in its own spawned process with ``torch.set_num_threads(1)``.

Memory per rank, two ways, in an untimed run: ``peak RSS growth`` (Linux VmHWM after resetting it via
/proc/self/clear_refs, minus RSS before; malloc's mmap threshold is pinned with MALLOC_MMAP_THRESHOLD_ so freed
blocks go back to the OS) and ``torch allocations`` (peak of live torch CPU allocations during the call, from the
torch profiler's per-allocation events, ds_ring.planning.op_memory.measure_peak_bytes). Both exclude the inputs q, k, v and the upstream gradient.

    python benchmarks/bench_ring.py                  # S=8192, H=4, D=64
    python benchmarks/bench_ring.py --seq-len 16384
    python benchmarks/bench_ring.py --quick
"""

from __future__ import annotations

import os
import statistics
import time

import torch
import torch.distributed as dist

import _common as C

TARGET = 0.6  # ring P=2 time / one-process time, non-causal and zigzag causal (issue #5)


def configs(world: int) -> list[dict]:
    if world == 1:
        return [dict(causal=False, layout="contiguous", overlap=True), dict(causal=True, layout="contiguous",
                                                                            overlap=True)]
    out = []
    for causal, layout in ((False, "contiguous"), (True, "contiguous"), (True, "zigzag")):
        for overlap in (True, False):
            out.append(dict(causal=causal, layout=layout, overlap=overlap))
    return out


def _worker(rank, world, cfg_run):
    import gc

    import ds_ring
    from ds_ring.op.attention import attend  # the op's internal entry takes the overlap knob
    from ds_ring.planning.op_memory import measure_peak_bytes

    results = []
    for cfg in configs(world):
        q, k, v, g = C.sharded_inputs(cfg_run, world, cfg["layout"])

        def step():
            o = attend(q, k, v, causal=cfg["causal"], layout=cfg["layout"], local=world == 1,
                       overlap=cfg["overlap"])
            return torch.autograd.grad(o, (q, k, v), g)

        for _ in range(cfg_run["warmup"]):
            step()
        times, cpu = [], []
        for _ in range(cfg_run["repeat"]):
            if world > 1:
                dist.barrier()
            t0, c0 = time.perf_counter(), time.process_time()
            step()
            c1 = time.process_time()
            dt = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
            if world > 1:
                dist.all_reduce(dt, op=dist.ReduceOp.MAX)
            times.append(float(dt))
            cpu.append(c1 - c0)
        rss_growth = torch_peak = None
        comm = {}
        if cfg_run.get("measure_memory", True):  # untimed
            gc.collect()
            rss0 = C.reset_peak_rss()
            step()
            rss_growth = C.peak_rss() - rss0
            torch_peak = measure_peak_bytes(step)
            if world > 1:
                with ds_ring.count_comm() as cc:
                    step()
                comm = dict(sent_bytes=dict(cc.sent_bytes), recv_bytes=dict(cc.recv_bytes))
        results.append(dict(cfg, rank=rank, times=times, cpu_times=cpu, median=statistics.median(times),
                            rss_growth=rss_growth, torch_peak=torch_peak, comm=comm))
        del q, k, v, g
    return results


def spawn(world: int, cfg_run: dict) -> list[list[dict]]:
    return C.run_ranks(_worker, world, cfg_run, threads=cfg_run["threads"])


def main():
    p = C.base_parser(__doc__.split("\n\n")[0])
    p.add_argument("--seq-len", type=int, default=8192)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--world-size", type=int, default=2)
    p.add_argument("--rounds", type=int, default=1,
                   help="alternate (one-process, ring) this many times and take the median over rounds")
    p.set_defaults(repeat=3)
    args = p.parse_args()
    C.quick_sizes(args, seq_len=256)
    S, P = args.seq_len, args.world_size
    cfg_run = dict(B=args.batch, H=args.heads, S=S, D=args.head_dim, dtype=args.dtype, threads=args.threads,
                   warmup=args.warmup, repeat=args.repeat)
    print(f"S={S} B={args.batch} H={args.heads} D={args.head_dim} {args.dtype}; torch.set_num_threads({args.threads})"
          f" in every process; P={P} ranks over gloo on 127.0.0.1; {os.cpu_count()} CPUs")
    singles, rings = [], []
    for i in range(args.rounds):
        cfg_i = dict(cfg_run, measure_memory=i == 0)
        singles.append(spawn(1, cfg_i)[0])
        rings.append(spawn(P, cfg_i))

    med = statistics.median

    def summary(samples_wall, samples_cpu):
        return dict(time=med(samples_wall), best=min(samples_wall), cpu=med(samples_cpu))

    base = {}
    for i, cfg in enumerate(configs(1)):
        rs = [s[i] for s in singles]
        base[cfg["causal"]] = dict(summary([t for r in rs for t in r["times"]], [t for r in rs for t in r["cpu_times"]]),
                                   rss=rs[0]["rss_growth"], torch_peak=rs[0]["torch_peak"],
                                   samples=[r["times"] for r in rs])
    rows = []
    for causal in (False, True):
        b = base[causal]
        rows.append(dict(setup="1 process, 1 thread", causal=causal, layout="-", overlap=None, time=b["time"],
                         best=b["best"], cpu=b["cpu"], ratio=1.0, best_ratio=1.0, cpu_ratio=1.0, rss=b["rss"],
                         torch_peak=b["torch_peak"], comm_mb=0.0, samples=b["samples"]))
    for i, cfg in enumerate(configs(P)):
        wall = [t for ring in rings for t in ring[0][i]["times"]]  # all ranks report the same all-reduced max
        cpu = [max(ring[r][i]["cpu_times"][k] for r in range(P)) for ring in rings
               for k in range(len(ring[0][i]["cpu_times"]))]
        sm = summary(wall, cpu)
        b = base[cfg["causal"]]
        first = rings[0]
        rss = max(first[r][i]["rss_growth"] for r in range(P))
        tp = max(first[r][i]["torch_peak"] for r in range(P))
        mb = sum(first[0][i]["comm"].get("sent_bytes", {}).values()) / 2**20
        rows.append(dict(setup=f"ring P={P}", causal=cfg["causal"], layout=cfg["layout"], overlap=cfg["overlap"],
                         **sm, ratio=sm["time"] / b["time"], best_ratio=sm["best"] / b["best"],
                         cpu_ratio=sm["cpu"] / b["cpu"], rss=rss, torch_peak=tp, comm_mb=mb,
                         per_rank=[ring[r][i] for ring in rings for r in range(P)]))

    def verdict(r):
        if r["setup"].startswith("1 process"):
            return ""
        if not r["overlap"]:
            return "(overlap off)"
        if r["causal"] and r["layout"] == "contiguous":
            return "n/a (no target)"
        return (("met" if r["ratio"] <= TARGET else "MISSED") + " / " + ("met" if r["best_ratio"] <= TARGET
                                                                          else "MISSED") + f" (<= {TARGET})")

    headers = ["setup", "causal", "layout", "overlap", "median fwd+bwd (ms)", "best (ms)", "us / token (median)",
               "time / 1-process (median)", "time / 1-process (best)", "CPU time / 1-process", "peak RSS growth / "
               "rank (MiB)", "torch alloc peak / rank (MiB)", "sent / rank (MiB)", "target median / best"]
    table = [[r["setup"], "yes" if r["causal"] else "no", r["layout"],
              "-" if r["overlap"] is None else ("on" if r["overlap"] else "off"), r["time"] * 1e3, r["best"] * 1e3,
              r["time"] / S * 1e6, r["ratio"], r["best_ratio"], r["cpu_ratio"], r["rss"] / 2**20,
              r["torch_peak"] / 2**20, r["comm_mb"], verdict(r)] for r in rows]
    md = C.print_table(f"Ring P={P} vs one process, S={S}, B={args.batch}, H={args.heads}, D={args.head_dim}, {args.dtype}, "
          f"torch.set_num_threads({args.threads}) per process; {args.repeat} runs x {args.rounds} alternating round(s):"
          " median and best (min) of all runs; CPU time = slowest rank's process_time, median", headers, table)
    for r in rows:
        r["verdict"] = verdict(r)

    def draw(png):
        plt = C.pyplot()
        labels = [f"{r['setup']}\n{'causal' if r['causal'] else 'full'}"
                  + ("" if r["overlap"] is None else f" {r['layout'][:6]}\noverlap {'on' if r['overlap'] else 'off'}")
                  for r in rows]
        colors = ["tab:gray" if r["overlap"] is None else ("tab:blue" if r["overlap"] else "tab:orange")
                  for r in rows]
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(13, 4.8))
        x = range(len(rows))
        a1.bar(x, [r["time"] / S * 1e6 for r in rows], color=colors)
        for i, r in enumerate(rows):
            a1.plot([i - 0.35, i + 0.35], [r["best"] / S * 1e6] * 2, "k-", lw=1.5)
            a1.text(i, r["time"] / S * 1e6, f"{r['ratio']:.2f}x\n(best {r['best_ratio']:.2f}x)", ha="center",
                    va="bottom", fontsize=6)
        a1.set_xticks(list(x), labels, fontsize=6)
        a1.set(ylabel="microseconds per token (fwd+bwd)",
               title=f"Time per token, S={S}: bar median, line best (label: vs 1 process)")
        a2.bar(x, [r["rss"] / 2**20 for r in rows], color=colors, label="peak RSS growth")
        a2.plot(list(x), [r["torch_peak"] / 2**20 for r in rows], "k_", ms=18, mew=2, label="torch alloc peak")
        a2.set_xticks(list(x), labels, fontsize=6)
        a2.set(ylabel="MiB per rank", title="Peak memory per rank (excl. inputs)")
        a2.legend(fontsize=7)
        C.save_fig(fig, png)

    C.finish(args, "bench_ring", dict(cfg=cfg_run, world_size=P, rows=rows, table_markdown=md), draw)


if __name__ == "__main__":
    main()
