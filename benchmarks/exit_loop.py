"""Exit codes of repeated 2-rank torchrun runs (issue 13: a finished run must exit 0 every time, no SIGABRT at exit).

    python benchmarks/exit_loop.py --runs 30                      # ds_ring cases on this checkout
    git archive 4764b26 | tar -x -C /tmp/before                   # the code before the fix (issue 13)
    python benchmarks/exit_loop.py --runs 30 --root /tmp/before .  # both checkouts, runs interleaved
    python benchmarks/exit_loop.py --runs 30 --cases torch_late_import torch_import_first torch_global_ref \\
        torch_no_destroy --tag upstream                          # the pure-torch reproducer (docs/upstream_sigabrt.md)

With several --root checkouts, run i of every case is made on each checkout in turn, so that all see the same load
(the abort rate depends on it). Too slow for the test suite (seconds per run); the rates are in
docs/upstream_sigabrt.md.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import _common as C

HERE = Path(__file__).resolve().parent
REPRO = C.ROOT / "docs" / "upstream" / "sigabrt_repro.py"
# name -> (script, arguments); a relative script path is taken in --root
CASES = {
    "late_import": (HERE / "exit_late_import.py", []),
    "example": (Path("examples/train_long_context.py"),
                ["--deepspeed", "ds_config/zero3.json", "--sp-size", "2", "--steps", "3", "--seq-len", "64"]),
    **{f"torch_{m.replace('-', '_')}": (REPRO, ["--mode", m])
       for m in ("late-import", "import-first", "global-ref", "no-destroy")},
}


def run_once(script: Path, args: list[str], root: Path, port: int) -> tuple[int, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(root))
    cmd = ["torchrun", "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(port),
           str(script), *args]
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    return proc.returncode, proc.stdout + proc.stderr


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=30)
    p.add_argument("--cases", nargs="+", choices=list(CASES), default=["late_import", "example"])
    p.add_argument("--root", type=Path, nargs="+", default=[C.ROOT], help="checkouts whose ds_ring and example run")
    p.add_argument("--tag", default="", help="suffix of the JSON name (exit_loop_TAG.json)")
    args = p.parse_args()
    from ds_ring.tools.launch import free_port
    from tqdm.auto import tqdm

    load_before = os.getloadavg()
    roots = [r.resolve() for r in args.root]
    runs = [(root, name) for root in roots for name in args.cases]
    codes = {run: [] for run in runs}
    first_failure, seconds = {}, {run: 0.0 for run in runs}
    for _ in tqdm(range(args.runs), desc=f"{len(runs)} runs per round", file=sys.stderr):
        for root, name in runs:
            script, extra = CASES[name]
            t0 = time.perf_counter()
            rc, out = run_once(script if script.is_absolute() else root / script, extra, root, free_port())
            seconds[root, name] += time.perf_counter() - t0
            codes[root, name].append("SIGABRT" if "SIGABRT" in out or "exitcode  : -6" in out else rc)
            if rc:
                first_failure.setdefault(f"{root} {name}", out[-4000:])
    rows = [[str(root), name, args.runs, codes[root, name].count(0), args.runs - codes[root, name].count(0),
             codes[root, name].count("SIGABRT"), seconds[root, name] / args.runs] for root, name in runs]
    C.print_table(f"{args.runs} runs each, torchrun --nproc_per_node 2 (gloo), OMP_NUM_THREADS=1",
                  ["ds_ring from", "case", "runs", "exit 0", "failed", "of which SIGABRT", "s per run"], rows)
    name = "exit_loop" + (f"_{args.tag}" if args.tag else "")
    C.RESULTS.mkdir(parents=True, exist_ok=True)
    C.write_json(C.RESULTS / f"{name}.json", {
        "runs": args.runs, "cases": {n: {"args": CASES[n][1]} for n in args.cases},
        "exit": {f"{root} {n}": codes[root, n] for root, n in runs}, "first_failure_tail": first_failure,
        "loadavg_before_runs": load_before})  # (machine's loadavg is taken when the JSON is written)


if __name__ == "__main__":
    main()
