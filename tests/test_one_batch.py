"""One ring, one batch: the ranks of a ring must hold the same full batch (each keeps its own slice of the sequence).

A dataloader sharded over every process gives each rank a different batch; ``shard_batch`` + the patched model would
then train on a sequence stitched from several, with no error. ``shard_batch`` fingerprints what it received and the
ring's one agreement per forward compares the fingerprints: different batches raise the same error on every rank at
the first forward, naming the fix; the same batches cost nothing more (the agreement's one collective). Real ranks
over gloo: 4 ranks in 2 rings of 2 (different rings hold different batches, as data parallelism wants), and one
two-dimensional grid of 2 ring positions x 2 Ulysses ranks (the Ulysses group agrees first).
"""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from dist_utils import run_distributed

WORLD, SP, B, S, VOCAB = 4, 2, 2, 32, 64


class _Rows(Dataset):
    """Random token rows, the same on every rank (a fixed generator)."""

    def __init__(self, n: int = 16):
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(1, VOCAB, (n, S), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _job(rank: int, world: int, sp_size: int = SP, ulysses_size: int = 1) -> dict:
    import accelerate
    from transformers import LlamaConfig, LlamaForCausalLM

    import ds_ring

    sp = ds_ring.init_sequence_parallel(sp_size, ulysses_size=ulysses_size)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=S, use_cache=False)
    model = ds_ring.patch(LlamaForCausalLM(cfg), sp=sp)
    data = _Rows()

    def first_forward(loader, edit=None) -> tuple[str, dict, list]:
        """The first batch of ``loader`` through shard_batch and the model: the error (or "ok"), the collectives of
        the forward, and the batch's first row (what this rank was given)."""
        batch = next(iter(loader))
        local = ds_ring.shard_batch(edit(batch) if edit else batch, sp)
        local.pop("shift_labels")
        with ds_ring.count_comm() as comm:
            try:
                model(**local)
                verdict = "ok"
            except ValueError as e:
                verdict = str(e)
        return verdict, dict(comm.collectives), batch["input_ids"][0, :4].tolist()

    out = {"ring": sp.dp_rank}
    world_sampler = DistributedSampler(data, num_replicas=world, rank=rank, shuffle=True, seed=1)
    out["world sampler"] = first_forward(DataLoader(data, batch_size=B, sampler=world_sampler))
    out["sp_dataloader"] = first_forward(ds_ring.sp_dataloader(data, sp, batch_size=B, seed=1))
    # the same tokens but other labels on one rank: positions and shapes agree, only the fingerprint can tell
    out["labels differ"] = first_forward(
        ds_ring.sp_dataloader(data, sp, batch_size=B, seed=1),
        edit=lambda b: {**b, "labels": b["labels"].roll(1, 1) if sp.sp_rank == 1 else b["labels"]})
    accelerator = accelerate.Accelerator(cpu=True)
    out["accelerate"] = first_forward(accelerator.prepare(DataLoader(data, batch_size=B, shuffle=False)))
    return out


@pytest.fixture(scope="module")
def results():
    return run_distributed(_job, WORLD)


@pytest.fixture(scope="module")
def results_2d():
    return run_distributed(_job, WORLD, WORLD, 2)


@pytest.mark.parametrize("case,grid", [
    ("world sampler", "rings of 2"), ("accelerate", "rings of 2"), ("labels differ", "rings of 2"),
    ("world sampler", "2 x 2 Ulysses"), ("accelerate", "2 x 2 Ulysses"),
])
def test_different_batches_in_a_ring_raise_the_same_error_on_every_rank(results, results_2d, case, grid):
    res = results if grid == "rings of 2" else results_2d
    if case != "labels differ":  # the loader really gave the ranks of a ring different batches
        for ring in {r["ring"] for r in res}:
            firsts = [r[case][2] for r in res if r["ring"] == ring]
            assert firsts[0] != firsts[1], f"{case}: the ranks of ring {ring} got the same batch; the test is void"
    errors = [r[case][0] for r in res]
    assert len(set(errors)) == 1, errors  # the same words on every rank
    assert "different batches" in errors[0] and "ds_ring.sp_dataloader" in errors[0], errors[0]
    # no collective of its own: the agreement's one (under 2D, the Ulysses group's and the ring's)
    agreements = 1 if grid == "rings of 2" else 2
    assert all(r[case][1] == {"agreement": agreements} for r in res), [r[case][1] for r in res]


def test_same_batch_in_a_ring_passes_with_one_collective(results, results_2d):
    for r in results:
        assert r["sp_dataloader"][0] == "ok", r["sp_dataloader"][0]
        assert r["sp_dataloader"][1] == {"agreement": 1}  # the fingerprint rides in the one agreement
    rings = {r["ring"]: r["sp_dataloader"][2] for r in results}
    assert rings[0] != rings[1]  # rings are data-parallel: different batches there are no error
    for r in results_2d:
        assert r["sp_dataloader"][0] == "ok", r["sp_dataloader"][0]


def test_fingerprint_sees_every_key_value_and_order():
    from ds_ring.training.data import batch_fingerprint

    g = torch.Generator().manual_seed(5)
    ids = torch.randint(1, VOCAB, (B, S), generator=g)
    batch = {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}
    fp = batch_fingerprint(batch)
    assert fp.dtype == torch.int64 and fp.dim() == 0
    assert torch.equal(fp, batch_fingerprint({k: v.clone() for k, v in batch.items()}))  # deterministic
    changed = [
        {**batch, "labels": torch.where(ids == ids[0, 3], -100, ids)},  # one label ignored
        {**batch, "input_ids": ids.flip(1)},  # the same tokens in another order
        {**batch, "attention_mask": batch["attention_mask"].index_fill(1, torch.tensor([S - 1]), 0)},
        {k: v.reshape(B * 2, S // 2) for k, v in batch.items()},  # the same values, another shape
        {k: v for k, v in batch.items() if k != "labels"},  # a key less
    ]
    fps = [int(batch_fingerprint(b)) for b in changed]
    assert int(fp) not in fps and len(set(fps)) == len(fps), (int(fp), fps)
