"""Moving tensors between the full sequence and a rank's shard, in a layout (ds_ring/op/layouts.py)."""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..op.comm import group_size_rank
from ..op.layouts import Layout, get_layout


def _take(full: torch.Tensor, dim: int, ranges: list[tuple[int, int]]) -> torch.Tensor:
    parts = [full.narrow(dim, a, b - a) for a, b in ranges]
    return torch.cat(parts, dim=dim) if len(parts) > 1 else parts[0].contiguous()


def shard_sequence(
    full: torch.Tensor, dim: int, group: dist.ProcessGroup | None = None, layout: str | Layout = "contiguous"
) -> torch.Tensor:
    """This rank's shard of ``full`` along ``dim`` (length S -> S/P), as a contiguous copy."""
    lay = get_layout(layout)
    world, rank = group_size_rank(group)
    err = lay.seq_len_error(full.shape[dim], world)
    if err:
        raise ValueError(f"shard_sequence: dimension {dim}: {err}")
    return _take(full, dim, lay.ranges(full.shape[dim] // world, world, rank))


class _GatherSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, local, dim, group, lay: Layout, replicated: bool):
        world, rank = group_size_rank(group)
        ctx.dim, ctx.group, ctx.lay, ctx.world, ctx.rank, ctx.replicated = dim, group, lay, world, rank, replicated
        if world == 1:
            return local.clone()
        pieces = [torch.empty_like(local) for _ in range(world)]
        dist.all_gather(pieces, local.contiguous(), group=group)
        cat = torch.cat(pieces, dim=dim)
        order = lay.unshard_index(local.shape[dim], world, local.device)
        return cat if order is None else cat.index_select(dim, order)

    @staticmethod
    def backward(ctx, grad_full):
        if ctx.world == 1:
            return grad_full, None, None, None, None
        local_len = grad_full.shape[ctx.dim] // ctx.world
        if ctx.replicated:  # every rank holds the same gradient of the same loss: keep our shard, no communication
            return _take(grad_full, ctx.dim, ctx.lay.ranges(local_len, ctx.world, ctx.rank)), None, None, None, None
        # Adjoint of all-gather: every rank's gradient for our positions is summed, and only our shard comes to us
        # (a reduce-scatter: each rank receives 1/P of the gradient, not all of it).
        parts = [_take(grad_full, ctx.dim, ctx.lay.ranges(local_len, ctx.world, r)) for r in range(ctx.world)]
        mine = torch.empty_like(parts[ctx.rank])
        dist.reduce_scatter(mine, parts, group=ctx.group)
        return mine, None, None, None, None


def gather_sequence(
    local: torch.Tensor,
    dim: int,
    group: dist.ProcessGroup | None = None,
    layout: str | Layout = "contiguous",
    *,
    replicated_loss: bool = False,
) -> torch.Tensor:
    """All-gather the shards along ``dim`` back into global order (S/P -> S). Differentiable.

    The backward is the adjoint of all-gather: the gradients that every rank computes for the full tensor are summed
    and each rank receives its shard's sum (a reduce-scatter). If every rank computes the same loss from the gathered
    tensor, that loss is counted once per rank.

    ``replicated_loss=True``: every rank of ``group`` computes the SAME loss from the gathered tensor, and it counts
    once. Each rank then holds the same gradient for the full tensor and keeps its shard of it (no communication):
    the ranks' parameter gradients are shares that sum to the one-process gradient (``causal_lm_loss``'s contract).
    """
    lay = get_layout(layout)
    world, _ = group_size_rank(group)
    err = lay.local_len_error(local.shape[dim], world)
    if err:
        raise ValueError(f"gather_sequence: dimension {dim}: {err}")
    return _GatherSequence.apply(local, dim, group, lay, replicated_loss)
