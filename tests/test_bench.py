"""Benchmarks cannot rot: every script's quick mode runs through ``ds-ring bench`` (tiny sizes, one repetition) and
prints its table and writes its JSON; on a `.[test]` install (no matplotlib) the plot is skipped with a message
saying how to get it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ds_ring.tools.bench import SCRIPTS
from ds_ring.tools.bench import main as bench_main

ROOT = Path(__file__).resolve().parent.parent


def _env() -> dict:
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "benchmarks")]), OMP_NUM_THREADS="1")


def test_ds_ring_bench_lists_every_benchmark():
    on_disk = {p.stem for p in (ROOT / "benchmarks").glob("bench_*.py")}
    assert set(SCRIPTS) == on_disk, f"ds_ring/tools/bench.py SCRIPTS and benchmarks/bench_*.py differ: " \
                                    f"{sorted(set(SCRIPTS) ^ on_disk)}"


@pytest.mark.parametrize("name", SCRIPTS)
def test_quick_mode_through_ds_ring_bench(name, tmp_path, capfd, monkeypatch):
    """`ds-ring bench --only NAME` runs the script's --quick mode: its table printed, its JSON written. The first
    script goes through the installed command's code path (``python -m ds_ring.tools.cli``); the others call the
    same ``tools.bench.main`` in this process, which saves a Python start-up with torch, transformers and DeepSpeed
    per script (the scripts and their ranks still run as processes of their own)."""
    argv = ["--only", name, "--out-dir", str(tmp_path)]
    if name == SCRIPTS[0]:
        proc = subprocess.run([sys.executable, "-m", "ds_ring.tools.cli", "bench", *argv], capture_output=True,
                              text=True, env=_env(), timeout=600, cwd=tmp_path)
        rc, out, err = proc.returncode, proc.stdout, proc.stderr
    else:
        for key, value in _env().items():
            monkeypatch.setenv(key, value)
        monkeypatch.chdir(tmp_path)
        rc = bench_main(argv)
        out, err = capfd.readouterr()
    assert rc == 0, out[-3000:] + err[-4000:]
    assert "\n|---" in out, out[-2000:]  # at least one markdown table printed
    written = json.loads((tmp_path / f"{name}_quick.json").read_text())
    assert written["command"].endswith("--quick --out-dir " + str(tmp_path)) and written["machine"]["torch"]


def test_benchmark_without_matplotlib_prints_table_and_skips_plot(tmp_path):
    code = (
        "import sys, runpy; sys.modules['matplotlib'] = None  # unimportable, as in a fresh .[test] venv\n"
        f"sys.argv = ['bench_kernel.py', '--seq-lens', '64', '--head-dims', '16', '--causal', 'no', '--repeat', '1', "
        f"'--warmup', '0', '--out-dir', {str(tmp_path)!r}]\n"
        f"runpy.run_path({str(ROOT / 'benchmarks' / 'bench_kernel.py')!r}, run_name='__main__')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert 'the PNG plots are skipped this run' in proc.stdout and 'pip install -e ".[bench]"' in proc.stdout
    assert "| S | D | causal |" in proc.stdout and "\n| 64 | 16 | no |" in proc.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bench_kernel.json"]
