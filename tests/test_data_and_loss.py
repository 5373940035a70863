"""shard_batch, sp_dataloader and causal_lm_loss on real gloo ranks (one spawn of 4: two rings of 2, and one of 4)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

import ds_ring
from ds_ring.parallel.groups import SequenceParallel
from dist_utils import run_distributed

WORLD = 4
SEQ = 13  # divides neither 2, 4 nor 8: shard_batch must pad


def full_batch(seed: int, b: int = 3, seq: int = SEQ) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 50, (b, seq), generator=g)
    mask = torch.ones(b, seq, dtype=torch.long)
    mask[1, 9:] = 0  # right padded
    mask[2, :4] = 0  # left padded
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.randint(1, 50, (b, seq), generator=g)}


def expected_index(seq_pad: int, world: int, rank: int, layout: str) -> torch.Tensor:
    """Global positions of a rank, written out from the layout definitions (independent of sharding.py)."""
    if layout == "contiguous":
        n = seq_pad // world
        return torch.arange(rank * n, (rank + 1) * n)
    c = seq_pad // (2 * world)
    mirror = 2 * world - 1 - rank
    return torch.cat([torch.arange(rank * c, (rank + 1) * c), torch.arange(mirror * c, (mirror + 1) * c)])


def _loss_cases(sp: SequenceParallel) -> dict:
    """Loss value on this rank and this rank's gradient w.r.t. the FULL logits (zero outside its shard)."""
    g = torch.Generator().manual_seed(1)
    b, s, v = 2, 8 * sp.sp_size, 11
    full_logits = torch.randn(b, s, v, generator=g)
    out = {}
    labels_unequal = torch.randint(0, v, (b, s), generator=g)
    labels_unequal[:, expected_index(s, sp.sp_size, 0, sp.layout)] = -100  # ring rank 0 holds no valid token
    labels_unequal[0, -3:] = -100
    all_ignored = torch.full((b, s), -100)
    for name, labels in (("unequal", labels_unequal), ("all_ignored", all_ignored)):
        leaf = full_logits.clone().requires_grad_(True)
        local_logits = ds_ring.shard_sequence(leaf, 1, sp.group, sp.layout)
        local_labels = ds_ring.shard_sequence(labels, 1, sp.group, sp.layout)
        loss = ds_ring.causal_lm_loss(local_logits, local_labels, sp)
        loss.backward()
        grad = leaf.grad.clone()
        dist.all_reduce(grad, group=sp.group)  # the documented contract: SUM over the ring
        out[name] = {"loss": loss.detach(), "grad": grad, "logits": full_logits, "labels": labels,
                     "valid": int((local_labels != -100).sum())}  # fmt: skip
    return out


def _loader_cases(sp: SequenceParallel) -> dict:
    dl = ds_ring.sp_dataloader(list(range(22)), sp, batch_size=3, seed=5)
    epochs = []
    for epoch in (0, 1):
        dl.set_epoch(epoch)
        epochs.append([x for batch in dl for x in batch.tolist()])
    return {"epochs": epochs, "dp_rank": sp.dp_rank}


def _worker(rank: int, world: int) -> dict:
    rings2 = {lay: ds_ring.init_sequence_parallel(2, layout=lay) for lay in ("contiguous", "zigzag")}
    ring4 = {lay: ds_ring.init_sequence_parallel(4, layout=lay) for lay in ("contiguous", "zigzag")}
    res = {"shard": {}, "loss": {}}
    for size, sps in ((2, rings2), (4, ring4)):
        for lay, sp in sps.items():
            res["shard"][(size, lay)] = (sp.sp_rank, ds_ring.shard_batch(full_batch(0), sp))
            res["loss"][(size, lay)] = _loss_cases(sp)
    res["loader"] = _loader_cases(rings2["contiguous"])
    return res


@pytest.fixture(scope="module")
def results():
    return run_distributed(_worker, WORLD)


def reference_shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """transformers' ForCausalLMLoss: position i predicts labels[i+1], the last position nothing. Nothing else is
    ignored: full_batch's labels are real tokens even on padding, and the user's labels decide."""
    return F.pad(labels, (0, 1), value=-100)[:, 1:]


@pytest.mark.parametrize("size,layout", [(2, "contiguous"), (2, "zigzag"), (4, "contiguous"), (4, "zigzag")])
def test_shard_batch_pads_and_shards_consistently(results, size, layout):
    batch = full_batch(0)
    parts = size * (2 if layout == "zigzag" else 1)
    seq_pad = -(-SEQ // parts) * parts
    pad = seq_pad - SEQ
    ids = F.pad(batch["input_ids"], (0, pad), value=0)
    mask = F.pad(batch["attention_mask"], (0, pad), value=0)
    shift = F.pad(reference_shift_labels(batch["labels"]), (0, pad), value=-100)
    seen_real = 0
    for res in results:
        sp_rank, local = res["shard"][(size, layout)]
        idx = expected_index(seq_pad, size, sp_rank, layout)
        assert set(local) == {"input_ids", "attention_mask", "position_ids", "shift_labels", "batch_fingerprint"}
        assert torch.equal(local["input_ids"], ids[:, idx])
        assert torch.equal(local["attention_mask"], mask[:, idx]) and local["attention_mask"].dtype == torch.long
        assert torch.equal(local["position_ids"], idx.expand(3, -1))  # global, same rule as the unpatched model
        assert torch.equal(local["shift_labels"], shift[:, idx])  # shifted before sharding
        seen_real += int(local["attention_mask"].sum())
    assert seen_real == int(batch["attention_mask"].sum()) * (WORLD // size)  # nothing truncated


def test_shard_batch_keeps_boundary_targets_and_rejects_unknown_keys(results):
    # Contiguous ring of 2, S_pad = 14: rank 0's last position (6) predicts token 7, held by rank 1.
    batch = full_batch(0)
    _, local0 = next(r["shard"][(2, "contiguous")] for r in results if r["shard"][(2, "contiguous")][0] == 0)
    assert torch.equal(local0["shift_labels"][0, -1], batch["labels"][0, 7])
    sp1 = SequenceParallel(None, None, 1, 0, 1, 0)
    with pytest.raises(ValueError, match="pixel_values"):
        ds_ring.shard_batch({**batch, "pixel_values": torch.zeros(3, 13)}, sp1)
    out = ds_ring.shard_batch({"input_ids": batch["input_ids"]}, sp1)  # mask always present, no labels -> none
    assert torch.equal(out["attention_mask"], torch.ones(3, SEQ, dtype=torch.long)) and "shift_labels" not in out


@pytest.mark.parametrize("size,layout", [(2, "contiguous"), (2, "zigzag"), (4, "contiguous"), (4, "zigzag")])
def test_loss_is_global_mean_and_grads_sum_to_one_process(results, size, layout):
    first = results[0]["loss"][(size, layout)]
    logits, labels = first["unequal"]["logits"], first["unequal"]["labels"]
    leaf = logits.clone().requires_grad_(True)
    ref = F.cross_entropy(leaf.flatten(0, 1), labels.flatten(), ignore_index=-100)
    ref.backward()
    valid = [r["loss"][(size, layout)]["unequal"]["valid"] for r in results[:size]]
    assert 0 in valid and len(set(valid)) > 1  # the case has ranks with unequal and zero valid tokens
    for r in results:
        got = r["loss"][(size, layout)]["unequal"]
        torch.testing.assert_close(got["loss"], ref.detach(), rtol=1e-5, atol=0)  # same value on every rank
        torch.testing.assert_close(got["grad"], leaf.grad, rtol=1e-5, atol=1e-7)
        none = r["loss"][(size, layout)]["all_ignored"]
        assert none["loss"].item() == 0.0 and torch.count_nonzero(none["grad"]) == 0


def test_sp_dataloader_same_samples_in_a_ring_different_across_rings(results):
    by_dp = {}
    for r in results:  # world 4 = two rings of 2: ranks 0,1 (dp_rank 0) and 2,3 (dp_rank 1)
        by_dp.setdefault(r["loader"]["dp_rank"], []).append(r["loader"]["epochs"])
    assert sorted(by_dp) == [0, 1]
    for epochs in by_dp.values():
        assert epochs[0] == epochs[1]  # both ranks of a ring see the same samples in the same order
    for epoch in (0, 1):
        a, b = by_dp[0][0][epoch], by_dp[1][0][epoch]
        assert not set(a) & set(b) and len(a) == len(b) == 11
        assert set(a) | set(b) == set(range(22))
    assert by_dp[0][0][0] != by_dp[0][0][1]  # set_epoch reshuffles
