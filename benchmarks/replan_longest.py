"""``ds_ring.plan`` against ``bench_longest.py``'s measured steps again, without measuring anything: the "planned"
column of docs/performance.md section 10 after a change to the planner. Reads the measured step peaks and the model
shapes from a ``bench_longest`` result (JSON) and plans every measured step with this checkout's planner. The
plans are arithmetic: they do not depend on the machine or its load.

    python benchmarks/replan_longest.py                       # benchmarks/results/bench_longest.json
    python benchmarks/replan_longest.py --json other.json --check-shape 512,1376,4,8,4,64
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import _common as C
from bench_longest import PLAN_OPTIONS, plan_for

SHAPE_KEYS = ("hidden", "intermediate", "layers", "heads", "kv_heads", "head_dim")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", default=str(C.RESULTS / "bench_longest.json"))
    p.add_argument("--check-shape", default="512,1376,4,8,4,64",
                   help="bench_longest's --planner-check shape (hidden,intermediate,layers,heads,kv_heads,head_dim)")
    args = p.parse_args()
    result = json.loads(open(args.json).read())
    cfg, world = dict(result["cfg"], dtype="fp32"), result["world"]
    check_cfg = dict(cfg, **dict(zip(SHAPE_KEYS, (int(x) for x in args.check_shape.split(",")))), tied=False)
    rows, within, worst = [], 0, (0.0, None)
    for src, shape_cfg, runs in (("main", cfg, result["searches"]), ("check", check_cfg, result["planner_check"])):
        for name, srch in runs.items():
            if name not in PLAN_OPTIONS:
                continue
            for r in srch["runs"]:
                pl = plan_for(name, shape_cfg, r["S"], world)
                ratio = pl.step_peak_bytes / r["peak"]
                within += 0.8 <= ratio <= 1.2
                worst = max(worst, (abs(ratio - 1), (src, name, r["S"], ratio)))
                rows.append([src, name, f"{r['S']:,}", r["peak"] / 2**20, pl.step_peak_bytes / 2**20, ratio,
                             pl.peak_phase])
    C.print_table(f"ds_ring.plan's step peak against every measured step of {Path(args.json).name} (per rank)",
                  ["shape", "candidate", "S", "measured (MiB)", "planned (MiB)", "planned / measured",
                   "planned peak moment"], rows)
    print(f"\nwithin 20 %: {within} of {len(rows)}; furthest: {worst[1]}")


if __name__ == "__main__":
    main()
