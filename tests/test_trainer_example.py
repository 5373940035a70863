"""examples/train_with_trainer.py under each launcher (deepspeed, torchrun, accelerate launch) on 2 CPU ranks over
gloo: exit code 0, logs from rank 0 only, and the losses of the plain transformers.Trainer in one process on the
example's own model and data."""

from __future__ import annotations

import os
import random
import re
import subprocess
from pathlib import Path

import pytest

from dist_utils import LAUNCHERS, load_example
from test_launchers import save_tiny_model_with_tokenizer

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "train_with_trainer.py"
ENV = dict(os.environ, OMP_NUM_THREADS="1")
STEPS = 3


@pytest.fixture(scope="module")
def argv(tmp_path_factory) -> list[str]:
    """A saved tiny model (loaded from disk, so its weights do not depend on ZeRO-3's partitioned init) and flags that
    make a wrong gradient scale visible: SGD, no clipping, gradient accumulation."""
    seed = random.randrange(10**6)
    model_dir = tmp_path_factory.mktemp("model")
    save_tiny_model_with_tokenizer(model_dir, seed)
    return ["--model", str(model_dir), "--seed", str(seed), "--seq_len", "64", "--max_steps", str(STEPS),
            "--logging_steps", "1", "--train_samples", "16", "--eval_samples", "4", "--per_device_eval_batch_size", "2",
            "--gradient_accumulation_steps", "2", "--optim", "sgd", "--learning_rate", "0.5", "--max_grad_norm", "0"]


@pytest.fixture(scope="module")
def reference(argv, tmp_path_factory) -> tuple[list[float], float]:
    """The plain Trainer in one process on the example's model and data."""
    from transformers import Trainer

    ex = load_example(EXAMPLE)
    script, training = ex.parse([*argv, "--output_dir", str(tmp_path_factory.mktemp("ref"))])
    model, train, val = ex.build(script, training)
    trainer = Trainer(model=model, args=training, train_dataset=train, eval_dataset=val)
    trainer.train()
    return [h["loss"] for h in trainer.state.log_history if "loss" in h], trainer.evaluate()["eval_loss"]


def launch(cmd: list[str], out: Path, reference) -> None:
    proc = subprocess.run([*cmd, "--sp_size", "2", "--output_dir", str(out)], cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, f"{cmd}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    assert proc.stdout.count("ds_ring: world 2 = 1 ring(s) x sp_size 2") == 1  # printed by rank 0 only
    losses = [float(v) for v in re.findall(r"^step \d+ loss ([\d.]+)$", proc.stdout, re.M)]
    eval_loss = float(re.search(r"^eval_loss ([\d.]+)$", proc.stdout, re.M)[1])
    ref_losses, ref_eval = reference
    assert len(losses) == STEPS
    assert losses == pytest.approx(ref_losses, rel=1e-4)
    assert eval_loss == pytest.approx(ref_eval, rel=1e-4)
    assert (out / "model.safetensors").is_file() and "ring_dilated" not in (out / "config.json").read_text()


@pytest.mark.parametrize("launcher", sorted(LAUNCHERS))
def test_example_under_each_launcher(launcher, argv, reference, tmp_path):
    """deepspeed (ZeRO-3), torchrun (DDP) and accelerate launch (ZeRO-3 YAML, memory switch): exit 0, same losses."""
    launch(LAUNCHERS[launcher](EXAMPLE, argv), tmp_path, reference)
