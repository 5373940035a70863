"""`ds-ring demo`, short: the installed console script (`ds-ring`) spawns 2 CPU ranks, checks ring == dense attention
and trains with ZeRO-3."""

from __future__ import annotations

import os
import random
import re
import subprocess

import pytest

from ds_ring.tools.cli import build_parser


def test_demo_help_lists_knobs(capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["demo", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for knob in ("--ranks", "--seq-len", "--steps", "--pattern"):
        assert knob in out


def test_demo_runs_short():
    seed = random.randrange(10**6)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        ["ds-ring", "demo", "--steps", "12", "--seq-len", "128", "--seed", str(seed)],
        capture_output=True, text=True, timeout=240, env=env,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    err = float(re.search(r"ring attention == dense attention on the first batch: max \|logit diff\| = (\S+)", out)[1])
    assert err < 1e-4
    mem = re.search(r"rank 0: ([\d.]+) MiB, rank 1: ([\d.]+) MiB\s+vs one rank with the whole sequence: ([\d.]+) MiB",
                    out)
    assert float(mem[3]) > 1.5 * max(float(mem[1]), float(mem[2])), mem[0]
    first, last = map(float, re.search(r"\[result\] loss ([\d.]+) -> ([\d.]+)", out).groups())
    assert last < first - 0.3, out[-2000:]
    assert "train" in proc.stderr  # the tqdm bar (rank 0) goes to stderr


def test_demo_rejects_unshardable_length():
    args = build_parser().parse_args(["demo", "--seq-len", "130"])  # 130 is not a multiple of 2 ranks x 2 (zigzag)
    with pytest.raises(SystemExit, match="--seq-len: sequence length 130 is not a multiple of 4 .*pad it to 132"):
        args.func(args)  # refused in the parent, before any rank is spawned
