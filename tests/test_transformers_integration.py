"""Hugging Face integration: patched tiny models on real gloo ranks against the unpatched model in one process.

Each world size is spawned once (module-scoped fixture); every distributed case runs inside that one spawn.
"""

from __future__ import annotations

import copy
from collections import Counter

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from transformers import (
    AutoModelForCausalLM,
    BertConfig,
    BertForMaskedLM,
    BloomConfig,
    Gemma2Config,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
    Qwen3Config,
)

import ds_ring
from ds_ring.parallel.sharding import gather_sequence
from dist_utils import run_distributed

pytestmark = pytest.mark.hf  # the transformers patch: also run on the declared dependency floors (.ci/floors)

TOL = 1e-4
VOCAB = 96
SEQ = 30  # divides neither 4 (P=4 contiguous) nor 8 (P=4 zigzag): shard_batch must pad
LENGTHS = [SEQ, 19]  # unequal lengths: row 1 is padded
_DEC = dict(
    vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=128, use_cache=False,
)  # fmt: skip
CONFIGS = {
    "llama": lambda: LlamaConfig(**_DEC),
    "mistral": lambda: MistralConfig(**_DEC, sliding_window=7),  # window < sequence: the window must bite
    "qwen2": lambda: Qwen2Config(**_DEC),
    "qwen3": lambda: Qwen3Config(**_DEC, head_dim=8),
    "gpt_neox": lambda: GPTNeoXConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=128, use_cache=False,
    ),  # fmt: skip
    "gpt2": lambda: GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=128, attn_pdrop=0.0, resid_pdrop=0.0,
        embd_pdrop=0.0, use_cache=False,
    ),  # fmt: skip
    "bert": lambda: BertConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=128, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    ),  # fmt: skip
}


def build(name: str, seed: int, **kwargs) -> torch.nn.Module:
    """Same weights in every process for a given seed."""
    torch.manual_seed(seed)
    cfg = CONFIGS[name]()
    if name == "bert":
        return BertForMaskedLM._from_config(cfg, **kwargs)
    return AutoModelForCausalLM.from_config(cfg, **kwargs)


def padded_batch(seed: int, side: str, seq: int = SEQ, lengths: list[int] = LENGTHS) -> dict[str, torch.Tensor]:
    """input_ids, attention_mask, labels (B, seq); row b holds lengths[b] real tokens, padded on ``side``."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (len(lengths), seq), generator=g)
    mask = torch.zeros(len(lengths), seq, dtype=torch.long)
    for b, n in enumerate(lengths):
        mask[b, :n] = 1
    if side == "left":
        mask = mask.flip(1)
    ids = ids.masked_fill(mask == 0, 0)
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def reference_shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """transformers' ForCausalLMLoss rule: position i predicts labels[i+1]; -100 at the end, nothing else."""
    return F.pad(labels, (0, 1), value=-100)[:, 1:]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp(min=1e-12)).item()


def reference(model: torch.nn.Module, batch: dict[str, torch.Tensor]):
    """Unpatched model on the full sequence in this process: logits, loss (mean CE over valid targets), grads."""
    model.zero_grad()
    if isinstance(model, BertForMaskedLM):  # not a causal LM: the same next-token objective, written out
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        target = reference_shift_labels(batch["labels"])
        loss = F.cross_entropy(logits.float().flatten(0, 1), target.flatten(), ignore_index=-100)
    else:  # the model's own labels= loss (transformers' ForCausalLMLoss), on a left-padded row too
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
        logits, loss = out.logits, out.loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return logits.detach(), loss.detach(), grads


def ring_run(model: torch.nn.Module, batch: dict[str, torch.Tensor], sp, group=None):
    """Patched model on this rank's shard: gathered logits (B, S, V), loss, grads summed over the ring."""
    model.zero_grad()
    local = ds_ring.shard_batch(batch, sp)
    out = model(**local)  # shift_labels rides along, as in the documented usage
    loss = ds_ring.causal_lm_loss(out.logits, local["shift_labels"], sp)
    loss.backward()
    grads = {}
    for n, p in model.named_parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad, group=group)
            grads[n] = p.grad
    logits = gather_sequence(out.logits.detach(), 1, group, sp.layout)[:, : batch["input_ids"].shape[1]]
    return logits, loss.detach(), grads


def compare(ref, got, mask: torch.Tensor, loss: bool = True) -> dict[str, float]:
    (rl, rloss, rg), (gl, gloss, gg) = ref, got
    real = mask.bool()
    assert rg.keys() == gg.keys()
    # Parameter gradients, relative to the largest reference gradient of the same tensor; parameters whose exact
    # gradient is zero (e.g. key biases, invisible to softmax) are measured against the model's largest gradient.
    gmax = max(g.abs().max() for g in rg.values())
    grad = max(((gg[n] - rg[n]).abs().max() / torch.maximum(rg[n].abs().max(), 1e-3 * gmax)).item() for n in rg)
    out = {"logits": rel_err(gl[real], rl[real]), "grads": grad}
    return {**out, "loss": rel_err(gloss, rloss)} if loss else out


def _equivalence_cases(world: int) -> dict[str, dict[str, float]]:
    sps = {lay: ds_ring.init_sequence_parallel(world, layout=lay) for lay in ("contiguous", "zigzag")}
    results = {}
    for i, name in enumerate(CONFIGS):
        for side in ("right", "left"):
            for lay, sp in sps.items():
                seed = 100 * i + (side == "left") * 10 + (lay == "zigzag")
                batch = padded_batch(seed, side)
                model = build(name, seed).train()
                ref = reference(model, batch)
                patched = ds_ring.patch(copy.deepcopy(model), sp=sp)
                got = ring_run(patched, batch, sp, sp.group)
                r = compare(ref, got, batch["attention_mask"])
                # Power check: the padding mask changes the real tokens' outputs, so a dropped mask would fail.
                real = batch["attention_mask"].bool()
                no_mask = model(input_ids=batch["input_ids"]).logits.detach()
                r["mask_effect"] = rel_err(no_mask[real], ref[0][real])
                results[f"{name}/{side}/{lay}"] = r
    return results


def _special_cases(world: int) -> dict[str, object]:
    res: dict[str, object] = {}
    sp = ds_ring.init_sequence_parallel(world)  # contiguous over WORLD: what the bare attn_implementation means
    batch = padded_batch(7, "left")

    # Gradient checkpointing: the ring forward runs again during backward.
    model = build("llama", 1).train()
    ref = reference(model, batch)
    ckpt = ds_ring.patch(copy.deepcopy(model), sp=sp)
    ckpt.gradient_checkpointing_enable()
    res["grad_checkpointing"] = compare(ref, ring_run(ckpt, batch, sp), batch["attention_mask"])

    # attn_implementation="ring_dilated" at construction and via set_attn_implementation, no patch call.
    for name in ("qwen2", "gpt2"):
        model = build(name, 2).train()
        ref = reference(model, batch)
        built = build(name, 2, attn_implementation="ring_dilated").train()
        res[f"from_config/{name}"] = compare(ref, ring_run(built, batch, sp), batch["attention_mask"])
        switched = copy.deepcopy(model)
        switched.set_attn_implementation("ring_dilated")
        res[f"set_attn_implementation/{name}"] = compare(ref, ring_run(switched, batch, sp), batch["attention_mask"])

    # Forgetting the global position_ids fails loudly on every rank, also on contiguous rank 0 whose positions
    # happen to be the local default (it must not wait in the ring for the others).
    zz = ds_ring.init_sequence_parallel(world, layout="zigzag")
    for lay, sp_l in (("contiguous", sp), ("zigzag", zz)):
        model = ds_ring.patch(build("llama", 3), sp=sp_l)
        local = ds_ring.shard_batch(batch, sp_l)
        del local["position_ids"]
        try:
            model(**local)
            res[f"missing_position_ids/{lay}"] = "no error"
        except ValueError as e:
            res[f"missing_position_ids/{lay}"] = str(e)

    # A dilated pattern over the ring equals the same pattern computed in one process on the whole sequence.
    pattern = dict(segment_lengths=[8, 16], dilation_rates=[1, 2])
    model = build("llama", 5).eval()
    whole = ds_ring.patch(copy.deepcopy(model), local=True, **pattern)
    ref_logits = whole(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    dense_logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    real = batch["attention_mask"].bool()
    res["dilated_vs_dense"] = rel_err(ref_logits[real], dense_logits[real])  # the pattern must matter
    for lay in ("contiguous", "zigzag"):
        sp_l = sp if lay == "contiguous" else zz
        ring = ds_ring.patch(copy.deepcopy(model), sp=sp_l, **pattern)
        out = ring(**ds_ring.shard_batch(batch, sp_l)).logits
        out = gather_sequence(out, 1, sp_l.group, lay)[:, : batch["input_ids"].shape[1]]
        res[f"dilated/{lay}"] = rel_err(out[real], ref_logits[real])

    # The ring's agreement runs once per model forward whatever the depth (its facts reach every layer through the
    # forward's kwargs), none in backward; host reads per forward do not grow with depth either.
    for layers in (1, 3):
        torch.manual_seed(9)
        model = ds_ring.patch(AutoModelForCausalLM.from_config(LlamaConfig(**{**_DEC, "num_hidden_layers": layers})),
                              sp=zz)
        local = ds_ring.shard_batch(batch, zz)
        labels = local.pop("shift_labels")
        with ds_ring.count_comm() as fwd, _HostReads() as reads:
            logits = model(**local).logits
        loss = ds_ring.causal_lm_loss(logits, labels, zz)
        with ds_ring.count_comm() as bwd:
            loss.backward()
        res[f"per_forward/{layers}"] = (dict(fwd.collectives), dict(bwd.collectives), sum(reads.count.values()))

    # A rank whose shard differs raises the same error as every other rank, at the forward's agreement.
    model = ds_ring.patch(build("llama", 3), sp=zz)
    local = ds_ring.shard_batch(batch, zz)
    if dist.get_rank() == 1:
        local = {k: v if v.dim() < 2 else v[:, :-2] for k, v in local.items()}
    try:
        model(**local)
        res["shape_differs"] = "no error"
    except ValueError as e:
        res["shape_differs"] = str(e)

    # A packed row whose document_ids were dropped on the way (positions restart inside shards) fails on every rank
    # instead of letting documents see each other.
    batch_p, _ = packed(PACKINGS["short"], 5)
    local = ds_ring.shard_batch(batch_p, zz)
    del local["shift_labels"], local["document_ids"]
    try:
        ds_ring.patch(build("llama", 3), sp=zz)(**local)
        res["dropped_document_ids"] = "no error"
    except ValueError as e:
        res["dropped_document_ids"] = str(e)

    # local_attention: every rank runs the full, unsharded sequence exactly, without communication.
    model = build("mistral", 4).eval()
    ref_logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    patched = ds_ring.patch(copy.deepcopy(model), sp=sp)
    with ds_ring.local_attention(patched):
        out = patched(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    res["local_attention"] = rel_err(out[batch["attention_mask"].bool()], ref_logits[batch["attention_mask"].bool()])
    return res


class _HostReads(TorchFunctionMode):
    """Counts tensor -> host reads (each a sync on CUDA)."""

    def __init__(self):
        super().__init__()
        self.count = Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in ("item", "tolist", "__bool__", "equal", "nonzero"):
            self.count[func.__name__] += 1
        return func(*args, **(kwargs or {}))


# Packed rows over the ring: documents crossing shard boundaries, starting exactly on them (for P = 2 and 4 the
# documents of [8, 8, 16] start on shard starts, whose positions are then exactly arange(L)), shorter than a shard,
# a packed row padded on the right to a fixed length, and a length shard_batch must pad.
PACKINGS = {"cross": [10, 5, 11, 6], "aligned": [8, 8, 16], "short": [3, 4, 2, 5, 3, 4, 3, 2, 6],
            "padded": [10, 12], "uneven": [10, 5, 11, 4]}


def _packing_cases(world: int) -> dict[str, dict[str, float]]:
    sps = {lay: ds_ring.init_sequence_parallel(world, layout=lay) for lay in ("contiguous", "zigzag")}
    out = {}
    for i, name in enumerate(("llama", "gpt2")):  # RoPE with GQA; learned absolute positions
        for j, (kind, lengths) in enumerate(PACKINGS.items()):
            for lay, sp in sps.items():
                seed = 1000 + 100 * i + 10 * j + (lay == "zigzag")
                form = {} if (i + j) % 2 else dict(return_flash_attn_kwargs=True, return_seq_idx=True)
                batch, docs = packed(lengths, seed, form)
                if kind == "padded":  # pad to 32 tokens: pad id 0, masked, no target
                    n = 32 - batch["input_ids"].shape[1]
                    batch = {"input_ids": F.pad(batch["input_ids"], (0, n)),
                             "labels": F.pad(batch["labels"], (0, n), value=-100),
                             "position_ids": F.pad(batch["position_ids"], (0, n)),
                             "attention_mask": F.pad(torch.ones_like(batch["input_ids"]), (0, n))}
                model = build(name, seed).train()
                ref_logits, ref_grads = documents_alone(model, docs)
                patched = ds_ring.patch(copy.deepcopy(model), sp=sp)
                local = ds_ring.shard_batch(batch, sp)
                labels = local.pop("shift_labels")
                logits = patched(**local).logits
                loss = ds_ring.causal_lm_loss(logits, labels, sp)
                loss.backward()
                grads = {}
                for n_, p in patched.named_parameters():
                    if p.grad is not None:
                        dist.all_reduce(p.grad, group=sp.group)
                        grads[n_] = p.grad
                full = gather_sequence(logits.detach(), 1, sp.group, lay)[:, : ref_logits.shape[0]]
                out[f"{name}/{kind}/{lay}"] = compare((ref_logits[None], None, ref_grads), (full, None, grads),
                                                      torch.ones(1, ref_logits.shape[0]), loss=False)
    return out


def _worker(rank: int, world: int) -> dict:
    return {"equivalence": _equivalence_cases(world), "special": _special_cases(world),
            "packing": _packing_cases(world)}


@pytest.fixture(scope="module", params=[2, 4], ids=lambda p: f"P{p}")
def ring_results(request):
    results = run_distributed(_worker, request.param)
    for r in results[1:]:  # every rank computed the same gathered logits, loss and summed grads
        assert r["equivalence"].keys() == results[0]["equivalence"].keys()
    return results


def test_patched_models_match_unpatched_one_process(ring_results):
    """Llama, Mistral (window 7 < 30), Qwen2, Qwen3, GPT-NeoX, GPT-2, BERT; right/left padding; both layouts."""
    bad = {
        (rank, case): r
        for rank, res in enumerate(ring_results)
        for case, r in res["equivalence"].items()
        if max(r["logits"], r["loss"], r["grads"]) >= TOL
    }
    assert not bad, bad
    assert len(ring_results[0]["equivalence"]) == 7 * 2 * 2


def test_packed_rows_over_the_ring_equal_each_document_alone(ring_results):
    """shard_batch on packed batches (restarting position_ids, or the cu_seq_lens/seq_idx form): every document
    gets its solo logits, and the ring's mean loss its solo gradients."""
    for rank, res in enumerate(ring_results):
        bad = {case: r for case, r in res["packing"].items() if max(r.values()) >= TOL}
        assert not bad, (rank, bad)
        assert len(res["packing"]) == 2 * len(PACKINGS) * 2


def test_padding_reaches_the_op(ring_results):
    # These cases pass above only because the mask travelled: without it the reference logits change this much.
    for case, r in ring_results[0]["equivalence"].items():
        if case.endswith(("left/contiguous", "left/zigzag")) or case.startswith("bert/"):
            assert r["mask_effect"] > 10 * TOL, (case, r)


def test_gradient_checkpointing_and_attn_implementation(ring_results):
    for res in ring_results:
        sp = res["special"]
        for case in ("grad_checkpointing", "from_config/qwen2", "from_config/gpt2",
                     "set_attn_implementation/qwen2", "set_attn_implementation/gpt2"):  # fmt: skip
            assert max(sp[case].values()) < TOL, (case, sp[case])


def test_missing_global_position_ids_raises(ring_results):
    for res in ring_results:
        for lay in ("contiguous", "zigzag"):
            msg = res["special"][f"missing_position_ids/{lay}"]
            assert "position_ids" in msg and "shard_batch" in msg, msg


def test_packed_row_without_document_ids_fails_on_every_rank(ring_results):
    for res in ring_results:
        msg = res["special"]["dropped_document_ids"]
        assert "restart inside the shard" in msg and "document_ids" in msg, msg


def test_one_agreement_per_forward_and_a_shape_mismatch_fails_everywhere(ring_results):
    for res in ring_results:
        sp = res["special"]
        (f1, b1, reads1), (f3, b3, reads3) = sp["per_forward/1"], sp["per_forward/3"]
        assert f1 == f3 == {"agreement": 1} and b1 == b3 == {}, (f1, f3, b1, b3)
        assert reads1 == reads3, (reads1, reads3)  # host reads do not grow with the number of layers
        assert "local_len differs" in sp["shape_differs"], sp["shape_differs"]


def test_dilated_pattern_over_ring_matches_one_process(ring_results):
    for res in ring_results:
        sp = res["special"]
        assert sp["dilated_vs_dense"] > 10 * TOL  # the dilated pattern is not the dense one
        assert sp["dilated/contiguous"] < TOL and sp["dilated/zigzag"] < TOL, sp


def test_local_attention_runs_unsharded_input(ring_results):
    for res in ring_results:
        assert res["special"]["local_attention"] < TOL


# ---- single process: errors, patch/unpatch, generation ------------------------------------------------------------


def _ids(seq: int = 12) -> dict[str, torch.Tensor]:
    b = padded_batch(0, "left", seq=seq, lengths=[seq, seq - 4])
    return {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]}


def test_softcap_raises_naming_model_and_feature():
    torch.manual_seed(0)
    cfg = Gemma2Config(**{**_DEC, "head_dim": 8}, attn_logit_softcapping=50.0)
    model = ds_ring.patch(AutoModelForCausalLM.from_config(cfg))
    with pytest.raises(NotImplementedError, match=r"Gemma2Attention.*soft-capping"):
        model(**_ids())


def test_attention_dropout_in_training_raises():
    torch.manual_seed(0)
    model = ds_ring.patch(AutoModelForCausalLM.from_config(LlamaConfig(**{**_DEC, "attention_dropout": 0.1})))
    with pytest.raises(NotImplementedError, match=r"LlamaAttention.*dropout 0.1.*attention_dropout"):
        model.train()(**_ids())
    model.eval()(**_ids())  # no dropout at evaluation: fine


def test_4d_custom_mask_raises():
    model = ds_ring.patch(build("llama", 0))
    mask4d = torch.ones(2, 1, 12, 12, dtype=torch.bool).tril()
    with pytest.raises(NotImplementedError, match=r"LlamaAttention.*4D attention mask"):
        model(input_ids=_ids()["input_ids"], attention_mask=mask4d)


def test_family_without_attention_interface_raises():
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(BloomConfig(vocab_size=VOCAB, hidden_size=32, n_layer=1, n_head=4))
    with pytest.raises(NotImplementedError, match=r"BloomForCausalLM.*AttentionInterface"):
        ds_ring.patch(model)
    assert model.config._attn_implementation != "ring_dilated"


def test_patch_unpatch_and_generation_single_process():
    model = build("qwen3", 5).eval()
    batch = _ids()
    ref = model(**batch).logits
    before = model.config._attn_implementation
    gen_ref = model.generate(**batch, max_new_tokens=5, do_sample=False, use_cache=True)
    ds_ring.patch(model)
    assert model.config._attn_implementation == "ring_dilated"
    real = batch["attention_mask"].bool()
    assert rel_err(model(**batch).logits[real], ref[real]) < TOL  # one rank: exact local attention
    # generate with a KV cache: decoding steps have fewer queries than keys
    assert torch.equal(model.generate(**batch, max_new_tokens=5, do_sample=False, use_cache=True), gen_ref)
    ds_ring.unpatch(model)
    assert model.config._attn_implementation == before
    assert not any(hasattr(m, "_ds_ring") for m in model.modules())


def test_two_models_keep_their_own_settings():
    a = ds_ring.patch(build("llama", 0), layout="zigzag", segment_lengths=[4, 8], dilation_rates=[1, 2])
    b = ds_ring.patch(build("llama", 0), local=True)
    sa = {id(m._ds_ring.settings): m._ds_ring.settings for m in a.modules()}  # every module: its model's settings
    sb = {id(m._ds_ring.settings): m._ds_ring.settings for m in b.modules()}
    assert len(sa) == len(sb) == 1 and sa.keys() != sb.keys()
    (sa,), (sb,) = sa.values(), sb.values()
    assert (sa.layout, sa.segment_lengths, sa.dilation_rates, sa.local) == ("zigzag", (4, 8), (1, 2), False)
    assert (sb.layout, sb.segment_lengths, sb.local) == ("contiguous", None, True)


def test_patch_validates_arguments():
    model = build("llama", 0)
    with pytest.raises(ValueError, match="dilation_rates"):
        ds_ring.patch(model, segment_lengths=[4, 8])
    with pytest.raises(ValueError, match="layout"):
        ds_ring.patch(model, layout="striped")
    with pytest.raises(ValueError, match="was not patched"):
        ds_ring.unpatch(model)
    with pytest.raises(ValueError, match="ds_ring.patch"), ds_ring.local_attention(model):
        pass


# ---- packed documents ---------------------------------------------------------------------------------------------


def packed(lengths: list[int], seed: int, collator_kwargs: dict | None = None) -> tuple[dict, list[dict]]:
    """A row packed by transformers' DataCollatorWithFlattening from documents of ``lengths`` tokens, and the
    documents as the collator's features (each document alone)."""
    from transformers import DataCollatorWithFlattening

    g = torch.Generator().manual_seed(seed)
    docs = [{"input_ids": torch.randint(1, VOCAB, (n,), generator=g).tolist()} for n in lengths]
    for d in docs:
        d["labels"] = list(d["input_ids"])
    return DataCollatorWithFlattening(**(collator_kwargs or {}))(docs), docs


def documents_alone(model, docs: list[dict]):
    """Each document alone through ``model``: its logits, and the grads of the summed next-token CE over all
    documents divided by the number of targets (what the packed row's mean loss is)."""
    model.zero_grad()
    outs, total, count = [], 0.0, 0
    for d in docs:
        ids = torch.tensor([d["input_ids"]])
        logits = model(input_ids=ids).logits
        target = F.pad(ids, (0, 1), value=-100)[:, 1:]
        total = total + F.cross_entropy(logits.float().flatten(0, 1), target.flatten(), reduction="sum")
        count += ids.shape[1] - 1
        outs.append(logits.detach()[0])
    (total / count).backward()
    return torch.cat(outs), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_packed_row_equals_each_document_alone_single_process(name):
    """One process: a patched model on a row packed by DataCollatorWithFlattening (restarting position_ids, no
    mask; or its cu_seq_lens/seq_idx form) gives every document its solo logits and gradients, as sdpa does."""
    model = build(name, 11).train()
    batch, docs = packed([9, 5, 12, 4], seed=3)
    ref_logits, ref_grads = documents_alone(model, docs)
    patched = ds_ring.patch(copy.deepcopy(model))
    for form in ("position_ids", "flash_attn_kwargs"):
        if form == "flash_attn_kwargs":  # what the collator gives with return_flash_attn_kwargs / return_seq_idx
            batch, _ = packed([9, 5, 12, 4], seed=3, collator_kwargs=dict(return_flash_attn_kwargs=True,
                                                                           return_seq_idx=True))
        patched.zero_grad()
        kw = {k: v for k, v in batch.items() if k != "labels"}
        if name == "bert":  # a bidirectional encoder has no next-token loss of its own: the same objective
            logits = patched(**kw).logits
            target = F.pad(batch["labels"], (0, 1), value=-100)[:, 1:]
            loss = F.cross_entropy(logits.float().flatten(0, 1), target.flatten(), ignore_index=-100)
        else:
            out = patched(**kw, labels=batch["labels"])
            logits, loss = out.logits, out.loss
        loss.backward()
        grads = {n: p.grad for n, p in patched.named_parameters() if p.grad is not None}
        r = compare((ref_logits[None], None, ref_grads), (logits.detach(), None, grads),
                    torch.ones(1, ref_logits.shape[0]), loss=False)
        assert max(r.values()) < TOL, (name, form, r)
    # power: without the document structure the second document would see the first
    plain = model(input_ids=batch["input_ids"]).logits.detach()[0]
    assert rel_err(plain[9:], ref_logits[9:]) > 10 * TOL


def test_models_with_non_attention_mixers_are_refused():
    """Qwen3-Next (gated delta net + convolution) and Falcon-H1 (Mamba mixers) carry state along the sequence."""
    from transformers import FalconH1Config, Qwen3NextConfig

    qwen3_next = Qwen3NextConfig(**{**_DEC, "head_dim": 8}, linear_num_value_heads=4, linear_num_key_heads=2,
                                 linear_key_head_dim=8, linear_value_head_dim=8, moe_intermediate_size=16,
                                 shared_expert_intermediate_size=16, num_experts=2, num_experts_per_tok=1)
    falcon_h1 = FalconH1Config(**{**_DEC, "head_dim": 8}, mamba_d_ssm=32, mamba_n_heads=4, mamba_d_head=8,
                               mamba_d_state=8, mamba_n_groups=1)
    for cfg, words in ((qwen3_next, r"Qwen3NextForCausalLM.*linear_attention.*GatedDeltaNet"),
                       (falcon_h1, r"FalconH1ForCausalLM.*FalconH1Mixer")):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(cfg)
        with pytest.raises(NotImplementedError, match=words):
            ds_ring.patch(model)
        assert model.config._attn_implementation != "ring_dilated"


def test_dilated_pattern_on_packed_rows_equals_each_document_alone():
    """A dilated pattern on a row packed by DataCollatorWithFlattening: segments and dilation classes count from
    each document's start, so every document gets the logits and gradients the same patched model gives it alone."""
    model = ds_ring.patch(build("llama", 0).train(), segment_lengths=[8, 16], dilation_rates=[1, 2])
    batch, docs = packed([9, 5, 12, 4], seed=3)
    ref_logits, ref_grads = documents_alone(model, docs)
    model.zero_grad()
    out = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], labels=batch["labels"])
    out.loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    r = compare((ref_logits[None], None, ref_grads), (out.logits.detach(), None, grads),
                torch.ones(1, ref_logits.shape[0]), loss=False)
    assert max(r.values()) < TOL, r


def test_shard_batch_reads_packing_like_transformers():
    """document_ids from restarting position_ids (transformers' rule), seq_idx or cu_seq_lens; the padding that
    shard_batch adds is a document of its own; without position_ids each document counts from 0."""
    from ds_ring.parallel.groups import SequenceParallel

    one = SequenceParallel(None, None, 1, 0, 1, 0, "zigzag")  # one rank, zigzag: lengths must be even
    batch, _ = packed([10, 5, 11, 4], seed=1, collator_kwargs=dict(return_flash_attn_kwargs=True,
                                                                    return_seq_idx=True))
    want = torch.repeat_interleave(torch.arange(4), torch.tensor([10, 5, 11, 4]))[None]
    for keep in (("position_ids",), ("seq_idx",), ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q",
                                                     "max_length_k")):
        b = {k: v for k, v in batch.items() if k in ("input_ids", "labels") + keep}
        out = ds_ring.shard_batch(b, one)
        assert torch.equal(out["document_ids"], want), keep
        assert torch.equal(out["position_ids"], batch["position_ids"]), keep  # restart at every document
        assert not set(out) & {"seq_idx", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k"}
    odd = {k: v[:, :29] for k, v in batch.items() if k in ("input_ids", "labels", "position_ids")}
    out = ds_ring.shard_batch(odd, one)  # 29 -> 30: one pad token, its own document, masked
    assert out["document_ids"][0, -1] == 4 and out["attention_mask"][0, -1] == 0
    plain = ds_ring.shard_batch({"input_ids": batch["input_ids"]}, one)
    assert "document_ids" not in plain
