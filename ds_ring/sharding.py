"""Sequence layouts: which global positions each rank of a ring holds, and moving tensors between full and local.

"contiguous": rank p holds positions [p*L, (p+1)*L).
"zigzag":     the sequence is cut into 2P equal chunks; rank p holds chunks p and 2P-1-p, in that order. Under a
              causal mask every rank then does the same amount of work.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

LAYOUTS = ("contiguous", "zigzag")


def check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r} is not supported: use one of {LAYOUTS}")


def group_size_rank(group: dist.ProcessGroup | None) -> tuple[int, int]:
    """(world size, rank) of ``group``; ``None`` means WORLD when initialised, else a single process."""
    if group is None and not (dist.is_available() and dist.is_initialized()):
        return 1, 0
    return dist.get_world_size(group), dist.get_rank(group)


def shard_ranges(local_len: int, world_size: int, rank: int, layout: str) -> list[tuple[int, int]]:
    """Global ``[start, end)`` ranges held by ``rank``, in local order."""
    check_layout(layout)
    if layout == "contiguous":
        return [(rank * local_len, (rank + 1) * local_len)]
    if local_len % 2:
        raise ValueError(
            f"layout='zigzag' needs an even shard length, got {local_len}: pad the sequence to a multiple of "
            f"2*world_size={2 * world_size}"
        )
    c = local_len // 2
    return [(rank * c, (rank + 1) * c), ((2 * world_size - 1 - rank) * c, (2 * world_size - rank) * c)]


def shard_positions(local_len: int, world_size: int, rank: int, layout: str, device=None) -> torch.Tensor:
    """Global positions (int64, shape (L,)) of the local shard of ``rank``."""
    return torch.cat(
        [torch.arange(s, e, device=device) for s, e in shard_ranges(local_len, world_size, rank, layout)]
    )


def _check_divisible(seq_len: int, world_size: int, layout: str, dim: int) -> int:
    parts = world_size * (2 if layout == "zigzag" else 1)
    if seq_len % parts:
        raise ValueError(
            f"dimension {dim} has length {seq_len}, not a multiple of {parts} "
            f"(world_size={world_size}, layout={layout!r}): pad the sequence first (ds_ring.shard_batch pads)"
        )
    return seq_len // world_size


def shard_sequence(
    full: torch.Tensor, dim: int, group: dist.ProcessGroup | None = None, layout: str = "contiguous"
) -> torch.Tensor:
    """This rank's shard of ``full`` along ``dim`` (length S -> S/P), as a contiguous copy."""
    check_layout(layout)
    world, rank = group_size_rank(group)
    local_len = _check_divisible(full.shape[dim], world, layout, dim)
    parts = [full.narrow(dim, s, e - s) for s, e in shard_ranges(local_len, world, rank, layout)]
    return torch.cat(parts, dim=dim).contiguous() if len(parts) > 1 else parts[0].contiguous()


def _unshard_order(local_len: int, world: int, layout: str) -> torch.Tensor:
    """Index into the rank-major concatenation of all shards that yields global order."""
    return torch.argsort(torch.cat([shard_positions(local_len, world, r, layout) for r in range(world)]))


class _GatherSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, local, dim, group, layout):
        world, rank = group_size_rank(group)
        ctx.dim, ctx.group, ctx.layout, ctx.world, ctx.rank = dim, group, layout, world, rank
        if world == 1:
            return local.clone()
        pieces = [torch.empty_like(local) for _ in range(world)]
        dist.all_gather(pieces, local.contiguous(), group=group)
        cat = torch.cat(pieces, dim=dim)
        if layout == "contiguous":
            return cat
        return cat.index_select(dim, _unshard_order(local.shape[dim], world, layout).to(local.device))

    @staticmethod
    def backward(ctx, grad_full):
        if ctx.world == 1:
            return grad_full, None, None, None
        # Adjoint of all-gather: every rank's gradient for our positions is summed (reduce-scatter).
        grad_full = grad_full.contiguous()
        dist.all_reduce(grad_full, group=ctx.group)
        local_len = grad_full.shape[ctx.dim] // ctx.world
        idx = shard_positions(local_len, ctx.world, ctx.rank, ctx.layout, grad_full.device)
        return grad_full.index_select(ctx.dim, idx), None, None, None


def gather_sequence(
    local: torch.Tensor, dim: int, group: dist.ProcessGroup | None = None, layout: str = "contiguous"
) -> torch.Tensor:
    """All-gather the shards along ``dim`` back into global order (S/P -> S). Differentiable.

    The backward is the adjoint of all-gather: the gradients that every rank computes for the full tensor are summed
    and each rank keeps its shard. If every rank computes the same loss from the gathered tensor, that loss is counted
    once per rank.
    """
    check_layout(layout)
    world, _ = group_size_rank(group)
    if layout == "zigzag" and local.shape[dim] % 2:
        raise ValueError(f"layout='zigzag' needs an even shard length along dim {dim}, got {local.shape[dim]}")
    return _GatherSequence.apply(local, dim, group, layout)
