"""Quick run of the benchmark scripts under benchmarks/ (``ds-ring bench``): each with ``--quick``, tables printed.

The scripts live in the source tree (benchmarks/), next to this package; the full-size commands and the latest
results are in docs/performance.md. Quick mode uses tiny sizes and one or two repetitions: it checks that the
benchmarks run and shows the table layout; its timings are not the reported numbers.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

# every benchmarks/bench_*.py (tests/test_bench.py checks that none is missing and runs each one's quick mode)
SCRIPTS = ("bench_kernel", "bench_causal_blocks", "bench_dilated", "bench_ring", "bench_memory", "bench_ulysses",
           "bench_startup", "bench_syncs", "bench_packing", "bench_2d", "bench_longest", "bench_precision",
           "bench_timeline")


def bench_dir() -> Path:
    d = Path(__file__).resolve().parents[2] / "benchmarks"  # ds_ring/tools/bench.py -> the checkout
    if not (d / "bench_kernel.py").is_file():
        raise SystemExit(
            f"ds-ring bench: the benchmark scripts are not next to the package ({d} is missing): run it from a source "
            "checkout installed with `pip install -e .`"
        )
    return d


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="ds-ring bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--only", nargs="+", choices=SCRIPTS, default=list(SCRIPTS), help="which benchmarks to run")
    p.add_argument("--full", action="store_true", help="full sizes instead of --quick (minutes to tens of minutes)")
    p.add_argument("--out-dir", default=None, help="where PNG/JSON go (default: a temporary folder in quick mode)")
    args = p.parse_args(argv)
    d = bench_dir()
    out_dir = args.out_dir
    if out_dir is None and not args.full:
        import tempfile

        out_dir = tempfile.mkdtemp(prefix="ds_ring_bench_")
    failed = []
    for name in args.only:
        cmd = [sys.executable, str(d / f"{name}.py")] + ([] if args.full else ["--quick"])
        if out_dir:
            cmd += ["--out-dir", out_dir]
        print(f"\n=== {' '.join(cmd[1:])}", flush=True)
        if subprocess.run(cmd).returncode:
            failed.append(name)
    if failed:
        print(f"ds-ring bench: failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
