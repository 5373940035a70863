"""Process groups for sequence parallelism: rings of ``sp_size`` consecutive ranks, data parallelism across them
(the end of a run, ``teardown``, is in lifecycle.py)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from ..op.layouts import LAYOUTS, Layout, get_layout
from .lifecycle import init_distributed


@dataclass(frozen=True)
class SequenceParallel:
    """The sequence-parallel axes of one rank and its groups. The model code never sees it; functions take it as an
    argument.

    ``group`` is this rank's sequence-parallel group (``sp_size`` consecutive global ranks: one sequence is cut over
    them), ``dp_group`` the ranks that hold the same shard index in the other groups (they see different samples).
    ``layout`` is how sequences are cut over the ring. Two-dimensional (``ulysses_size`` u > 1): the group is a grid
    of ``ring_size`` ring positions x u Ulysses ranks; ``ulysses_group`` holds the u consecutive ranks of this rank's
    position (one node under the launchers' usual rank order), ``ring_group`` the ranks at this Ulysses index across
    positions. With u = 1 the ring is the whole group.
    """

    group: dist.ProcessGroup | None
    dp_group: dist.ProcessGroup | None
    sp_size: int
    sp_rank: int
    dp_size: int
    dp_rank: int
    layout: str = "contiguous"
    ulysses_size: int = 1
    ulysses_group: dist.ProcessGroup | None = None
    ring_group: dist.ProcessGroup | None = None

    def __post_init__(self):
        if self.sp_size % self.ulysses_size:
            raise ValueError(f"ulysses_size={self.ulysses_size} must divide sp_size={self.sp_size}")
        if self.ulysses_size == 1 and self.ring_group is None:  # one axis: the ring is the whole group
            object.__setattr__(self, "ring_group", self.group)

    @property
    def world_size(self) -> int:
        return self.sp_size * self.dp_size

    @property
    def ring_size(self) -> int:
        return self.sp_size // self.ulysses_size

    @property
    def ring_rank(self) -> int:
        return self.sp_rank // self.ulysses_size

    @property
    def sequence_layout(self) -> Layout:
        """How a sequence is cut over the whole group (the grid layout when two-dimensional): what shards inputs,
        masks and labels, and gathers outputs back."""
        return get_layout(self.layout, self.ulysses_size)


def _world_device() -> torch.device:
    return torch.device("cuda" if "nccl" in str(dist.get_backend()) else "cpu")


def _world_timeout() -> timedelta | None:
    """The default group's timeout. ``new_group`` does not inherit it (it takes torch's 30-minute default), so a ring
    whose peer hangs would block that long however short the user's timeout. Read from a private attribute: None
    (torch's default) if this torch lacks it."""
    try:
        return dist.group.WORLD._get_backend(_world_device()).options._timeout
    except (AttributeError, RuntimeError):
        return None


def _members_only_creation() -> bool:
    """Whether a group can be created by its members alone. Not when a device is bound to the default group
    (``init_process_group(device_id=...)``; ``deepspeed.init_distributed`` binds one on CUDA): torch then builds every
    new group by splitting the default group's NCCL communicator (``ncclCommSplit``), a collective in which every
    rank must take part, so a members-only creation would hang."""
    return getattr(dist.group.WORLD, "bound_device_id", None) is None


def new_group(partition: list[list[int]], timeout: timedelta | None = None) -> dist.ProcessGroup:
    """This rank's group of ``partition`` (disjoint lists of global ranks, the same on every rank; every rank must
    call this in the same order). ``timeout`` defaults to the default group's.

    Where it can (:func:`_members_only_creation`), only this rank's group is created, by its members
    (``use_local_synchronization=True``): start-up work per rank then grows with the groups it belongs to, not with
    the world (by default every rank enters every ``new_group``). torch 2.13 names such a group (its rendezvous prefix
    in the store) by hashing its ranks with the number of groups this rank has registered, so (1) the members must
    have registered the same number of groups before (:func:`init_sequence_parallel` checks it on every rank) and
    (2) such a group is never destroyed on its own: the count would go down and the next group of the same ranks
    would reuse the old name and meet stale rendezvous keys (a hang, seen here). It lives until the default group is
    destroyed, which destroys every group. With a bound device every rank creates every group of ``partition``, in
    order (``torch.distributed.split_group`` would do it in one call, untested here without GPUs).
    """
    rank, timeout = dist.get_rank(), timeout or _world_timeout()
    mine = [ranks for ranks in partition if rank in ranks]
    if len(mine) != 1:
        raise ValueError(f"new_group: rank {rank} must be in exactly one group of the partition, got {partition}")
    if _members_only_creation():
        return dist.new_group(mine[0], timeout=timeout, use_local_synchronization=True)
    groups = [dist.new_group(ranks, timeout=timeout) for ranks in partition]
    return groups[partition.index(mine[0])]


def _groups_registered() -> int:
    """How many groups this rank has registered with torch (the count torch 2.13 hashes into local group names)."""
    try:
        return len(dist.distributed_c10d._world.pg_names)
    except AttributeError:
        return 0  # a torch without this registry: nothing to compare


def _check_same_on_every_rank(sp_size: int, layout: str, ulysses_size: int) -> None:
    """Raise the same error on every rank when ranks disagree on sp_size, ulysses_size or layout, or have made
    different numbers of groups (local group names would then differ and the ring members would wait on each other
    until timeout). One all-reduce (MAX of each value and of its negation) on the default group."""
    layouts = list(LAYOUTS)
    vals = [sp_size, layouts.index(layout), _groups_registered(), ulysses_size]
    n = len(vals)
    t = torch.tensor(vals + [-v for v in vals], dtype=torch.int64, device=_world_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    hi, lo = t[:n].tolist(), [-v for v in t[n:].tolist()]
    names = ["sp_size", "layout", "the number of process groups created before", "ulysses_size"]
    bad = [f"{n}: {lo[i] if i != 1 else layouts[lo[i]]!r} to {hi[i] if i != 1 else layouts[hi[i]]!r}"
           for i, n in enumerate(names) if hi[i] != lo[i]]
    if bad:
        raise ValueError(f"init_sequence_parallel: ranks disagree on {'; '.join(bad)}. Call it with the same "
                         "arguments on every rank, and create any other process groups in the same order on every "
                         "rank before it")


def _partitions(world: int, sp_size: int, ulysses_size: int = 1) -> dict[str, list[list[int]]]:
    """The groups of each axis: ``"sp"`` the sequence-parallel groups (``sp_size`` consecutive ranks), ``"dp"`` the
    ranks at the same index in every sp group; two-dimensional, inside each sp group, ``"ulysses"`` the u consecutive
    ranks of a ring position and ``"ring"`` the ranks at one Ulysses index across positions."""
    u = ulysses_size
    out = {"sp": [list(range(i, i + sp_size)) for i in range(0, world, sp_size)],
           "dp": [list(range(j, world, sp_size)) for j in range(sp_size)]}
    if u > 1:
        out["ulysses"] = [list(range(i, i + u)) for i in range(0, world, u)]
        out["ring"] = [list(range(g + j, g + sp_size, u)) for g in range(0, world, sp_size) for j in range(u)]
    return out


def init_sequence_parallel(
    sp_size: int | None = None,
    *,
    ulysses_size: int = 1,
    layout: str = "contiguous",
    backend: str | None = None,
    timeout: timedelta | float | None = None,
) -> SequenceParallel:
    """Split the world into rings of ``sp_size`` consecutive ranks and data-parallel groups across them.

    ``sp_size=None`` puts every rank in one ring. ``ulysses_size`` u > 1: two-dimensional sequence parallelism, each
    sp group a grid of sp_size / u ring positions x u Ulysses ranks on consecutive global ranks (one node under the
    launchers' usual rank order): the Ulysses all-to-all runs inside a node, the ring across positions. u = 1 is the
    plain ring, u = sp_size pure Ulysses. Initialises torch.distributed from the environment if needed.
    Every rank must call this with the same arguments (checked: a mismatch raises on every rank). Each rank creates
    only its own two groups (see :func:`new_group` for the exception). The groups get ``timeout``, by default the one
    the default group was initialised with.
    """
    layout = get_layout(layout).name
    if not dist.is_initialized():
        if "RANK" not in os.environ:
            if sp_size not in (None, 1) or ulysses_size != 1:
                what = f"sp_size={sp_size}" + (f", ulysses_size={ulysses_size}" if ulysses_size != 1 else "")
                raise ValueError(f"{what} needs a distributed launch (torchrun, deepspeed or accelerate launch); "
                                 "this is a single process")
            return SequenceParallel(None, None, 1, 0, 1, 0, layout)
        init_distributed(backend, timeout)
    world, rank = dist.get_world_size(), dist.get_rank()
    sp_size = world if sp_size is None else sp_size
    if not isinstance(sp_size, int) or sp_size < 1:
        raise ValueError(f"sp_size must be a positive int, got {sp_size!r}")
    if sp_size > world:
        raise ValueError(f"sp_size={sp_size} is larger than the world size {world}: launch at least {sp_size} "
                         f"processes (e.g. torchrun --nproc_per_node {sp_size}) or lower sp_size")
    if world % sp_size:
        raise ValueError(
            f"sp_size={sp_size} must divide the world size {world}: choose a divisor of {world} "
            f"or launch a multiple of {sp_size} processes"
        )
    if isinstance(ulysses_size, bool) or not isinstance(ulysses_size, int) or ulysses_size < 1 or \
            sp_size % ulysses_size:
        raise ValueError(f"ulysses_size={ulysses_size!r} must be a positive divisor of sp_size={sp_size}: the sp "
                         f"group is a grid of sp_size / ulysses_size ring positions x ulysses_size ranks")
    _check_same_on_every_rank(sp_size, layout, ulysses_size)
    if isinstance(timeout, (int, float)):
        timeout = timedelta(seconds=timeout)
    axes = _partitions(world, sp_size, ulysses_size)
    # Same order on every rank (sp, data-parallel, then Ulysses and ring): overlapping local groups must be made in
    # one global order.
    groups = {name: new_group(partition, timeout) for name, partition in axes.items()}
    return SequenceParallel(groups["sp"], groups["dp"], sp_size, rank % sp_size, world // sp_size, rank // sp_size,
                            layout, ulysses_size, groups.get("ulysses"), groups.get("ring"))


# ----- the end of a run --------------------------------------------------------------------------------------------
#
# A gloo group that is still alive when the interpreter finalizes can abort the process (SIGABRT, "terminate called
# without an active exception") after everything else succeeded: its worker thread, still releasing the tensors of
# the last collective, needs the GIL, and CPython ends it inside a noexcept C++ destructor. A group whose last
# Python reference goes away while Python runs is destroyed at once and its threads are joined, so the cure is to
# leave no reference behind. See docs/upstream_sigabrt.md.
