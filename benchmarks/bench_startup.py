"""Start-up time of ds_ring's process groups on spawned gloo ranks (CPU): ``init_sequence_parallel`` plus the
DeepSpeed model-parallel group, against how they were made up to commit 4764b26 (every rank entering every
``new_group``: all rings, all data-parallel groups and one single-rank group per rank of the world).

    python benchmarks/bench_startup.py                 # world 2, 4, 8; sp_size 2 and sp_size = world
    python benchmarks/bench_startup.py --quick         # world 2, 1 repetition

Both candidates run in the same ranks, interleaved (order rotating each repetition), each after a barrier; a
candidate's time is the slowest rank's. CPU timings on a shared box are noisy: compare the ratio, not the seconds.
"""

from __future__ import annotations

import statistics
import time

import torch.distributed as dist

import _common as C


def old_groups(sp_size: int) -> float:
    """The group creation of ds_ring.init_sequence_parallel up to commit 4764b26 (kept here as the baseline).
    Returns the seconds spent in the calls for groups this rank is not in (what grows with the world)."""
    world, rank = dist.get_world_size(), dist.get_rank()
    groups = [list(range(i * sp_size, (i + 1) * sp_size)) for i in range(world // sp_size)]  # every ring
    groups += [list(range(j, world, sp_size)) for j in range(sp_size)]  # every data-parallel group
    groups += [[r] for r in range(world)]  # the single-rank model-parallel group of each rank (DeepSpeed's mpu)
    others = 0.0
    for ranks in groups:  # every rank created every group, in the same order
        t0 = time.perf_counter()
        dist.new_group(ranks)
        if rank not in ranks:
            others += time.perf_counter() - t0
    return others


def new_groups(sp_size: int) -> float:
    """init_sequence_parallel and the DeepSpeed model-parallel group; returns the seconds of its agreement check
    (one all-reduce), timed by running the check once more on its own."""
    import ds_ring
    from ds_ring.integrations.deepspeed import DeepSpeedMPU
    from ds_ring.parallel.groups import _check_same_on_every_rank

    DeepSpeedMPU(ds_ring.init_sequence_parallel(sp_size)).get_model_parallel_group()
    t0 = time.perf_counter()
    _check_same_on_every_rank(sp_size, "contiguous", 1)  # ulysses_size 1: a plain ring
    return time.perf_counter() - t0


def _rank(rank: int, world: int, cfg: dict) -> dict:
    import torch

    cands = {"before (every rank, every group)": old_groups, "after (own groups only)": new_groups}
    names = list(cands)
    samples = {n: [] for n in names}
    parts = {n: [] for n in names}  # old: time in groups this rank is not in; new: the agreement check
    for rep in range(cfg["warmup"] + cfg["repeat"]):
        order = names[rep % 2:] + names[: rep % 2]
        for n in order:
            dist.barrier()
            t0 = time.perf_counter()
            part = cands[n](cfg["sp_size"])
            t = torch.tensor([time.perf_counter() - t0, part], dtype=torch.float64)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)  # the slowest rank's
            if rep >= cfg["warmup"]:
                samples[n].append(t[0].item())
                parts[n].append(t[1].item())
    return {"samples": samples, "parts": parts}


def main() -> None:
    p = C.base_parser(__doc__.split("\n\n")[0])
    p.add_argument("--worlds", type=int, nargs="+", default=[2, 4, 8])
    p.set_defaults(repeat=5)
    args = p.parse_args()
    C.quick_sizes(args, worlds=[2])
    rows, table = [], []
    for world in args.worlds:
        for sp_size in sorted({2, world}):
            cfg = dict(sp_size=sp_size, warmup=args.warmup, repeat=args.repeat)
            res = C.run_ranks(_rank, world, cfg, threads=args.threads)[0]
            (before, after), (others, check) = ([statistics.median(s) for s in res[k].values()]
                                                 for k in ("samples", "parts"))
            calls = world // sp_size + sp_size + world
            rows.append(dict(world=world, sp_size=sp_size, new_group_calls_per_rank={"before": calls, "after": 3},
                             median_s={"before": before, "after": after, "before_other_groups": others,
                                       "after_check": check}, **res))
            table.append([world, sp_size, f"{calls} / 3", before * 1e3, after * 1e3, before / after,
                          others / (calls - 3) * 1e6, check * 1e3])
    md = C.print_table(
        f"Group start-up on spawned gloo ranks (CPU, {args.threads} thread(s) per rank): slowest rank, median of "
        f"{args.repeat} interleaved runs",
        ["world", "sp_size", "new_group calls per rank, before / after", "before (ms)", "after (ms)",
         "before / after", "before: us per call for a group the rank is not in", "after: agreement check (ms)"],
        table)
    C.finish(args, "bench_startup", dict(rows=rows, table_markdown=md))


if __name__ == "__main__":
    main()
