"""ds_ring.sequence_logprobs / token_logprobs on real gloo ranks against a float64 one-process definition.

Rings of P = 1, 2, 4 (one spawn of 4 ranks) and P = 3 (one spawn of 3), both layouts, padded rows (right- and
left-padded, a prompt whose targets are ignored) and packed rows (documents restarting their positions), both forms
(logits; hidden states + a biased LM head in chunks of 3 rows). Compared: the per-sequence (per-document) sums on every
rank, and the gradients of a nonlinear function of them (a DPO-like logsigmoid of differences, plus a weighted sum)
summed over the ring, w.r.t. the full logits, the full hidden states and the head's weight and bias: < 1e-5 relative.
"""

from __future__ import annotations

import random

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

import ds_ring
import ds_ring.op.documents
from dist_utils import run_distributed

B, S, V, H = 4, 13, 11, 6  # S divides no ring size: shard_batch pads
CASES = ("padded", "packed")
FORMS = ("logits", "chunked")


def make_case(seed: int, case: str) -> dict[str, torch.Tensor]:
    """Full (unsharded) batch: input_ids (only their shape matters), labels, and position_ids for packed rows."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, V, (B, S), generator=g)
    batch = {"input_ids": torch.randint(1, V, (B, S), generator=g)}
    if case == "padded":  # rows: full, right-padded, left-padded, a prompt of 5 (ignored) then the completion
        labels[1, 9:] = -100
        labels[2, :4] = -100
        labels[3, :5] = -100
        mask = (labels != -100).long()
        mask[3] = 1
        batch["attention_mask"] = mask
    else:  # packed: documents of lengths (5, 4, 4), (13), (2, 6, 5), (7, 6); each document's first label ignored
        pos = []
        for i, lengths in enumerate(((5, 4, 4), (13,), (2, 6, 5), (7, 6))):
            p = torch.cat([torch.arange(n) for n in lengths])
            labels[i, p == 0] = -100
            pos.append(p)
        batch["position_ids"] = torch.stack(pos)
    batch["labels"] = labels
    g2 = torch.Generator().manual_seed(seed + 1)
    return {**batch, "logits": torch.randn(B, S, V, generator=g2) * 2, "hidden": torch.randn(B, S, H, generator=g2),
            "weight": torch.randn(V, H, generator=g2), "bias": torch.randn(V, generator=g2),
            "w": torch.randn(B * 3, generator=g2)}


def objective(sums: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """A nonlinear function of the sums (the same on every rank): DPO-like pairs plus a weighted sum."""
    flat = sums.reshape(-1)
    pairs = -F.logsigmoid(0.3 * (flat[0::2] - flat[1::2])).sum()
    return pairs + (w[: flat.numel()] * flat).sum() * 0.1


def reference(case: dict, form: str) -> dict[str, torch.Tensor]:
    """float64, one process, from the definition: log_softmax of the full logits, target of i = labels[i + 1]."""
    logits_leaf = case["logits"].double().requires_grad_(True)
    hidden = case["hidden"].double().requires_grad_(True)
    weight = case["weight"].double().requires_grad_(True)
    bias = case["bias"].double().requires_grad_(True)
    logits = logits_leaf if form == "logits" else hidden @ weight.T + bias
    target = F.pad(case["labels"], (0, 1), value=-100)[:, 1:]
    lp = torch.log_softmax(logits, -1).gather(-1, target.clamp(min=0)[..., None])[..., 0] * (target != -100)
    docs = ds_ring.op.documents.document_ids_from(case, (B, S))
    sums = lp.sum(1) if docs is None else torch.zeros(B, int(docs.max()) + 1, dtype=lp.dtype).scatter_add(1, docs, lp)
    objective(sums, case["w"].double()).backward()
    grads = {"logits": logits_leaf.grad} if form == "logits" else {"hidden": hidden.grad, "weight": weight.grad,
                                                                   "bias": bias.grad}
    return {"sums": sums.detach(), **grads}


def ring_result(case: dict, form: str, sp) -> dict[str, torch.Tensor]:
    """This ring's sums (on this rank) and the gradients summed over the ring (the documented contract)."""
    keys = ("input_ids", "attention_mask", "labels", "position_ids")
    local = ds_ring.shard_batch({k: case[k] for k in keys if k in case}, sp)
    pad = sp.sequence_layout.padded_length(S, sp.sp_size) - S

    def shard(t: torch.Tensor) -> torch.Tensor:
        return ds_ring.shard_sequence(F.pad(t, (0, 0, 0, pad)), 1, sp.group, sp.sequence_layout)

    leaves = {k: case[k].clone().requires_grad_(True) for k in ("logits", "hidden", "weight", "bias")}
    head = torch.nn.Linear(H, V)
    head.weight, head.bias = torch.nn.Parameter(leaves["weight"]), torch.nn.Parameter(leaves["bias"])
    x = shard(leaves["logits"]) if form == "logits" else shard(leaves["hidden"])
    sums = ds_ring.sequence_logprobs(x, local["shift_labels"], sp if sp.sp_size > 1 else None,
                                     lm_head=None if form == "logits" else head, document_ids=local.get("document_ids"),
                                     chunk_tokens=3)
    docs = ds_ring.op.documents.document_ids_from(case, (B, S))
    used = sums if docs is None else sums[:, : int(docs.max()) + 1]  # without the ring's padding document
    objective(used, case["w"]).backward()
    if form == "logits":
        grads = {"logits": leaves["logits"].grad}
    else:
        grads = {"hidden": leaves["hidden"].grad, "weight": head.weight.grad, "bias": head.bias.grad}
    for g in grads.values():
        if sp.sp_size > 1:
            dist.all_reduce(g, group=sp.group)
    return {"sums": sums.detach(), **grads}


def _worker(rank: int, world: int, seed: int, sizes: tuple[int, ...]) -> dict:
    out = {}
    for size in sizes:
        for layout in ("contiguous", "zigzag"):
            sp = ds_ring.init_sequence_parallel(size, layout=layout)
            for i, case in enumerate(CASES):
                for form in FORMS:
                    out[(size, layout, case, form)] = ring_result(make_case(seed + i, case), form, sp)
    return out


@pytest.fixture(scope="module")
def results():
    seed = random.randrange(10**6)  # fresh inputs every run
    four = run_distributed(_worker, 4, seed, (1, 2, 4))
    three = run_distributed(_worker, 3, seed, (3,))
    return seed, four, three


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
@pytest.mark.parametrize("size", [1, 2, 3, 4])
def test_sequence_logprobs_match_float64(results, size, layout, case, form):
    seed, four, three = results
    ref = reference(make_case(seed + CASES.index(case), case), form)
    ranks = three if size == 3 else four
    for rank, res in enumerate(ranks):
        got = res[(size, layout, case, form)]
        if case == "packed":  # the ring's padding (a document of its own) adds a column with nothing to sum
            assert torch.count_nonzero(got["sums"][:, ref["sums"].shape[1]:]) == 0
            got = {**got, "sums": got["sums"][:, : ref["sums"].shape[1]]}
        for k, want in ref.items():  # every rank of the ring holds the sums; the summed gradients are the ring's
            torch.testing.assert_close(got[k].double(), want, rtol=1e-5, atol=1e-6, msg=lambda m: f"{k} rank {rank}: {m}")


def test_token_logprobs_forms_agree_and_chunk_size_is_free():
    g = torch.Generator().manual_seed(random.randrange(10**6))
    x, head = torch.randn(2, 9, H, generator=g), torch.nn.Linear(H, V)
    labels = torch.randint(0, V, (2, 9), generator=g)
    labels[0, :3] = -100
    full = ds_ring.token_logprobs(head(x), labels)
    assert (full[0, :3] == 0).all()
    for chunk in (1, 4, 100):
        torch.testing.assert_close(ds_ring.token_logprobs(x, labels, lm_head=head, chunk_tokens=chunk), full)
    with pytest.raises(ValueError, match="chunk_tokens must be a positive int"):
        ds_ring.token_logprobs(x, labels, lm_head=head, chunk_tokens=0)
    with pytest.raises(ValueError, match="must lie in"):
        ds_ring.sequence_logprobs(head(x), labels, None, document_ids=torch.zeros_like(labels) + 2, num_documents=2)
