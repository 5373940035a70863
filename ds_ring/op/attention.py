"""The front door of the ring op: arguments, validation, the agreement across the ring, the schedule.

Layout of one call over a ring of P = 4 ranks, zigzag, causal (each rank holds two chunks; see layouts.py)::

    rank:        0        1        2        3
    q/k/v:    [c0|c7]  [c1|c6]  [c2|c5]  [c3|c4]     local shards, L = S / P tokens each
    step s:   rank p computes against the K/V of rank p - s, received while step s - 1 computes

Only K/V (with Hkv heads) and their key-padding mask travel; the engine (engine.py) runs the schedule (schedule.py)
that every rank derives from shapes and the pattern (or the agreed documents) alone, so all ranks post the same
exchanges in the same order.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from .agreement import RingFacts, agree_ring, code
from .comm import group_size_rank
from .engine import run
from .layouts import Layout, get_layout
from .pattern import Pattern
from .schedule import make_schedule
from .ulysses import head_base, heads_error, heads_to_seq, seq_to_heads

_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_WHO = "ring_dilated_attention"


def _local_errors(q, k, v, kpm, lay: Layout, world: int, u: int, document_ids, pattern: Pattern) -> list[str]:
    """What is wrong with this rank's own arguments (no communication). ``world`` ring positions of ``u`` Ulysses
    ranks each (u = 1: a plain ring)."""
    errs = []
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            return [f"{name} must be a 4-D tensor (batch, heads, local_len, head_dim), got "
                    f"{getattr(t, 'shape', type(t))}"]
    if not (q.dtype == k.dtype == v.dtype):
        errs.append(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}: cast them to one")
    elif q.dtype not in _DTYPES:
        errs.append(f"q dtype {q.dtype} is not supported: use one of {_DTYPES}")
    if not (q.device == k.device == v.device):
        errs.append(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if k.shape != v.shape:
        errs.append(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    B, Hq, M, D = q.shape
    L = k.shape[2]
    # Fewer queries than keys only on one rank (decoding with a cache: the queries are the last keys).
    if k.shape[0] != B or k.shape[3] != D or (L != M if world * u > 1 else not 0 < M <= L):
        errs.append(f"k/v shape {tuple(k.shape)} does not match q {tuple(q.shape)} in batch, length or head_dim")
    if k.shape[1] == 0 or Hq % k.shape[1]:
        errs.append(f"q has {Hq} heads, k/v have {k.shape[1]}: the query heads must be a multiple of the kv heads")
    if M == 0:
        errs.append("the local shard is empty (q.shape[2] == 0)")
    errs += [e for e in (heads_error(Hq, k.shape[1], u) if u > 1 else None, lay.local_len_error(u * L, world)) if e]
    for name, t, kind, is_kind in (
        ("key_padding_mask", kpm, "a bool tensor (True = real token): pass mask.bool()",
         lambda t: t.dtype == torch.bool),
        ("document_ids", document_ids, "an integer tensor",
         lambda t: not t.is_floating_point() and t.dtype != torch.bool),
    ):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor) or not is_kind(t):
            errs.append(f"{name} must be {kind}, got {getattr(t, 'dtype', type(t))}")
        elif tuple(t.shape) != (B, L):
            errs.append(f"{name} must have shape (batch, local_len) = {(B, L)}, got {tuple(t.shape)}")
        elif t.device != q.device:
            errs.append(f"{name} is on {t.device}, q on {q.device}: move it to q's device")
    if document_ids is not None:
        if M != L:
            errs.append(f"document_ids with {M} queries for {L} keys (decoding with a cache) is not supported: run "
                        "the packed rows without a cache")
    return errs


def follow_autocast(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """q, k, v cast to the autocast dtype when autocast is on for their device, as SDPA (on autocast's lower-precision
    list) does; else unchanged.

    Why here: under autocast the three arrive in different dtypes (Llama's RoPE multiplies bf16 q/k by fp32 cos/sin,
    so q and k come fp32 and v bf16), and SDPA casts them itself. Like autocast, only floating tensors other than
    fp64 are cast. The engine then computes each block in that dtype with fp32 accumulators and log-sum-exp (it
    merges in fp32 whatever the input dtype) and returns the output in it; the casts are differentiable, so the
    gradients reach q, k, v in their own dtypes.
    """
    device = q.device.type if isinstance(q, torch.Tensor) else None
    if device is None or not torch.is_autocast_enabled(device):
        return q, k, v
    dtype = torch.get_autocast_dtype(device)
    return tuple(t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float64
                 else t for t in (q, k, v))


def _must_match(q, k, kpm, document_ids, lay: Layout | None, pattern: Pattern, scale: float) -> dict[str, object]:
    """The op's entries of the agreement that every rank must pass equal: shapes and options."""
    shape = list(q.shape) + [k.shape[1]] if q.dim() == 4 and k.dim() == 4 else [-1] * 5
    return {
        **dict(zip(["batch", "q heads", "local_len", "head_dim", "kv heads"], shape)),
        "dtype": _DTYPES.index(q.dtype) if q.dtype in _DTYPES else -1,
        "has key_padding_mask": int(kpm is not None),
        "has document_ids": int(document_ids is not None),
        "layout": code(lay.name) if lay is not None else -1,
        "pattern (segment_lengths, dilation_rates, causal, window)": pattern.key(),
        "scale": round(scale * 1e6),
    }


def ring_dilated_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    segment_lengths=None,
    dilation_rates=None,
    causal: bool = False,
    key_padding_mask: torch.Tensor | None = None,
    window: int | None = None,
    scale: float | None = None,
    group: dist.ProcessGroup | None = None,
    layout: str | Layout = "contiguous",
    *,
    local: bool = False,
    document_ids: torch.Tensor | None = None,
    ulysses_group: dist.ProcessGroup | None = None,
) -> torch.Tensor:
    """Exact (dilated) attention over a sequence sharded across the ranks of ``group``.

    q: (B, Hq, L, D), k/v: (B, Hkv, L, D) local shards (Hq % Hkv == 0; K/V travel with Hkv heads).
    key_padding_mask: (B, L) bool, True = real token. Returns (B, Hq, L, D) in q's dtype.

    segment_lengths / dilation_rates: LongNet pairs on GLOBAL positions (None = the whole sequence, the default is
    exact full attention). causal: keys t <= i only. window: keys with i - t < window only. scale: default
    1/sqrt(D). layout: how the sequence is cut over the ring ("contiguous" or "zigzag", or a ``ds_ring.Layout``; see
    ds_ring.op.layouts). local: treat the tensors as the whole sequence (no communication), e.g. for generation;
    there q may hold fewer rows than k/v, the last positions of the keys (decoding with a KV cache costs O(L_k) per
    query).
    document_ids: (B, L) integers, this rank's shard of GLOBAL document ids, non-decreasing along the row (one run
    per document; ``ds_ring.shard_batch`` numbers them): a query and a key interact only inside one document, so a
    packed row gives every document the result it would get alone. Chunk pairs that share no document cost neither
    compute nor traffic. Any pattern, causal, window and padding: segments and dilation classes count from each
    document's own start.
    ulysses_group: two-dimensional sequence parallelism (see ds_ring.op.ulysses): the u ranks of this rank's ring
    position; ``group`` is then the ring across positions and ``layout`` cuts the sequence over ring positions (the
    grid layout: ``ds_ring.get_layout(layout, ulysses_size=u)``). An all-to-all gives each rank its ring position's
    whole block for Hq/u heads, the ring runs on those heads, and an all-to-all brings the output back.
    A query with no key to attend to gets 0. Bad input raises ValueError on every rank before any K/V is sent (the
    ring's agreement: one small all_gather per call). Under ``torch.autocast`` the op follows autocast as SDPA does
    (see ``follow_autocast``).
    """
    return attend(q, k, v, segment_lengths, dilation_rates, causal, key_padding_mask, window, scale, group, layout,
                  local=local, document_ids=document_ids, ulysses_group=ulysses_group)


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    segment_lengths=None,
    dilation_rates=None,
    causal: bool = False,
    key_padding_mask: torch.Tensor | None = None,
    window: int | None = None,
    scale: float | None = None,
    group: dist.ProcessGroup | None = None,
    layout: str | Layout = "contiguous",
    *,
    local: bool = False,
    document_ids: torch.Tensor | None = None,
    ulysses_group: dist.ProcessGroup | None = None,
    facts: RingFacts | None = None,
    overlap: bool = True,
) -> torch.Tensor:
    """The op's internal entry: ``ring_dilated_attention``'s arguments, plus what only ds_ring's own callers pass.

    facts: the ring's agreement for this call, when the caller already ran it (the Hugging Face integration does,
    once per model forward, and gathers the Ulysses block's mask there); None runs it here.
    overlap: post each transfer before the compute it hides behind (False serialises them, for benchmarks).
    """
    q, k, v = follow_autocast(q, k, v)
    errs = []
    try:
        pattern = Pattern.make(segment_lengths, dilation_rates, causal, window)
    except ValueError as e:
        errs.append(str(e))
        pattern = Pattern()
    try:  # local: the whole sequence is here, in order: no layout applies (nor its length rule)
        lay = get_layout("contiguous" if local else layout)
    except ValueError as e:
        errs.append(str(e))
        lay = None
    u = 1 if local or ulysses_group is None else dist.get_world_size(ulysses_group)
    world, rank = (1, 0) if local else group_size_rank(group)
    errs += _local_errors(q, k, v, key_padding_mask, lay or get_layout("contiguous"), world, u, document_ids,
                          pattern)
    if scale is None and not errs:
        scale = 1.0 / math.sqrt(q.shape[-1])
    if facts is not None and not errs and not facts.matches(q.shape[0], u * k.shape[2], world):
        facts = None  # agreed for other shapes (all ranks see the same mismatch): agree on these instead
    if facts is None:
        facts, _ = agree_ring(
            group, who=_WHO, errors=errs, layout=lay, batch=q.shape[0], local_len=k.shape[2], device=q.device,
            must_match=_must_match(q, k, key_padding_mask, document_ids, lay, pattern, scale or 0.0),
            key_padding_mask=key_padding_mask, document_ids=document_ids,
            ulysses_group=ulysses_group if u > 1 else None, local=local,
        )  # fmt: skip
    elif errs:  # the agreement established equal shapes and options, so every rank finds the same errors
        raise ValueError(f"{_WHO}: " + "; ".join(errs))
    if u == 1:
        return _ring(q, k, v, key_padding_mask, pattern, lay, facts, rank, scale, group, overlap)
    # two-dimensional: the ring runs on this rank's Hq/u heads of its ring position's whole block
    qb, kb, vb = (seq_to_heads(t, ulysses_group, u) for t in (q, k, v))
    base = head_base(q.shape[1], u, dist.get_rank(ulysses_group))
    out = _ring(qb, kb, vb, facts.block_key_padding_mask, pattern, lay, facts, rank, scale, group, overlap, base)
    return heads_to_seq(out, ulysses_group, u)


def _ring(q, k, v, kpm, pattern: Pattern, lay: Layout, facts: RingFacts, rank: int, scale: float, group, overlap,
          head_base: int = 0) -> torch.Tensor:
    """The ring over ``group`` on agreed, validated shards: the schedule, then the engine."""
    if facts.documents is not None:
        # segments and dilation classes count from each document's start (documents.DocumentPieces)
        schedule = facts.documents.schedule(pattern, lay, k.shape[2], rank, q.shape[0], q.device, q.shape[1],
                                            head_base, dtype=q.dtype, head_dim=q.shape[-1])
    else:
        source = pattern.pieces(lay, k.shape[2], facts.world_size, q.shape[1], q_len=q.shape[2],
                                head_base=head_base)
        schedule = make_schedule(source, rank, q.device)
    return run(q, k, v, kpm, schedule, group, float(scale), overlap, facts)
