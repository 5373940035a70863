"""Benchmarks run on a `.[test]` install (no matplotlib): the table and JSON come out, the plot is skipped with a
message saying how to get it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_benchmark_without_matplotlib_prints_table_and_skips_plot(tmp_path):
    code = (
        "import sys, runpy; sys.modules['matplotlib'] = None  # unimportable, as in a fresh .[test] venv\n"
        f"sys.argv = ['bench_kernel.py', '--seq-lens', '64', '--head-dims', '16', '--causal', 'no', '--repeat', '1', "
        f"'--warmup', '0', '--out-dir', {str(tmp_path)!r}]\n"
        f"runpy.run_path({str(ROOT / 'benchmarks' / 'bench_kernel.py')!r}, run_name='__main__')\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "benchmarks")]), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert 'the PNG plots are skipped this run' in proc.stdout and 'pip install -e ".[bench]"' in proc.stdout
    assert "| S | D | causal |" in proc.stdout and "\n| 64 | 16 | no |" in proc.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bench_kernel.json"]
