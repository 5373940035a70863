"""Shared helpers for the ds_ring benchmark scripts: timing, machine description, tables, JSON and plots.

Timing rules (CPU timings are noisy, and other jobs may share the cores):
  * ``torch.set_num_threads`` is set explicitly by every script (``--threads``) and recorded in the JSON;
  * candidates that are compared are measured in the same run, interleaved round-robin (the order rotates every
    repetition), after warm-up runs, and summarised by their median; ratios are ratios of medians.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
RESULTS = ROOT / "benchmarks" / "results"


NO_MATPLOTLIB = ('matplotlib is not installed: the PNG plots are skipped this run (tables and JSON as usual); '
                 'get them with pip install -e ".[bench]"')


class _Parser(argparse.ArgumentParser):
    """Turns the plots off, saying so, when matplotlib is missing (a ``.[test]`` install has none): every script
    then runs and prints its tables instead of failing at the plot."""

    def parse_args(self, args=None, namespace=None):
        ns = super().parse_args(args, namespace)
        if not ns.no_plot:
            try:
                import matplotlib  # noqa: F401
            except ImportError:
                print(NO_MATPLOTLIB, flush=True)
                ns.no_plot = True
        return ns


def base_parser(description: str) -> argparse.ArgumentParser:
    p = _Parser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny sizes, one repetition: a smoke run of a few seconds")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads for the timed process(es)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs per candidate before timing")
    p.add_argument("--repeat", type=int, default=5, help="timed runs per candidate (the median is reported)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="q/k/v dtype")
    p.add_argument("--out-dir", type=Path, default=None,
                   help="where the PNG and JSON go (default: docs/ for the PNG, benchmarks/results/ for the JSON)")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG")
    return p


def quick_sizes(args, **sizes) -> bool:
    """``--quick``: the smoke run CI makes of every script (tests/test_bench.py), so sizes are tiny and nothing is
    repeated: one timed run, no warm-up, and ``sizes`` (argument name -> value) set on ``args``. Its timings say
    nothing; it checks that the script runs end to end and shows the table layout; its ranks fork from a preloaded
    server (``run_ranks``). Returns ``args.quick``."""
    global _fork_ranks
    if args.quick:
        _fork_ranks = True
        args.repeat, args.warmup = 1, 0
        for name, value in sizes.items():
            setattr(args, name, value)
    return args.quick


def dtype_of(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


def out_paths(args, name: str) -> tuple[Path, Path]:
    png_dir = args.out_dir or DOCS
    json_dir = args.out_dir or RESULTS
    png_dir.mkdir(parents=True, exist_ok=True)
    json_dir.mkdir(parents=True, exist_ok=True)
    suffix = "_quick" if args.quick else ""
    return png_dir / f"{name}{suffix}.png", json_dir / f"{name}{suffix}.json"


def machine() -> dict:
    """What ran the benchmark: CPU model and count, torch version, threads."""
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
    }
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            key, _, val = line.partition(":")
            if key.strip() in ("Model name", "CPU(s)", "Core(s) per socket", "Thread(s) per core", "Vendor ID"):
                info["lscpu " + key.strip()] = val.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        info["loadavg_at_start"] = os.getloadavg()
    except OSError:
        pass
    try:
        import ds_ring

        info["ds_ring"] = getattr(ds_ring, "__version__", "?")
        rev = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "ds_ring"], capture_output=True,
                               text=True, timeout=10).stdout.strip()
        info["git"] = rev + ("+dirty(ds_ring)" if dirty else "")
    except (OSError, subprocess.SubprocessError, ImportError):
        pass
    return info


def bench_interleaved(fns: dict[str, Callable[[], object]], warmup: int, repeat: int) -> dict[str, dict]:
    """Time every candidate ``repeat`` times, interleaved round-robin, after ``warmup`` untimed rounds.

    Returns {name: {"median": s, "min": s, "samples": [...]}}.
    """
    names = list(fns)
    for _ in range(warmup):
        for n in names:
            fns[n]()
    samples: dict[str, list[float]] = {n: [] for n in names}
    for rep in range(repeat):
        order = names[rep % len(names):] + names[: rep % len(names)]
        for n in order:
            t0 = time.perf_counter()
            fns[n]()
            samples[n].append(time.perf_counter() - t0)
    return {n: {"median": statistics.median(s), "min": min(s), "samples": s} for n, s in samples.items()}


def matmul_rate(dtype: torch.dtype = torch.float32, n: int = 2048, repeat: int = 5) -> float:
    """Measured dense matmul FLOP/s (n x n x n, current thread setting): the reference for achieved FLOP/s."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    c = torch.empty(n, n, dtype=dtype)
    torch.mm(a, b, out=c)
    ts = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        torch.mm(a, b, out=c)
        ts.append(time.perf_counter() - t0)
    return 2 * n**3 / statistics.median(ts)


def markdown_table(headers: list[str], rows: list[list]) -> str:
    def fmt(x):
        if isinstance(x, float):
            return f"{x:.3g}" if abs(x) < 1000 else f"{x:,.0f}"
        return str(x)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(fmt(x) for x in r) + " |" for r in rows]
    return "\n".join(lines)


def print_table(title: str, headers: list[str], rows: list[list]) -> str:
    """Print ``title`` and the markdown table; return the table."""
    md = markdown_table(headers, rows)
    print()
    print(title)
    print(md)
    return md


def write_json(path: Path, payload: dict) -> None:
    """Write ``payload`` with the command line and the machine that produced it."""
    payload = dict(command=command_line(), machine=machine(), **payload)
    path.write_text(json.dumps(payload, indent=1, default=str) + "\n")
    print(f"wrote {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")


def finish(args, name: str, payload: dict, plot: Callable[[Path], None] | None = None) -> None:
    """The end of every script: the JSON (``payload`` with the command line and the machine) and, unless
    ``--no-plot`` (or no matplotlib), the PNG drawn by ``plot(png_path)``; ``--quick`` names both ``*_quick``."""
    png, js = out_paths(args, name)
    write_json(js, payload)
    if plot is not None and not args.no_plot:
        plot(png)


def command_line() -> str:
    return "python " + " ".join([os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:])


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_fig(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")


# ----- memory on CPU -------------------------------------------------------------------------------------------

def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return -1


def reset_peak_rss() -> int:
    """Reset the kernel's peak-RSS counter (Linux ``clear_refs`` 5); returns the current RSS in bytes."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    return _status_bytes("VmRSS")


def peak_rss() -> int:
    return _status_bytes("VmHWM")


def sharded_inputs(cfg: dict, world: int, layout: str = "contiguous"):
    """q, k, v (requiring grad) and an upstream gradient g, (B, H, S/world, D) each: this rank's shards of fixed
    random full tensors (every rank draws the same ones)."""
    import ds_ring

    gen = torch.Generator().manual_seed(0)
    full = [torch.randn(cfg["B"], cfg["H"], cfg["S"], cfg["D"], generator=gen, dtype=dtype_of(cfg["dtype"]))
            for _ in range(4)]
    if world > 1:
        full = [ds_ring.shard_sequence(t, 2, layout=layout) for t in full]
    q, k, v, g = full
    return q.requires_grad_(True), k.requires_grad_(True), v.requires_grad_(True), g


# ----- spawning ranks ------------------------------------------------------------------------------------------

# In a --quick run (quick_sizes) the ranks fork from one forkserver that imported ds_ring.tools.launch.PRELOAD once
# (spawn_local's preload), instead of fresh interpreters importing torch, transformers and DeepSpeed per rank: about
# 5 s a rank on the CI's 2 cores, most of a smoke run that spawns ranks several times. Measured runs keep fresh
# interpreters, as launchers start them (a forked rank also starts with the server's imports already in its memory).
_fork_ranks = False


def run_ranks(fn: Callable, world: int, payload, threads: int = 1, timeout_s: float = 1800) -> list:
    """Run ``fn(rank, world, payload)`` on ``world`` spawned processes (gloo on 127.0.0.1 when world > 1, each with
    ``torch.set_num_threads(threads)``); return the results by rank. ``fn`` must be a module-level function."""
    from ds_ring.tools.launch import PRELOAD, spawn_local

    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "131072")  # children inherit it: freed tensors leave the RSS
    return spawn_local(fn, world, payload, threads=threads, init_gloo=world > 1, timeout_s=timeout_s,
                       preload=PRELOAD if _fork_ranks else ())
