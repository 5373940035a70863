"""Process groups on 4 real gloo ranks (one spawn): ring and data-parallel groups hold the right ranks and reduce
over them, ranks that disagree on the arguments all get the same error (no hang), the DeepSpeed mpu adapter answers
for the same groups, and teardown frees every group (so their threads are joined) or says which one is still held."""

from __future__ import annotations

import warnings
import weakref

import pytest
import torch
import torch.distributed as dist

from dist_utils import run_distributed

WORLD, SP = 4, 2


def _worker(rank: int, world: int) -> dict:
    out, refs = _check_groups(rank)  # its SequenceParallel is gone once it returns
    out["teardown"] = _teardown(refs)
    return out


def _check_groups(rank: int) -> tuple[dict, list[weakref.ref]]:
    import ds_ring
    from ds_ring.integrations.deepspeed import DeepSpeedMPU

    out = {"errors": []}
    for sp_size, layout in (({0: 2, 1: 2, 2: 4, 3: 4}[rank], "contiguous"), (SP, "zigzag" if rank else "contiguous")):
        try:
            ds_ring.init_sequence_parallel(sp_size, layout=layout)
        except ValueError as e:
            out["errors"].append(str(e))
    sp = ds_ring.init_sequence_parallel(SP, layout="zigzag")
    out["sp"] = (sp.sp_size, sp.sp_rank, sp.dp_size, sp.dp_rank, sp.layout, sp.world_size)
    out["ranks"] = (dist.get_process_group_ranks(sp.group), dist.get_process_group_ranks(sp.dp_group))
    x = torch.tensor([float(2**rank)])
    ring_sum, dp_sum = x.clone(), x.clone()
    dist.all_reduce(ring_sum, group=sp.group)
    dist.all_reduce(dp_sum, group=sp.dp_group)
    out["sums"] = (ring_sum.item(), dp_sum.item())
    mpu = DeepSpeedMPU(sp)
    out["mpu"] = {
        "sp_group_is_ring": mpu.get_sequence_parallel_group() is sp.group,
        "sp": (mpu.get_sequence_parallel_world_size(), mpu.get_sequence_parallel_rank()),
        "sdp": (mpu.get_sequence_data_parallel_world_size(), mpu.get_sequence_data_parallel_rank(),
                mpu.get_sequence_data_parallel_group() is dist.group.WORLD),
        "mp": (dist.get_process_group_ranks(mpu.get_model_parallel_group()), mpu.get_model_parallel_world_size(),
               mpu.get_model_parallel_rank()),
        "has_dp_group": hasattr(mpu, "get_data_parallel_group"),
    }
    _ring_op_on(sp)
    out["every_rank_creates"] = _every_rank_creates_every_group()
    return out, [weakref.ref(g) for g in (dist.group.WORLD, sp.group, sp.dp_group)]


def _every_rank_creates_every_group() -> tuple:
    """The path taken when a device is bound to the default group (NCCL splits, where every rank must take part in
    every creation): forced here, since gloo cannot bind a device; the groups must come out the same."""
    import ds_ring
    from ds_ring.parallel import groups
    from ds_ring.integrations.deepspeed import DeepSpeedMPU

    members_only, groups._members_only_creation = groups._members_only_creation, lambda: False
    try:
        sp = ds_ring.init_sequence_parallel(SP)
        mp_group = DeepSpeedMPU(sp).get_model_parallel_group()
    finally:
        groups._members_only_creation = members_only
    x = torch.tensor([float(2**dist.get_rank())])
    dist.all_reduce(x, group=sp.group)
    return ([dist.get_process_group_ranks(g) for g in (sp.group, sp.dp_group, mp_group)], x.item())


def _ring_op_on(sp) -> None:
    import ds_ring

    q, k, v = (ds_ring.shard_sequence(torch.randn(1, 2, 16, 4), 2, sp.group, sp.layout) for _ in range(3))
    out = ds_ring.ring_dilated_attention(q, k, v, causal=True, group=sp.group, layout=sp.layout)
    ds_ring.gather_sequence(out, 2, sp.group, sp.layout)


def _teardown(refs: list[weakref.ref]) -> dict:
    import ds_ring

    held = ds_ring.init_sequence_parallel(SP)  # still referenced at teardown: rank 0 must say so
    with warnings.catch_warnings(record=True) as kept:
        warnings.simplefilter("always")
        ds_ring.teardown()  # spawn_local made the default group, not ds_ring: nothing is destroyed
    t = torch.ones(1)
    dist.all_reduce(t, group=held.group)  # still usable
    with warnings.catch_warnings(record=True) as destroyed:
        warnings.simplefilter("always")
        ds_ring.teardown(destroy_default=True)
    out = {"kept": ([str(w.message) for w in kept if "ds_ring" in str(w.message)], t.item()),
           "warned": [str(w.message) for w in destroyed if "ds_ring" in str(w.message)],
           "initialized": dist.is_initialized()}
    held_ref = weakref.ref(held.group)
    del held
    out["alive"] = [r() is not None for r in refs + [held_ref]]
    return out


@pytest.fixture(scope="module")
def results():
    return run_distributed(_worker, WORLD)


def test_mismatched_arguments_raise_the_same_error_on_every_rank(results):
    for r in results:
        assert len(r["errors"]) == 2, r["errors"]
        assert "ranks disagree on sp_size: 2 to 4" in r["errors"][0]
        assert "ranks disagree on layout: 'contiguous' to 'zigzag'" in r["errors"][1]
    assert len({tuple(r["errors"]) for r in results}) == 1


def test_rings_are_consecutive_ranks_and_dp_groups_cross_them(results):
    for rank, r in enumerate(results):
        ring, pos = divmod(rank, SP)
        assert r["sp"] == (SP, pos, WORLD // SP, ring, "zigzag", WORLD)
        members = ([ring * SP + i for i in range(SP)], list(range(pos, WORLD, SP)))
        assert r["ranks"] == members
        assert r["sums"] == tuple(float(sum(2**m for m in g)) for g in members)
        assert r["every_rank_creates"] == ([*members, [rank]], float(sum(2**m for m in members[0])))


def test_teardown_frees_every_group_and_names_the_ones_still_held(results):
    for rank, r in enumerate(results):
        t = r["teardown"]
        assert t["kept"] == ([], 2.0)  # teardown() left spawn_local's default group and the ring usable
        assert not t["initialized"]
        assert t["alive"] == [False] * 4  # freed (their gloo threads joined), the held ring once dropped
        if rank == 0:
            assert len(t["warned"]) == 1, t["warned"]
            assert ("the process group of ranks [0, 1], the process group of ranks [0, 2] are destroyed but still "
                    "referenced" in t["warned"][0])  # the held ring and data-parallel groups, nothing else
        else:
            assert t["warned"] == []  # rank 0 only


def test_deepspeed_mpu_answers_for_ds_ring_groups(results):
    for rank, r in enumerate(results):
        assert r["mpu"] == {"sp_group_is_ring": True, "sp": (SP, rank % SP), "sdp": (WORLD, rank, True),
                            "mp": ([rank], 1, 0), "has_dp_group": False}
