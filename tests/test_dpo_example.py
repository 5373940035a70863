"""examples/train_dpo.py under each launcher (deepspeed, torchrun, accelerate launch) on 2 CPU ranks over gloo:
exit code 0, logs from rank 0 only, and the losses and reward margins of the plain TRL DPOTrainer in one process on
the example's own model and data (SGD, no clipping, gradient accumulation 2)."""

from __future__ import annotations

import os
import random
import re
import subprocess
from pathlib import Path

import pytest

from dist_utils import LAUNCHERS, load_example

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "train_dpo.py"
ENV = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_OFFLINE="1")
STEPS = 3


@pytest.fixture(scope="module")
def argv(tmp_path_factory) -> list[str]:
    """A saved tiny model and the example's tokenizer (loaded from disk, so the weights do not depend on ZeRO-3's
    partitioned init) and flags that make a wrong gradient scale visible: SGD, no clipping, gradient accumulation."""
    import torch
    from transformers import AutoModelForCausalLM

    from ds_ring.tools.demo import tiny_llama_config

    seed = random.randrange(10**6)  # fresh weights and data every run
    model_dir = tmp_path_factory.mktemp("model")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_llama_config())
    model.save_pretrained(model_dir)
    load_example(EXAMPLE).word_tokenizer(model.config.vocab_size).save_pretrained(model_dir)
    return ["--model", str(model_dir), "--seed", str(seed), "--prompt_len", "40", "--max_steps", str(STEPS), "--logging_steps", "1",
            "--train_samples", "16", "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "2",
            "--optim", "sgd", "--learning_rate", "1.0", "--max_grad_norm", "0", "--beta", "0.5"]


@pytest.fixture(scope="module")
def reference(argv, tmp_path_factory) -> list[tuple[float, float]]:
    """The plain DPOTrainer in one process on the example's model and data."""
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    from trl import DPOTrainer

    ex = load_example(EXAMPLE)
    script, training = ex.parse([*argv, "--output_dir", str(tmp_path_factory.mktemp("ref"))])
    model, ref, tok, train = ex.build(script, training)
    trainer = DPOTrainer(model=model, ref_model=ref, args=training, train_dataset=train, processing_class=tok)
    trainer.train()
    return [(h["loss"], h["rewards/margins"]) for h in trainer.state.log_history if "loss" in h]


def launch(cmd: list[str], out: Path, reference) -> None:
    proc = subprocess.run([*cmd, "--sp_size", "2", "--output_dir", str(out)], cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=400)
    assert proc.returncode == 0, f"{cmd}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    assert proc.stdout.count("ds_ring: world 2 = 1 ring(s) x sp_size 2") == 1  # printed by rank 0 only
    got = [(float(a), float(b)) for a, b in
           re.findall(r"^step \d+ loss ([-\d.]+) margin ([-\d.e]+) accuracy", proc.stdout, re.M)]
    assert len(got) == len(reference) == STEPS
    for (loss, margin), (ref_loss, ref_margin) in zip(got, reference):
        assert loss == pytest.approx(ref_loss, rel=1e-4)
        assert margin == pytest.approx(ref_margin, rel=1e-4, abs=1e-5)
    assert (out / "model.safetensors").is_file() and "ring_dilated" not in (out / "config.json").read_text()


@pytest.mark.parametrize("launcher", sorted(LAUNCHERS))
def test_example_under_each_launcher(launcher, argv, reference, tmp_path):
    """deepspeed (ZeRO-3), torchrun (DDP) and accelerate launch (ZeRO-3 YAML, memory switch): exit 0, same losses."""
    launch(LAUNCHERS[launcher](EXAMPLE, argv), tmp_path, reference)
