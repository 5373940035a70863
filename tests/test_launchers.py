"""The example under each launcher (deepspeed, accelerate launch, torchrun) on 2 CPU ranks over gloo, against one
process training the same model on the full sequences with the same data; checkpoint resume through the example."""

from __future__ import annotations

import importlib.util
import os
import random
import re
import subprocess
from pathlib import Path

import pytest
import torch

from dist_utils import free_port

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "train_long_context.py"
SEQ, STEPS, LR, CLIP = 64, 3, 1e-3, 1.0
ENV = dict(os.environ, OMP_NUM_THREADS="1")


def load_example():
    spec = importlib.util.spec_from_file_location("train_long_context", EXAMPLE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def seed() -> int:
    return random.randrange(10**6)  # fresh weights and data every run


def reference_losses(argv: list[str], seed: int) -> list[float]:
    """One process, full sequences, unpatched model, torch AdamW + clip_grad_norm_: the loss of every step of the
    example run with ``argv`` (its own data pipeline, on a single-rank "ring")."""
    from transformers import AutoModelForCausalLM

    import ds_ring
    from ds_ring.tools.demo import tiny_llama_config

    ex = load_example()
    args = ex.parse_args(argv)
    torch.manual_seed(seed)  # the example's initial weights (and those saved for --model)
    model = AutoModelForCausalLM.from_config(tiny_llama_config(), attn_implementation="eager")
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    losses = []
    for _, batch in ex.batches(args, ds_ring.init_sequence_parallel(1), model.config.vocab_size, 0):
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.fixture(scope="module")
def reference(seed) -> list[float]:
    return reference_losses(common(seed), seed)


def run(cmd: list[str], timeout: float = 200) -> dict[int, float]:
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    losses = {int(s): float(v) for s, v in re.findall(r"^step (\d+) loss ([\d.]+)$", proc.stdout, re.M)}
    assert "peak memory per rank: rank 0:" in proc.stdout and "rank 1:" in proc.stdout
    assert proc.stdout.count("done:") == 1  # logs come from rank 0 only
    return losses


def common(seed: int) -> list[str]:
    return ["--sp-size", "2", "--seq-len", str(SEQ), "--steps", str(STEPS), "--lr", str(LR),
            "--grad-clip", str(CLIP), "--seed", str(seed), "--log-every", "1"]


def check(losses: dict[int, float], ref: list[float], steps=range(1, STEPS + 1)):
    assert sorted(losses) == list(steps), losses
    assert [losses[s] for s in steps] == pytest.approx([ref[s - 1] for s in steps], rel=1e-4)


def test_deepspeed_launcher_zero3(seed, reference):
    # with the memory switch on (checkpointing, chunked loss, tiled MLP): the same objective
    losses = run(["deepspeed", "--num_gpus", "2", "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
                  str(EXAMPLE), "--deepspeed", "ds_config/zero3.json", *common(seed), "--memory", "long"])
    check(losses, reference)


def test_accelerate_launch_zero3_yaml(seed, reference):
    # The DeepSpeed config comes from the YAML; accelerate must not shard data inside a ring (losses would differ).
    losses = run(["accelerate", "launch", "--config_file", "integrations/accelerate/zero3.yaml",
                  "--main_process_port", str(free_port()), str(EXAMPLE), *common(seed)])
    check(losses, reference)


def test_fsdp2_torchrun_then_accelerate_yaml_resume(seed, reference, tmp_path):
    """--fsdp2 (ds_ring.fully_shard, AdamW, clipping on DTensor gradients) under torchrun against one process; then
    accelerate launch with integrations/accelerate/fsdp2.yaml (it selects FSDP2; fp32 here: --mixed_precision no)
    resumes from the step-2 distributed checkpoint and must reproduce step 3."""
    ckpt = tmp_path / "ckpt"
    full = run(["torchrun", "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
                str(EXAMPLE), "--fsdp2", *common(seed), "--checkpoint-dir", str(ckpt), "--save-every", "2"])
    check(full, reference)
    (ckpt / "latest").write_text("step2")
    resumed = run(["accelerate", "launch", "--config_file", "integrations/accelerate/fsdp2.yaml", "--mixed_precision",
                   "no", "--main_process_port", str(free_port()), str(EXAMPLE), *common(seed),
                   "--checkpoint-dir", str(ckpt), "--resume"])
    assert resumed == pytest.approx({3: full[3]}, rel=1e-6)


def save_tiny_model_with_tokenizer(path: Path, seed: int) -> None:
    """The example's initial weights plus a word-level tokenizer ("w<id>" -> id), all offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    from ds_ring.tools.demo import tiny_llama_config

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_llama_config())
    model.save_pretrained(path)
    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(model.config.vocab_size)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0", pad_token="w0").save_pretrained(path)


def test_torchrun_zero3_offload_pretrained_text_and_resume(seed, tmp_path):
    """torchrun + ZeRO-3 with CPU offload, a saved model and tokenizer (from_pretrained under zero.Init) and a text
    file through sp_dataloader; then a run resumed from the step-2 checkpoint (it skips the consumed batches) must
    reproduce step 3 of the uninterrupted run."""
    model_dir, ckpt, text = tmp_path / "model", tmp_path / "ckpt", tmp_path / "train.txt"
    save_tiny_model_with_tokenizer(model_dir, seed)
    rng = random.Random(seed)
    text.write_text(" ".join(f"w{rng.randrange(1, 128)}" for _ in range(3 * SEQ + 7)))  # 3 chunks: one epoch
    argv = [*common(seed), "--model", str(model_dir), "--data", str(text)]
    ref = reference_losses(argv, seed)
    base = ["torchrun", "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
            str(EXAMPLE), "--deepspeed", "ds_config/zero3_offload.json", *argv,
            "--checkpoint-dir", str(ckpt), "--save-every", "2"]
    full = run(base)
    check(full, ref)
    (ckpt / "latest").write_text("step2")
    resumed = run([*base[:6], str(free_port()), *base[7:], "--resume"])
    assert resumed == {3: full[3]}


def test_shipped_configs_validate():
    """Every shipped DeepSpeed config loads once its "auto" values are filled and passes ds_ring's checks."""
    from ds_ring.integrations.deepspeed import check_config, load_config
    from ds_ring.parallel.groups import SequenceParallel

    sp = SequenceParallel(None, None, 2, 0, 1, 0)
    fill = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "gradient_clipping": 1.0,
            "bf16.enabled": False}
    stages = {}
    for path in sorted((ROOT / "ds_config").glob("*.json")):
        cfg = load_config(path, fill)
        check_config(cfg, sp)
        stages[path.stem] = cfg["zero_optimization"]["stage"]
    assert stages == {"zero1": 1, "zero2": 2, "zero3": 3, "zero3_offload": 3}
    for yaml in (ROOT / "integrations" / "accelerate").glob("*.yaml"):
        text = yaml.read_text()
        if "distributed_type: FSDP" in text:  # FSDP2: no DeepSpeed config; its version is what ds_ring supports
            assert "fsdp_version: 2" in text, f"{yaml.name}: ds_ring supports FSDP2 only"
            continue
        file = re.search(r"deepspeed_config_file: (\S+)", text)[1]
        assert (ROOT / file).is_file(), f"{yaml.name} points at a missing {file}"
