"""The chunked loss and the memory options (ds_ring.optimize_memory) on real gloo ranks, in one spawn of 2 ranks.

* ``chunked_causal_lm_loss`` against a float64 cross-entropy of the full logits: value, gradients of the hidden states,
  LM head weight and bias; ignored targets, a rank with no valid target, a ring with none.
* A Llama at P=2 with ring attention and each memory option (and all of them) against the unpatched model on the
  full sequence in one process: loss and every parameter gradient (summed over the ring).
* The same under ZeRO-3 with every parameter partitioned (the LM head tied to the embedding, MLP weights gathered per
  tile) and 2 gradient-accumulation micro-steps: DeepSpeed's reduced gradients against the one-process mean.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from batches import padded_batches
from dist_utils import run_distributed

from ds_ring.training.memory_switch import _checkpointing_on  # either transformers name (floor and latest)

V, H, B, L = 37, 16, 2, 12  # vocabulary, hidden, batch, tokens per rank (chunks of 5 do not divide it)
VOCAB, SEQ = 96, 24
PARTS = {
    "all": {},
    "checkpointing": dict(chunked_loss=False, tiled_mlp=False, lean_norms=False),
    "chunked_loss": dict(checkpointing=False, tiled_mlp=False, lean_norms=False),
    "tiled_mlp": dict(checkpointing=False, chunked_loss=False, lean_norms=False),
    "lean_norms": dict(checkpointing=False, chunked_loss=False, tiled_mlp=False),
}


def _loss_case(sp, labels_full, seed):
    """This rank's chunked loss on its shard; returns the loss and the ring-summed gradients (the contract)."""
    import ds_ring

    g = torch.Generator().manual_seed(seed)
    hidden_full = torch.randn(B, L * sp.sp_size, H, generator=g)
    head = torch.nn.Linear(H, V, bias=True)
    with torch.no_grad():
        head.weight.copy_(torch.randn(V, H, generator=g))
        head.bias.copy_(torch.randn(V, generator=g))
    leaf = hidden_full.clone().requires_grad_(True)
    x = ds_ring.shard_sequence(leaf, 1, sp.group, sp.layout)
    y = ds_ring.shard_sequence(labels_full, 1, sp.group, sp.layout)
    loss = ds_ring.chunked_causal_lm_loss(x, head, y, sp, chunk_tokens=5)
    (2.5 * loss).backward()  # an incoming gradient other than 1 must reach every gradient
    grads = [leaf.grad, head.weight.grad, head.bias.grad]
    for t in grads:
        dist.all_reduce(t, group=sp.group)
    return {"loss": loss.item(), "grads": grads, "hidden": hidden_full, "weight": head.weight.detach().clone(),
            "bias": head.bias.detach().clone(), "labels": labels_full}


def build_model(tied: bool, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, use_cache=False,
                      tie_word_embeddings=tied, attn_implementation="sdpa")
    return LlamaForCausalLM(cfg).float()


def batches(seed: int, n: int) -> list[dict]:
    return padded_batches(seed, n, B, SEQ, VOCAB, pad=9)


def _model_case(sp, base, batch, options):
    """Loss and ring-summed gradients of the patched model (ring attention + memory options) on one batch."""
    import ds_ring

    model = ds_ring.patch(copy.deepcopy(base), sp=sp).train()
    ds_ring.optimize_memory(model, sp, loss_chunk_tokens=5, mlp_chunk_tokens=4, **options)
    local = ds_ring.shard_batch(batch, sp)
    labels = local.pop("shift_labels")
    if model._ds_ring.memory.chunked_loss:
        loss = model(**local, shift_labels=labels).loss
    else:
        loss = ds_ring.causal_lm_loss(model(**local).logits, labels, sp)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    for t in grads.values():
        dist.all_reduce(t, group=sp.group)
    return loss.item(), grads


def _zero3_case(sp, base, micro_batches):
    """ZeRO-3, every parameter partitioned, 2 micro-steps: DeepSpeed's full gradients before the step."""
    from deepspeed.utils import safe_get_full_grad

    import ds_ring

    model = ds_ring.optimize_memory(ds_ring.patch(copy.deepcopy(base), sp=sp), sp, loss_chunk_tokens=5,
                                    mlp_chunk_tokens=4)
    config = {"train_micro_batch_size_per_gpu": B, "gradient_accumulation_steps": len(micro_batches),
              "gradient_clipping": 0.0, "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
              "zero_force_ds_cpu_optimizer": False, "steps_per_print": 10**9}
    engine, *_ = ds_ring.deepspeed_initialize(model, sp, config,
                                              optimizer=torch.optim.AdamW(model.parameters(), lr=1e-3))
    partitioned = engine.module.lm_head.weight.numel() == 0  # gathered only inside a module's forward/backward
    losses = []
    for batch in micro_batches:
        local = ds_ring.shard_batch(batch, sp)
        labels = local.pop("shift_labels")
        with ds_ring.offload_context(engine.module):
            loss = engine(**local, shift_labels=labels).loss
            engine.backward(loss)
        losses.append(loss.item())
    grads = {n: safe_get_full_grad(p).detach().clone() for n, p in engine.module.named_parameters()}
    engine.step()
    # a weight read outside its module's forward becomes an "external parameter" of the module then running, which
    # ZeRO-3 then gathers for that module's whole forward and backward (the LM head for the whole step)
    names = {id(p): n for n, p in engine.module.named_parameters()}
    external = {type(m).__name__: [names[id(p)] for _, p in m.ds_external_parameters()]
                for m in engine.module.modules() if list(m.ds_external_parameters())}
    engine.destroy()
    return losses, grads, partitioned, external


def _worker(rank, world):
    warnings.filterwarnings("ignore")
    import ds_ring

    sp = ds_ring.init_sequence_parallel(world, layout="zigzag")
    g = torch.Generator().manual_seed(3)
    labels = torch.randint(0, V, (B, L * world), generator=g)
    mine = ds_ring.shard_sequence(torch.arange(L * world)[None], 1, sp.group, sp.layout)[0].tolist()
    held = [None] * world
    dist.all_gather_object(held, mine)
    labels[:, held[0]] = -100  # ring rank 0 holds no valid target
    labels[1, -3:] = -100
    out = {"loss": {"unequal": _loss_case(sp, labels, 0), "none": _loss_case(sp, torch.full_like(labels, -100), 1)}}

    base = build_model(tied=False)
    batch = batches(5, 1)[0]
    out["model"] = {name: _model_case(sp, base, batch, opts) for name, opts in PARTS.items()}
    out["model_batch"] = batch
    tied = build_model(tied=True)
    out["zero3"] = _zero3_case(sp, tied, batches(7, 2))
    return out if rank == 0 else None


@pytest.fixture(scope="module")
def results():
    return run_distributed(_worker, 2)[0]


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30)).item()


def test_chunked_loss_matches_float64_cross_entropy(results):
    r = results["loss"]["unequal"]
    x = r["hidden"].double().requires_grad_(True)
    w = r["weight"].double().requires_grad_(True)
    b = r["bias"].double().requires_grad_(True)
    ref = F.cross_entropy(F.linear(x, w, b).reshape(-1, V), r["labels"].reshape(-1), ignore_index=-100)
    (2.5 * ref).backward()
    assert abs(r["loss"] - ref.item()) <= 1e-5 * abs(ref.item())
    for got, want in zip(r["grads"], (x.grad, w.grad, b.grad)):
        assert _rel(got, want) < 1e-5, _rel(got, want)


def test_chunked_loss_with_no_valid_target_is_zero(results):
    r = results["loss"]["none"]
    assert r["loss"] == 0.0
    assert all(torch.count_nonzero(t) == 0 for t in r["grads"])


def _reference(base, batches_):
    """One process, unpatched model, full sequences: the mean of the batches' HF losses and its gradients."""
    model = copy.deepcopy(base)
    losses = [model(**b).loss for b in batches_]
    (sum(losses) / len(losses)).backward()
    return [x.item() for x in losses], {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("part", list(PARTS))
def test_memory_options_keep_loss_and_gradients(results, part):
    ref_loss, ref_grads = _reference(build_model(tied=False), [results["model_batch"]])
    loss, grads = results["model"][part]
    assert abs(loss - ref_loss[0]) < 1e-5 * abs(ref_loss[0])
    worst = max(_rel(grads[n], g) for n, g in ref_grads.items())
    assert worst < 1e-5, (part, worst)


def test_zero3_partitioned_tied_head_and_tiles_with_accumulation(results):
    losses, grads, partitioned, external = results["zero3"]
    assert partitioned
    assert not external, f"ZeRO-3 gathers these for the whole forward of the module named: {external}"
    ref_losses, ref_grads = _reference(build_model(tied=True), batches(7, 2))
    assert max(abs(a - b) for a, b in zip(losses, ref_losses)) < 1e-5
    worst = max(_rel(grads[n], g) for n, g in ref_grads.items())
    assert worst < 1e-5, worst


def test_options_validation_and_parsing():
    import ds_ring
    from ds_ring.training.memory_switch import parse_memory_options

    assert parse_memory_options("off") is None
    assert parse_memory_options("long")["offload_checkpoints"] == "auto"
    assert parse_memory_options("chunked_loss,tiled-mlp") == {"checkpointing": False, "chunked_loss": True,
                                                              "tiled_mlp": True, "offload_checkpoints": False,
                                                              "lean_norms": False}
    with pytest.raises(ValueError, match="unknown"):
        parse_memory_options("chunked_loss,fast")
    with pytest.raises(ValueError, match="offload is now called offload_checkpoints"):  # the old spelling
        parse_memory_options("checkpointing,offload")
    model = build_model(tied=False)
    ds_ring.optimize_memory(model)
    with pytest.raises(ValueError, match="already optimized"):
        ds_ring.optimize_memory(model)
    ds_ring.restore_memory(model)
    assert "forward" not in model.__dict__ and not _checkpointing_on(model)
    assert all("forward" not in m.__dict__ for m in model.modules())
    with pytest.raises(TypeError, match="offload is now called offload_checkpoints"):  # the old spelling
        ds_ring.optimize_memory(model, offload=False)
    with pytest.raises(ValueError, match="needs checkpointing"):
        ds_ring.optimize_memory(model, checkpointing=False, offload_checkpoints=True)
    with pytest.warns(UserWarning, match="nothing is offloaded"):
        ds_ring.optimize_memory(model, offload_checkpoints=True)
        ctx = ds_ring.offload_context(model)
    assert ctx.__class__.__name__ == "nullcontext"


def test_chunked_loss_without_grad_makes_no_gradients():
    """Evaluation (no_grad): the same value as the full fp32 cross-entropy, and none of the gradient buffers (an fp32
    dL/dW of V x h and dL/dx) that training makes in forward."""
    import ds_ring

    vocab, hidden, tokens = 4096, 64, 256
    g = torch.Generator().manual_seed(int(torch.randint(0, 10**6, ())))
    x = torch.randn(1, tokens, hidden, generator=g, requires_grad=True)
    head = torch.nn.Linear(hidden, vocab, bias=False)
    labels = torch.randint(0, vocab, (1, tokens), generator=g)
    labels[0, ::7] = -100
    ref = F.cross_entropy(head(x).double().flatten(0, 1), labels.flatten(), ignore_index=-100)
    with torch.no_grad():
        peak_eval = ds_ring.measure_peak_bytes(
            lambda: ds_ring.chunked_causal_lm_loss(x, head, labels, None, chunk_tokens=32))
        value = ds_ring.chunked_causal_lm_loss(x, head, labels, None, chunk_tokens=32)
    peak_train = ds_ring.measure_peak_bytes(lambda: ds_ring.chunked_causal_lm_loss(x, head, labels, None,
                                                                                  chunk_tokens=32))
    assert abs(value.item() - ref.item()) < 1e-5 * ref.item()
    assert peak_train - peak_eval >= 4 * vocab * hidden  # the fp32 dL/dW is made only with grad


def _what_ds_ring_may_change(model) -> dict:
    """The config, and every module's instance attributes: plain values as they are, containers (hook dicts,
    parameters, submodules) by size, anything else (a swapped forward, a state object) by type."""
    view = {"config": model.config.to_json_string(use_diff=False)}
    for name, m in model.named_modules():
        view[name] = {k: v if isinstance(v, (bool, int, float, str, type(None))) else
                      len(v) if isinstance(v, (dict, set, list)) else type(v).__name__ for k, v in vars(m).items()}
    return view


def _run(model, batch) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Logits (no labels: the model's own forward), loss and gradients with labels (the chunked loss when on)."""
    model.zero_grad()
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.detach()
    loss = model(**batch).loss
    loss.backward()
    return logits, loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_unpatch_restores_a_patched_memory_optimised_model():
    """patch + optimize_memory (every option, tiles of 4 rows) + a training step, then ds_ring.unpatch: the model
    equals a fresh one (state_dict, module attributes and hooks, config, outputs and gradients on fresh random
    inputs). A deep copy of the patched model is patched on its own: unpatching it leaves the original patched."""
    import ds_ring

    seed = int(torch.randint(0, 10**6, ()))
    (batch,) = batches(seed, 1)
    fresh = build_model(tied=False, seed=seed).train()
    model = build_model(tied=False, seed=seed).train()
    ref_view = _what_ds_ring_may_change(fresh)
    ds_ring.patch(model, layout="zigzag")
    ds_ring.optimize_memory(model, loss_chunk_tokens=5, mlp_chunk_tokens=4)
    assert _what_ds_ring_may_change(model) != ref_view  # the comparison sees what patch and optimize_memory did
    with ds_ring.offload_context(model):
        _run(model, batch)
    twin = copy.deepcopy(model)
    ds_ring.unpatch(twin)
    assert model._ds_ring.settings.layout == "zigzag" and "forward" in vars(model) and _checkpointing_on(model)
    ds_ring.unpatch(model)
    with pytest.raises(ValueError, match="was not patched"):
        ds_ring.unpatch(model)
    ref = _run(fresh, batch)
    for m in (model, twin):
        assert _what_ds_ring_may_change(m) == ref_view
        assert not any(hasattr(sub, "_ds_ring") for sub in m.modules())
        assert m.state_dict().keys() == fresh.state_dict().keys()
        assert all(torch.equal(v, fresh.state_dict()[k]) for k, v in m.state_dict().items())
        logits, loss, grads = _run(m, batch)
        assert torch.equal(logits, ref[0]) and torch.equal(loss, ref[1])
        assert all(torch.equal(g, ref[2][n]) for n, g in grads.items())


@pytest.mark.parametrize("dtypes", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                    (torch.bfloat16, torch.bfloat16)])
def test_lean_rms_norm_equals_the_module_and_keeps_less(dtypes):
    """The lean norm's output is bit-identical to transformers' module, its gradients equal up to rounding (float64
    reference of the same formula), and what autograd keeps for backward is x and a per-row scale only."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from ds_ring.training.norms import is_llama_rms_norm, rms_norm

    x_dtype, w_dtype = dtypes
    h = 48
    norm = LlamaRMSNorm(h, eps=1e-5).to(w_dtype)
    norm.weight.data.normal_()
    assert is_llama_rms_norm(norm)
    x = torch.randn(3, 40, h).to(x_dtype).requires_grad_(True)
    g = torch.randn(3, 40, h)

    def saved_bytes(fn):
        """Bytes autograd keeps for fn's backward, tensors sharing x's storage not counted (x is held anyway)."""
        kept = {}

        def pack(t):
            if t.untyped_storage().data_ptr() != x.untyped_storage().data_ptr():
                kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = fn()
        return out, sum(kept.values())

    ref, ref_kept = saved_bytes(lambda: norm(x))
    ref_gx, ref_gw = torch.autograd.grad(ref, (x, norm.weight), g.to(ref.dtype))
    out, kept = saved_bytes(lambda: rms_norm(x, norm.weight, norm.variance_epsilon))
    gx, gw = torch.autograd.grad(out, (x, norm.weight), g.to(out.dtype))
    assert out.dtype == ref.dtype and torch.equal(out, ref)
    # what is kept besides x and the weight: one fp32 scale per row (the module keeps whole (3, 40, h) tensors)
    assert kept <= 3 * 40 * 4 + norm.weight.untyped_storage().nbytes(), kept
    assert ref_kept >= 3 * 40 * h * x.element_size()
    # float64 gradients of the same formula
    x64, w64 = x.detach().double().requires_grad_(True), norm.weight.detach().double().requires_grad_(True)
    y64 = w64 * (x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-5))
    want_gx, want_gw = torch.autograd.grad(y64, (x64, w64), g.double())
    tol = 1e-5 if x_dtype == torch.float32 else 2e-2
    for got, ref_got, want in ((gx, ref_gx, want_gx), (gw, ref_gw, want_gw)):
        err, ref_err = _rel(got, want), _rel(ref_got, want)
        assert err < tol and err <= 2 * ref_err + 1e-6, (err, ref_err)


def test_lean_norms_leave_other_formulas_and_say_so():
    """A norm with another formula (Gemma's 1 + weight) keeps its forward; the switch names its class."""
    from transformers import GemmaConfig, GemmaForCausalLM

    import ds_ring
    from ds_ring.training.norms import lean_rms_norm_forward

    cfg = GemmaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=8)
    model = GemmaForCausalLM(cfg)
    with pytest.warns(UserWarning, match="GemmaRMSNorm"):
        ds_ring.optimize_memory(model, checkpointing=False, chunked_loss=False, tiled_mlp=False)
    assert not any(getattr(m.forward, "__func__", None) is lean_rms_norm_forward for m in model.modules())
    llama = build_model(tied=False)
    ds_ring.optimize_memory(llama, checkpointing=False, chunked_loss=False, tiled_mlp=False)
    swapped = [m for m in llama.modules() if getattr(m.forward, "__func__", None) is lean_rms_norm_forward]
    assert len(swapped) == 2 * llama.config.num_hidden_layers + 1  # two per layer and the final norm
    ds_ring.restore_memory(llama)
    assert not any("forward" in m.__dict__ for m in llama.modules())


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_tiled_mlp_skips_the_checkpoint_recompute_only_where_nothing_after_it_saves(arch):
    """Under checkpointing, a Llama layer's recompute stops at the tiled MLP's saved input (the layer's last saved
    tensor): each MLP tile runs twice a step (forward, backward), not three times as DeepSpeed's TiledMLP alone does.
    Gemma2's post-feedforward norm saves the MLP's output, so there the recompute runs the tiles (three times).
    Loss and every gradient equal the unpatched model's (float64) either way."""
    from transformers import Gemma2Config, Gemma2ForCausalLM, LlamaConfig, LlamaForCausalLM

    import ds_ring

    common = dict(vocab_size=VOCAB, hidden_size=16, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64)
    if arch == "llama":
        ref = LlamaForCausalLM(LlamaConfig(**common))
    else:
        ref = Gemma2ForCausalLM(Gemma2Config(**common, head_dim=4, final_logit_softcapping=None,
                                             attn_implementation="eager"))
    ref = ref.double().train()
    model = copy.deepcopy(ref)
    # the lean norms' fp32 scale (transformers' formula upcasts to fp32) would blur a float64 comparison
    ds_ring.optimize_memory(model, chunked_loss=False, lean_norms=False, mlp_chunk_tokens=5)
    runs = []
    for layer in model.model.layers:
        layer.mlp.up_proj.register_forward_hook(lambda mod, args, out: runs.append(args[0].shape[-2]))
    ids = torch.randint(0, VOCAB, (2, 23))
    out = model(input_ids=ids, labels=ids)
    forward_rows, forward_tiles = sum(runs), len(runs)
    out.loss.backward()
    assert forward_rows == 23 * 2 and forward_tiles == 5 * 2  # each layer's 23 positions once, in 5 tiles
    assert len(runs) == forward_tiles * (2 if arch == "llama" else 3)  # (backward's tiles cut batch x positions)
    want = ref(input_ids=ids, labels=ids)
    want.loss.backward()
    assert abs(out.loss.item() - want.loss.item()) < 1e-12
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        assert _rel(p.grad, q.grad) < 1e-12, name


def test_tiled_mlp_trains_its_weights_when_everything_before_it_is_frozen():
    """Only the MLPs and the LM head trainable (embeddings, attention and norms frozen, no checkpointing): the MLP's
    input needs no gradient, and the tiled MLP's weights still get the unpatched model's gradients (float64); without
    care they would get none while the head trains, silently (DeepSpeed's TiledMLP sees the weights only through x)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    import ds_ring

    ref = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=40, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2)).double().train()
    for name, p in ref.named_parameters():
        p.requires_grad_(".mlp." in name or name.startswith("lm_head"))
    model = copy.deepcopy(ref)
    ds_ring.optimize_memory(model, checkpointing=False, chunked_loss=False, lean_norms=False, mlp_chunk_tokens=5)
    ids = torch.randint(0, VOCAB, (2, 23))
    model(input_ids=ids, labels=ids).loss.backward()
    ref(input_ids=ids, labels=ids).loss.backward()
    trained = [(n, p, q) for (n, p), q in zip(model.named_parameters(), ref.parameters()) if q.requires_grad]
    assert len(trained) == 3 * 2 + 1
    for name, p, q in trained:
        assert p.grad is not None and _rel(p.grad, q.grad) < 1e-12, name


@pytest.mark.parametrize("checkpointing", [False, True])
def test_tiled_mlp_keeps_nothing_after_backward(checkpointing):
    """While the step's output (and so every autograd node) is still held after backward, no MLP input is kept alive
    by the tiled MLP's nodes: an (L, hidden) tensor per layer would otherwise outlive every step."""
    import gc
    import weakref

    from transformers import LlamaConfig, LlamaForCausalLM

    import ds_ring

    model = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=40, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2)).train()
    ds_ring.optimize_memory(model, checkpointing=checkpointing, chunked_loss=False, lean_norms=False,
                            mlp_chunk_tokens=5)
    inputs = []
    for layer in model.model.layers:
        layer.mlp.register_forward_pre_hook(lambda mod, args: inputs.append(weakref.ref(args[0])))
    ids = torch.randint(0, VOCAB, (2, 23))
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    gc.collect()
    assert inputs and out.loss.grad_fn is not None
    assert [r() is None for r in inputs] == [True] * len(inputs)
