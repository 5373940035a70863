"""``nn.Module`` forms of the ring op: a core attention layer and a multi-head layer with projections."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist
from torch import nn

from .attention import ring_dilated_attention
from .pattern import Pattern


class RingDilatedAttention(nn.Module):
    """Attention core on local shards: forward(q (B, Hq, L, D), k/v (B, Hkv, L, D), key_padding_mask (B, L))."""

    def __init__(
        self,
        segment_lengths: Sequence[int | None] | None = None,
        dilation_rates: Sequence[int] | None = None,
        *,
        causal: bool = False,
        window: int | None = None,
        scale: float | None = None,
        group: dist.ProcessGroup | None = None,
        layout: str = "contiguous",
    ):
        super().__init__()
        Pattern.make(segment_lengths, dilation_rates, causal, window)  # fail at construction, not first call
        self.segment_lengths, self.dilation_rates = segment_lengths, dilation_rates
        self.causal, self.window, self.scale, self.group, self.layout = causal, window, scale, group, layout

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        return ring_dilated_attention(
            q, k, v, self.segment_lengths, self.dilation_rates, self.causal, key_padding_mask, self.window,
            self.scale, self.group, self.layout,
        )

    def extra_repr(self) -> str:
        return (f"segment_lengths={self.segment_lengths}, dilation_rates={self.dilation_rates}, causal={self.causal}, "
                f"window={self.window}, layout={self.layout!r}")


class RingDilatedMultiheadAttention(nn.Module):
    """Multi-head (GQA) attention with projections on a local shard: (B, L, E) -> (B, L, E)."""

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        segment_lengths: Sequence[int | None] | None = None,
        dilation_rates: Sequence[int] | None = None,
        *,
        num_kv_heads: int | None = None,
        causal: bool = False,
        window: int | None = None,
        bias: bool = True,
        group: dist.ProcessGroup | None = None,
        layout: str = "contiguous",
        device=None,
        dtype=None,
    ):
        super().__init__()
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim={embed_dim} must be divisible by num_heads={num_heads}")
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads={num_heads} must be a multiple of num_kv_heads={num_kv_heads}")
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, embed_dim // num_heads
        kw = dict(bias=bias, device=device, dtype=dtype)
        self.q_proj = nn.Linear(embed_dim, embed_dim, **kw)
        self.k_proj = nn.Linear(embed_dim, num_kv_heads * self.head_dim, **kw)
        self.v_proj = nn.Linear(embed_dim, num_kv_heads * self.head_dim, **kw)
        self.out_proj = nn.Linear(embed_dim, embed_dim, **kw)
        self.attn = RingDilatedAttention(segment_lengths, dilation_rates, causal=causal, window=window, group=group,
                                         layout=layout)

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        B, L, _ = x.shape
        q = self.q_proj(x).view(B, L, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, L, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, L, self.num_kv_heads, self.head_dim).transpose(1, 2)
        out = self.attn(q, k, v, key_padding_mask)
        return self.out_proj(out.transpose(1, 2).reshape(B, L, -1))
