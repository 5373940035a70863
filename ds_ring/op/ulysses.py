"""Ulysses inside the ring: all-to-all between (sequence shard, all heads) and (u-times longer block, Hq/u heads).

A Ulysses group is u consecutive global ranks (one node under the launchers' usual rank order). Ulysses rank j
holds L tokens of its ring position's block of u*L tokens, with all heads. One all-to-all gives every rank the
whole block for 1/u of the heads, in the block's token order (source j's tokens at j*L..(j+1)*L), so the ring then
runs over ring positions on those heads, and the inverse all-to-all brings the output back::

    rank (r, j), before:  tokens j*L..(j+1)*L of block r,   heads 0..Hq-1       (B, Hq, L, D)
    rank (r, j), during:  tokens 0..u*L of block r,         heads j*Hq/u..      (B, Hq/u, u*L, D)

K/V heads split the same way when u divides Hkv; when u > Hkv (a multiple of it) each rank receives the one K/V
head its query heads read, so K/V stay at their Hkv-per-rank size on the ring (each head on u/Hkv ranks).

Each layout change copies once: the send buffer is packed sequence-major (u, L, B, h, D) in one copy, and the
received buffer of the same shape is used in place as (B, h, u*L, D). Coming back, the output is unpacked once
into (B, L, Hq, D), the memory layout transformers' attention functions return.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .comm import note_collective


def heads_error(num_q: int, num_kv: int, u: int) -> str | None:
    """Why (Hq, Hkv) heads cannot be split over u Ulysses ranks (None if they can)."""
    if num_q % u:
        return f"{num_q} query heads do not split over ulysses_size={u}: use a ulysses_size that divides them"
    if num_kv % u and u % num_kv:
        return (f"{num_kv} kv heads and ulysses_size={u}: one must divide the other (u <= Hkv splits the kv heads, "
                f"u a multiple of Hkv gives each rank the one kv head its query heads read)")
    return None


def _pack(x: torch.Tensor, u: int) -> torch.Tensor:
    """(B, H, L, D) -> send buffer (u, L, B, H'/..., D): destination j gets its heads, sequence-major. One copy.

    H % u == 0: destination j gets heads j*H/u..; u % H == 0: destination j gets head j // (u/H) (replicated)."""
    B, H, L, D = x.shape
    if H % u == 0:
        h = H // u
        return x.unflatten(1, (u, h)).permute(1, 3, 0, 2, 4).contiguous()  # (u, L, B, h, D)
    rep = u // H
    src = x.permute(1, 2, 0, 3)[:, None, :, :, None, :].expand(H, rep, L, B, 1, D)
    return torch.empty(H, rep, L, B, 1, D, dtype=x.dtype, device=x.device).copy_(src).view(u, L, B, 1, D)


def _all_to_all(send: torch.Tensor, group) -> torch.Tensor:
    away = send.numel() * send.element_size() * (send.shape[0] - 1) // send.shape[0]  # all chunks but our own
    note_collective("ulysses all-to-all", away, away)
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    return recv


def _seq_to_heads(x: torch.Tensor, group, u: int) -> torch.Tensor:
    """(B, H, L, D) sequence shard -> (B, H', u*L, D) block for this rank's heads (a view of the received buffer)."""
    recv = _all_to_all(_pack(x, u), group)  # (u_src, L, B, h, D): source i's tokens of my heads
    n, L, B, h, D = recv.shape
    return recv.view(n * L, B, h, D).permute(1, 2, 0, 3)


def _heads_to_seq(y: torch.Tensor, group, u: int, num_heads: int) -> torch.Tensor:
    """Inverse of ``_seq_to_heads``: (B, h, u*L, D) -> (B, num_heads, L, D), laid out (B, L, H, D) in memory.

    ``num_heads`` < u (replicated kv heads): the u/H copies of each head's gradient are summed."""
    B, h, S, D = y.shape
    L = S // u
    send = y.permute(2, 0, 1, 3).reshape(u, L, B, h, D)  # one copy unless y is already sequence-major
    recv = _all_to_all(send.contiguous(), group)  # (u_src heads, L, B, h, D): my L tokens of source i's heads
    if num_heads % u == 0:  # (B, L, H, D) memory, what transformers' attention functions return: their copy is free
        return recv.permute(2, 1, 0, 3, 4).reshape(B, L, num_heads, D).contiguous().transpose(1, 2)
    return recv.view(num_heads, u // num_heads, L, B, D).sum(1).permute(2, 0, 1, 3)


class _SeqToHeads(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, u):
        ctx.group, ctx.u, ctx.heads = group, u, x.shape[1]
        return _seq_to_heads(x, group, u)

    @staticmethod
    def backward(ctx, g):
        return _heads_to_seq(g, ctx.group, ctx.u, ctx.heads), None, None


class _HeadsToSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, group, u, num_heads):
        ctx.group, ctx.u = group, u
        return _heads_to_seq(y, group, u, num_heads)

    @staticmethod
    def backward(ctx, g):
        return _seq_to_heads(g, ctx.group, ctx.u), None, None, None


def seq_to_heads(x: torch.Tensor, group: dist.ProcessGroup, u: int) -> torch.Tensor:
    """Differentiable: (B, H, L, D) -> (B, H', u*L, D), H' = H/u (or 1 when u is a multiple of H)."""
    return _SeqToHeads.apply(x, group, u)


def heads_to_seq(y: torch.Tensor, group: dist.ProcessGroup, u: int) -> torch.Tensor:
    """Differentiable inverse of ``seq_to_heads`` for query-shaped tensors: (B, H/u, u*L, D) -> (B, H, L, D)."""
    return _HeadsToSeq.apply(y, group, u, y.shape[1] * u)


def gather_block(t: torch.Tensor, group: dist.ProcessGroup, u: int) -> torch.Tensor:
    """(B, L) per-token values (key-padding mask, document ids) -> (B, u*L) of the whole block, in block order."""
    note_collective("ulysses all-gather")
    parts = [torch.empty_like(t) for _ in range(u)]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts, dim=1)


def head_base(num_q: int, u: int, rank: int) -> int:
    """Global index of Ulysses rank ``rank``'s first query head (dilated head offsets count global heads)."""
    return rank * (num_q // u)
