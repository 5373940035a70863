"""The memory planner (ds_ring.plan, ds-ring plan) against real models and measured steps, in process (seconds).

The P=2 ZeRO-3 agreement at benchmark scale is in benchmarks/bench_longest.py; here one process, no DeepSpeed: a
whole training step (forward, backward, AdamW step) of two small Llama shapes with ds_ring's attention, with and
without the memory options, measured by the profiler's allocation events against the plan's step peak.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import random

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import ds_ring
from ds_ring.tools.cli import main as cli_main
from ds_ring.planning.step_planner import ModelShape, parse_bytes, plan

SHAPES = {  # name: (config, sequence length)
    "tied, h=64": (dict(vocab_size=256, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True), 4096),
    "untied, h=96": (dict(vocab_size=3000, hidden_size=96, intermediate_size=256, num_hidden_layers=3,
                          num_attention_heads=6, num_key_value_heads=2, tie_word_embeddings=False), 2048),
}
MODES = {"off": None, "long": dict(offload_checkpoints=False)}


def _model(cfg):
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**cfg, max_position_embeddings=8192, use_cache=False))


@pytest.mark.parametrize("shape", list(SHAPES))
def test_parameter_count_matches_the_model(shape):
    cfg, _ = SHAPES[shape]
    model = _model(cfg)
    assert ModelShape.from_config(model.config).params == sum(p.numel() for p in model.parameters())


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the spawned ranks of the other tests; a loaded 2-core box crawls with more
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("shape", list(SHAPES))
def test_step_peak_within_20_percent_of_measured(shape, mode, one_thread):
    cfg, S = SHAPES[shape]
    opts = MODES[mode]
    model = ds_ring.patch(_model(cfg)).train()  # one process: ds_ring's attention runs locally
    if opts is not None:
        ds_ring.optimize_memory(model, None, **opts)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(0, cfg["vocab_size"], (1, S))
    labels = torch.nn.functional.pad(ids, (0, 1), value=-100)[..., 1:]

    def step():
        if opts is None:
            loss = ds_ring.causal_lm_loss(model(input_ids=ids).logits, labels, None)
        else:
            loss = model(input_ids=ids, shift_labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=False)  # gradients are held between steps, as the plan counts them

    step()  # creates the gradients and AdamW's moments
    measured = ds_ring.measure_peak_bytes(step)
    on = opts is not None
    p = plan(cfg, S, sp_size=1, zero_stage=0, dtype="fp32", layout="contiguous", checkpointing=on,
             chunked_loss=on, tiled_mlp=on, lean_norms=on)
    assert 0.8 <= measured / p.step_peak_bytes <= 1.2, (measured, p.phases)


def test_longest_sequence_is_the_boundary_and_options_help():
    cfg, _ = SHAPES["untied, h=96"]
    kw = dict(sp_size=4, zero_stage=3, device_memory="1GiB")
    long, off = plan(cfg, **kw), plan(cfg, checkpointing=False, chunked_loss=False, tiled_mlp=False,
                                      lean_norms=False, **kw)
    for p in (long, off):
        grain = 8  # zigzag over 4 ranks
        assert p.seq_len == p.longest_seq_len and p.fits
        assert not plan(cfg, p.seq_len + grain, **kw, **{k: v for k, v in p.options.items()
                                                         if k != "offload_checkpoints"}).fits
    assert long.longest_seq_len > 3 * off.longest_seq_len
    with pytest.raises(ValueError, match="multiple of 8"):
        plan(cfg, 1001, sp_size=4)
    with pytest.raises(ValueError, match="not even"):
        plan(cfg, sp_size=1, device_memory="1MiB")
    assert parse_bytes("80GB") == 80 * 10**9 and parse_bytes("2GiB") == 2 * 2**30 and parse_bytes(512) == 512


def test_offload_moves_states_to_the_host():
    cfg = dict(SHAPES["untied, h=96"][0], num_hidden_layers=8)
    on = plan(cfg, 4096, sp_size=2, offload_optimizer=True, offload_params=True, offload_checkpoints=True)
    off = plan(cfg, 4096, sp_size=2)
    assert on.persistent["parameters"] == 0 and on.host["parameters"] == off.persistent["parameters"]
    assert on.host["optimizer states"] == off.persistent["optimizer states (fp32 master + Adam)"]
    assert on.moments["loss"]["checkpoints"] < off.moments["loss"]["checkpoints"]


def test_cli_plan(tmp_path, capsys):
    cfg, _ = SHAPES["tied, h=64"]
    (tmp_path / "config.json").write_text(json.dumps(dict(cfg, model_type="llama")))
    assert cli_main(["plan", "--model", str(tmp_path), "--ranks", "2", "--memory", "1GiB"]) == 0
    out = capsys.readouterr().out
    assert "longest sequence that fits 1.00 GiB per rank" in out and "checkpoints" in out and "ZeRO-3" in out
    assert cli_main(["plan", "--model", str(tmp_path / "missing"), "--memory", "1GiB"]) == 2
    assert "no model config" in capsys.readouterr().err
    assert cli_main(["plan", "--model", str(tmp_path), "--seq-len", "4096", "--options", "off", "--zero", "2"]) == 0
    assert "saved activations: MLP" in capsys.readouterr().out
    # with several ranks, the cost model's factorizations follow: its bytes, on the cluster the flags describe
    from ds_ring.planning.cost_model import CLUSTERS, AttentionShape, recommend

    args = ["plan", "--model", str(tmp_path), "--ranks", "4", "--seq-len", "8192", "--ranks-per-node", "2",
            "--inter-bw", "10"]
    assert cli_main(args) == 0
    out = capsys.readouterr().out
    shape = ModelShape.from_config(cfg)
    cluster = dataclasses.replace(CLUSTERS["h100"], ranks_per_node=2, inter_node_bw=10e9)
    preds = recommend(AttentionShape(shape.heads, shape.kv_heads, shape.head_dim, 2), 8192, 4, cluster)
    assert {(p.ulysses, p.ring) for p in preds} == {(1, 4), (2, 2)}  # Ulysses groups stay inside a 2-rank node
    rows = [line.split() for line in out.splitlines() if line.strip()[:2] in ("(1", "(2")]
    assert [r[:2] for r in rows] == [[f"({p.ulysses},", f"{p.ring})"] for p in preds]
    assert rows[0][-2:] == ["<-", "recommended"] and len(rows[1]) == 8
    assert [r[4] for r in rows] == [f"{p.traffic.ring_inter / 1e6:,.1f}" for p in preds]


def test_config_forms_agree(tmp_path):
    cfg, _ = SHAPES["tied, h=64"]
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    forms = [cfg, str(path), tmp_path, LlamaConfig(**cfg)]
    assert len({ModelShape.from_config(f) for f in forms}) == 1
    with pytest.raises(ValueError, match="Llama-style"):
        ModelShape.from_config({"n_embd": 64})
    assert copy.deepcopy(ModelShape.from_config(cfg)).params > 0


def test_zero3_release_and_kernel_constants():
    """The memory switch's ZeRO-3 release: the config keys it sets (stage 3 only), the plan's gathered parameters
    under it (the LM head at the loss, one layer in backward, instead of the whole model), and the kernel constants
    the plan names."""
    from ds_ring.integrations.deepspeed import release_gathered_parameters

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48 + 8 * random.randrange(4),
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
    layer = sum(p.numel() for p in model.model.layers[0].parameters())  # counted here from the weights' shapes
    z3 = {"zero_optimization": {"stage": 3, "stage3_prefetch_bucket_size": 5e7}}
    changed = release_gathered_parameters(z3, model)
    assert changed == {"stage3_prefetch_bucket_size": (5e7, 0),
                       "stage3_max_reuse_distance": ("DeepSpeed's default", 2 * layer)}
    assert z3["zero_optimization"] == {"stage": 3, "stage3_prefetch_bucket_size": 0,
                                       "stage3_max_reuse_distance": 2 * layer}
    assert release_gathered_parameters(z3, model) == {}  # already set: nothing to say
    bare = {"zero_optimization": {"stage": 3}}  # a model naming no decoder layer: released after every use
    assert release_gathered_parameters(bare, torch.nn.Linear(2, 2))["stage3_max_reuse_distance"][1] == 0
    z2 = {"zero_optimization": {"stage": 2}}
    assert release_gathered_parameters(z2, model) == {} and z2 == {"zero_optimization": {"stage": 2}}

    cfg, S = SHAPES["untied, h=96"]
    shape = ModelShape.from_config(cfg)
    keep = plan(cfg, S, sp_size=2, zero_stage=3, dtype="fp32", release_parameters=False)
    rel = plan(cfg, S, sp_size=2, zero_stage=3, dtype="fp32", release_parameters=True)
    assert keep.moments["loss"]["ZeRO-3 gathered parameters"] == shape.params * 4
    assert rel.moments["loss"]["ZeRO-3 gathered parameters"] == shape.vocab * shape.hidden * 4
    layer = (shape.params - 2 * shape.vocab * shape.hidden - shape.hidden) // shape.layers
    assert rel.moments["layer backward"]["ZeRO-3 gathered parameters"] == layer * 4
    assert plan(cfg, S, sp_size=2, zero_stage=3, dtype="fp32").moments == rel.moments  # on with the options
    assert plan(cfg, S, sp_size=2, zero_stage=3, dtype="fp32", checkpointing=False, chunked_loss=False,
                tiled_mlp=False, lean_norms=False).moments["loss"]["ZeRO-3 gathered parameters"] == shape.params * 4

    # where ZeRO-3's reduce bucket first fills, in backward order (untied LM head, the layers, the embedding): inside
    # the layers for a bucket smaller than head + layers, else at the embedding, a moment of its own
    head_and_layers = shape.params - shape.vocab * shape.hidden - shape.hidden
    bucket = random.randrange(shape.vocab * shape.hidden + 1, head_and_layers)
    small = plan(cfg, S, sp_size=2, zero_stage=3, dtype="fp32", reduce_bucket_size=bucket)
    assert "backward end" not in small.moments
    assert small.moments["layer backward"]["gradient being reduced"] == (
        max(shape.vocab, shape.intermediate) * shape.hidden + bucket) * 4
    big = plan(cfg, S, sp_size=2, zero_stage=3, dtype="fp32", reduce_bucket_size=head_and_layers + 1)
    assert big.moments["layer backward"]["gradient being reduced"] == shape.hidden * shape.intermediate * 4
    assert big.moments["backward end"] == {
        "gradient being reduced (bucket flush)": (shape.vocab * shape.hidden + 2 * head_and_layers + 2) * 4}

    cuda = plan(cfg, S, sp_size=2, dtype="bf16", kernels="cuda")
    assert any("UNVERIFIED" in n for n in cuda.notes)
    assert any("measured on CPU (torch's flash kernel)" in n for n in plan(cfg, S, sp_size=2).notes)
    with pytest.raises(ValueError, match="kernels"):
        plan(cfg, S, sp_size=2, kernels="tpu")
