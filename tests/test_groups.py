"""Process groups on 4 real gloo ranks (one spawn): ring and data-parallel groups hold the right ranks and reduce
over them, ranks that disagree on the arguments all get the same error (no hang), and the DeepSpeed mpu adapter
answers for the same groups."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from dist_utils import run_distributed

WORLD, SP = 4, 2


def _worker(rank: int, world: int) -> dict:
    import ds_ring
    from ds_ring.deepspeed_integration import DeepSpeedMPU

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
    out["every_rank_creates"] = _every_rank_creates_every_group()
    return out


def _every_rank_creates_every_group() -> tuple:
    """The path taken when a device is bound to the default group (NCCL splits, where every rank must take part in
    every creation): forced here, since gloo cannot bind a device; the groups must come out the same."""
    import ds_ring
    from ds_ring import groups
    from ds_ring.deepspeed_integration import DeepSpeedMPU

    members_only, groups._members_only_creation = groups._members_only_creation, lambda: False
    try:
        sp = ds_ring.init_sequence_parallel(SP)
        mp_group = DeepSpeedMPU(sp).get_model_parallel_group()
    finally:
        groups._members_only_creation = members_only
    x = torch.tensor([float(2**dist.get_rank())])
    dist.all_reduce(x, group=sp.group)
    return ([dist.get_process_group_ranks(g) for g in (sp.group, sp.dp_group, mp_group)], x.item())


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


def test_deepspeed_mpu_answers_for_ds_ring_groups(results):
    for rank, r in enumerate(results):
        assert r["mpu"] == {"sp_group_is_ring": True, "sp": (SP, rank % SP), "sdp": (WORLD, rank, True),
                            "mp": ([rank], 1, 0), "has_dp_group": False}
