"""The front door of the ring op: arguments, validation, the agreement across the ring, plan lookup.

Layout of one call over a ring of P = 4 ranks, zigzag, causal (each rank holds two chunks; see layouts.py)::

    rank:        0        1        2        3
    q/k/v:    [c0|c7]  [c1|c6]  [c2|c5]  [c3|c4]     local shards, L = S / P tokens each
    step s:   rank p computes against the K/V of rank p - s, received while step s - 1 computes

Only K/V (with Hkv heads) and their key-padding mask travel; the engine (ring.py) runs the plan (pattern.py) that
every rank derives from shapes and the pattern alone, so all ranks post the same exchanges in the same order.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from . import documents as docs_mod
from .agreement import RingFacts, agree, exchange
from .comm import group_size_rank
from .engine import run
from .layouts import LAYOUTS, get_layout
from .pattern import Pattern, make_plan
from .ulysses import gather_block, head_base, heads_error, heads_to_seq, seq_to_heads

_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_WHO = "ring_dilated_attention"


def _local_errors(q, k, v, kpm, layout, world: int, document_ids=None, pattern: Pattern | None = None) -> list[str]:
    """What is wrong with this rank's own arguments (no communication)."""
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
    if k.shape[0] != B or k.shape[3] != D or (L != M if world > 1 else not 0 < M <= L):
        errs.append(f"k/v shape {tuple(k.shape)} does not match q {tuple(q.shape)} in batch, length or head_dim")
    if k.shape[1] == 0 or Hq % k.shape[1]:
        errs.append(f"q has {Hq} heads, k/v have {k.shape[1]}: the query heads must be a multiple of the kv heads")
    if M == 0:
        errs.append("the local shard is empty (q.shape[2] == 0)")
    try:
        err = get_layout(layout).local_len_error(L, world)
        if err:
            errs.append(err)
    except ValueError as e:
        errs.append(str(e))
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
        if pattern is not None and pattern.has_segments:
            errs.append("document_ids with a dilated pattern (segment_lengths/dilation_rates) is not supported: "
                        "segments would have to count from each document's start; use the dense pattern (None, "
                        "None), with causal and window as needed")
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


def code_of_layout(layout) -> int:
    return list(LAYOUTS).index(layout) if layout in LAYOUTS else -1


def _agree_call(q, k, kpm, document_ids, pattern: Pattern, layout, scale: float, errs, group, world) -> RingFacts:
    """The per-call agreement: shapes and options must match on every rank; each rank says if it is padded and,
    for packed rows, where its documents begin and end."""
    shape = list(q.shape) + [k.shape[1]] if q.dim() == 4 and k.dim() == 4 else [-1] * 5
    same = dict(zip(["batch", "q heads", "local_len", "head_dim", "kv heads"], shape))
    same.update({
        "dtype": _DTYPES.index(q.dtype) if q.dtype in _DTYPES else -1,
        "has key_padding_mask": int(kpm is not None),
        "has document_ids": int(document_ids is not None),
        "layout": code_of_layout(layout),
        "pattern (segment_lengths, dilation_rates, causal, window)": pattern.key(),
        "scale": round(scale * 1e6),
    })
    # computed on the device, read with the agreement: no sync of its own
    # every rank sends the same keys (the row's size must not depend on the inputs); values default to 0
    mine, vectors = {"padded": (~kpm).any() if kpm is not None and not errs else 0, docs_mod.DECREASE: 0}, {}
    lay = get_layout(layout) if not errs else None
    if document_ids is not None and not errs:
        doc_mine, vectors = docs_mod.agreement_fields(document_ids, lay.chunks_per_rank)
        mine.update(doc_mine)
    rows = agree(group, who=_WHO, errors=errs, same=same, mine=mine, device=q.device, vectors=vectors)
    docs = None if document_ids is None else docs_mod.from_agreement(rows, document_ids, lay, q.shape[2], _WHO)
    return RingFacts(world, q.shape[0], q.shape[2], tuple(bool(r["padded"]) for r in rows), docs)


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
    layout: str = "contiguous",
    *,
    local: bool = False,
    overlap: bool = True,
    document_ids: torch.Tensor | None = None,
    facts: RingFacts | None = None,
    ulysses_group: dist.ProcessGroup | None = None,
) -> torch.Tensor:
    """Exact (dilated) attention over a sequence sharded across the ranks of ``group``.

    q: (B, Hq, L, D), k/v: (B, Hkv, L, D) local shards (Hq % Hkv == 0; K/V travel with Hkv heads).
    key_padding_mask: (B, L) bool, True = real token. Returns (B, Hq, L, D) in q's dtype.

    segment_lengths / dilation_rates: LongNet pairs on GLOBAL positions (None = the whole sequence, the default is
    exact full attention). causal: keys t <= i only. window: keys with i - t < window only. scale: default
    1/sqrt(D). layout: how the sequence is cut over the ring ("contiguous" or "zigzag", see ds_ring.op.layouts).
    local: treat the tensors as the whole sequence (no communication), e.g. for generation; there q may hold fewer
    rows than k/v, the last positions of the keys (decoding with a KV cache costs O(L_k) per query).
    overlap: post each transfer before the compute it hides behind (False serialises them, for benchmarks).
    document_ids: (B, L) integers, this rank's shard of GLOBAL document ids, non-decreasing along the row (one run
    per document; ``ds_ring.shard_batch`` numbers them): a query and a key interact only inside one document, so a
    packed row gives every document the result it would get alone. Chunk pairs that share no document cost neither
    compute nor traffic. Dense pattern only (with causal, window and padding).
    facts: the ring's agreement for this call, when the caller already ran it (the Hugging Face integration does,
    once per model forward); None runs it here (one small all_gather).
    ulysses_group: two-dimensional sequence parallelism (see ds_ring.op.ulysses): the u ranks of this rank's ring
    position; ``group`` is then the ring across positions and ``layout`` cuts the sequence over ring positions (the
    grid layout: ``ds_ring.get_layout(layout, ulysses_size=u)``). An all-to-all gives each rank its ring position's
    whole block for Hq/u heads, the ring runs on those heads, and an all-to-all brings the output back.
    A query with no key to attend to gets 0. Bad input raises ValueError on every rank before any K/V is sent.
    Under ``torch.autocast`` the op follows autocast as SDPA does (see ``follow_autocast``).
    """
    q, k, v = follow_autocast(q, k, v)
    errs = []
    try:
        pattern = Pattern.make(segment_lengths, dilation_rates, causal, window)
    except ValueError as e:
        errs.append(str(e))
        pattern = Pattern()
    u = 1 if local or ulysses_group is None else dist.get_world_size(ulysses_group)
    if u > 1:
        return _ulysses_ring(q, k, v, pattern, errs, key_padding_mask, scale, group, layout, overlap, document_ids,
                             facts, ulysses_group, u)
    return _ring(q, k, v, pattern, errs, key_padding_mask, scale, group, layout, local, overlap, document_ids, facts)


def _ring(q, k, v, pattern: Pattern, errs: list[str], key_padding_mask, scale, group, layout, local, overlap,
          document_ids, facts, head_base: int = 0) -> torch.Tensor:
    """The ring over ``group``: validate, agree (unless ``facts`` are given), plan, run."""
    world, rank = (1, 0) if local else group_size_rank(group)
    if local:  # the whole sequence is here, in order: no layout applies (nor its length rule)
        layout = "contiguous"
    errs = errs + _local_errors(q, k, v, key_padding_mask, layout, world, document_ids, pattern)
    if scale is None and not errs:
        scale = 1.0 / math.sqrt(q.shape[-1])
    if facts is not None and not facts.matches(q.shape[0], k.shape[2], world):
        facts = None  # agreed for other shapes (all ranks see the same mismatch): agree on these instead
    if facts is None:
        if world > 1:
            facts = _agree_call(q, k, key_padding_mask, document_ids, pattern, layout, scale or 0.0, errs, group,
                                world)
        elif errs:
            raise ValueError(f"{_WHO}: " + "; ".join(errs))
        else:  # one rank: its own mask and ids decide (host reads; the HF integration decides once per forward)
            padded = key_padding_mask is not None and not bool(key_padding_mask.all())
            docs = None if document_ids is None else docs_mod.local_documents(document_ids, get_layout(layout), _WHO)
            facts = RingFacts(1, q.shape[0], k.shape[2], (padded,), docs)
    elif errs:  # the agreement established equal shapes and options, so every rank finds the same errors
        raise ValueError(f"{_WHO}: " + "; ".join(errs))
    if facts.documents is not None:
        if pattern.has_segments:  # documents reached the call through the facts (the HF integration)
            raise ValueError(f"{_WHO}: packed documents with a dilated pattern are not supported: segments would "
                             "have to count from each document's start; use the dense pattern")
        plan = facts.documents.plan(pattern, get_layout(layout), k.shape[2], rank, q.shape[0], q.device)
    else:
        plan = make_plan(pattern, k.shape[2], world, rank, layout, q.shape[1], q.device, q_len=q.shape[2],
                         head_base=head_base)
    return run(q, k, v, key_padding_mask, plan, group, float(scale), overlap, facts)


def _ulysses_ring(q, k, v, pattern: Pattern, errs: list[str], kpm, scale, group, layout, overlap, document_ids, facts,
                  ulysses_group, u: int) -> torch.Tensor:
    """Two-dimensional: Ulysses all-to-all inside ``ulysses_group``, the ring over ``group`` on Hq/u heads.

    Errors are agreed in two stages so that no rank waits for ever: first inside the Ulysses group (its verdict is
    returned, not raised), then every rank joins the ring's agreement with that verdict, so a bad rank anywhere
    makes every rank of every ring raise before any K/V or all-to-all leaves a ring position."""
    R, _ = group_size_rank(group)
    errs = errs + _local_errors(q, k, v, kpm, "contiguous", u * R, document_ids, pattern)
    if not errs:
        errs += [e for e in (heads_error(q.shape[1], k.shape[1], u),
                             get_layout(layout).local_len_error(u * q.shape[2], R)) if e]
    if scale is None and not errs:
        scale = 1.0 / math.sqrt(q.shape[-1])
    if facts is None:  # stage 1: the Ulysses group (the ring's agreement below is stage 2)
        shape = list(q.shape) + [k.shape[1]] if q.dim() == 4 and k.dim() == 4 else [-1] * 5
        same = dict(zip(["batch", "q heads", "local_len", "head_dim", "kv heads"], shape))
        same.update({"dtype": _DTYPES.index(q.dtype) if q.dtype in _DTYPES else -1,
                     "has key_padding_mask": int(kpm is not None), "has document_ids": int(document_ids is not None),
                     "layout": code_of_layout(layout), "scale": round((scale or 0.0) * 1e6),
                     "pattern (segment_lengths, dilation_rates, causal, window)": pattern.key()})
        errs, _ = exchange(ulysses_group, errors=errs, same=same, mine={}, device=q.device, scope="Ulysses group")
    elif errs:  # the forward's agreement established equal shapes and options everywhere
        raise ValueError(f"{_WHO}: " + "; ".join(errs))
    if errs:
        if R > 1:  # every ring must hear it: join the ring's agreement with the verdict (it raises)
            _agree_call(q, k, kpm, document_ids, pattern, layout, scale or 0.0, errs, group, R)
        raise ValueError(f"{_WHO}: " + "; ".join(errs))
    if facts is None:  # the block's mask and document ids, gathered (they travel the ring as the block's)
        kpm = None if kpm is None else gather_block(kpm, ulysses_group, u)
        document_ids = None if document_ids is None else gather_block(document_ids, ulysses_group, u)
    else:  # gathered once for the forward
        kpm, document_ids = facts.block_mask, None
    qb, kb, vb = (seq_to_heads(t, ulysses_group, u) for t in (q, k, v))
    base = head_base(q.shape[1], u, dist.get_rank(ulysses_group))
    out = _ring(qb, kb, vb, pattern, [], kpm, scale, group, layout, False, overlap, document_ids, facts, base)
    return heads_to_seq(out, ulysses_group, u)
