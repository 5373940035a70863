"""The ring-dilated attention op: one ring loop for every pattern and layout, forward and backward.

Forward: each rank keeps its shards of Q, K, V. At step s it receives the K/V chunk (and key-padding mask) of rank
p - s, posted before the previous step's compute so the transfer overlaps with it, runs the plan's pieces against it
and merges them into fp32 accumulators with online softmax (running log-sum-exp).
Backward: a custom autograd.Function that saves only the local q, k, v, mask, out and the final lse (all O(S/P)),
rotates K/V again with the same schedule and sends each dK/dV partial (fp32) home to the chunk's owner, in two
halves of the chunk's keys so that one half travels while the next is computed.
"""

from __future__ import annotations

import functools
import math
import zlib

import torch
import torch.distributed as dist

from .comm import RingComm
from .kernels import BlockMask, block_backward, block_forward
from .pattern import Pattern, Piece, Plan, make_plan
from .sharding import LAYOUTS, group_size_rank

_KV_TAG, _DKV_TAG = 0, 1 << 20  # gloo matches messages by tag; NCCL by order


@functools.lru_cache(maxsize=256)
def _kv_heads(num_q: int, num_kv: int, start: int, step: int) -> tuple[int, ...] | None:
    """KV heads read by query heads start::step, one per query head or one per group; None = all, in order.

    Returns the heads to gather from k/v such that the kernel's own GQA grouping (query head i reads kv head
    i // (Hq' / Hkv')) is right, so K/V are expanded only where the dilation breaks the grouping.
    """
    group = num_q // num_kv
    kv = [h // group for h in range(start, num_q, step)]
    uniq = sorted(set(kv))
    reps = len(kv) // len(uniq)
    if kv == [u for u in uniq for _ in range(reps)]:
        return None if uniq == list(range(num_kv)) else tuple(uniq)
    return tuple(kv)


@functools.lru_cache(maxsize=256)
def _kv_head_index(num_q: int, num_kv: int, start: int, step: int, device: str) -> torch.Tensor | None:
    """``_kv_heads`` as an index tensor on ``device``, made once: a host-to-device copy per call would stall the
    CUDA stream once per piece."""
    heads = _kv_heads(num_q, num_kv, start, step)
    return None if heads is None else torch.tensor(heads, device=device)


def _piece_kv(piece: Piece, num_q: int, k: torch.Tensor, v: torch.Tensor, kpm: torch.Tensor | None):
    head_idx = _kv_head_index(num_q, k.shape[1], piece.head_start, piece.head_step, str(k.device))
    if head_idx is not None:
        k, v = k.index_select(1, head_idx), v.index_select(1, head_idx)
    if piece.k_idx is not None:
        k, v = k.index_select(2, piece.k_idx), v.index_select(2, piece.k_idx)
        if kpm is not None:
            kpm = kpm.index_select(1, piece.k_idx)
    return k, v, kpm, head_idx


def _rows(t: torch.Tensor, piece: Piece) -> torch.Tensor:
    """The piece's query heads and rows of a (B, Hq, L, ...) tensor."""
    t = t[:, piece.head_start :: piece.head_step]
    return t if piece.q_idx is None else t.index_select(2, piece.q_idx)


def _block_mask(piece: Piece, kpm: torch.Tensor | None) -> BlockMask:
    if kpm is not None and piece.groups > 1:
        kpm = kpm.reshape(kpm.shape[0] * piece.groups, -1)
    return BlockMask(piece.q_pos, piece.k_pos, piece.seg, piece.causal, piece.window, piece.causal_diag, kpm)


def _fold(t: torch.Tensor, G: int) -> torch.Tensor:
    """(B, H, G * m, ...) -> (B * G, H, m, ...): one batch entry per segment block."""
    if G == 1:
        return t
    B, H, n = t.shape[:3]
    return t.reshape(B, H, G, n // G, *t.shape[3:]).transpose(1, 2).reshape(B * G, H, n // G, *t.shape[3:])


def _unfold(t: torch.Tensor, G: int) -> torch.Tensor:
    """Inverse of ``_fold``."""
    if G == 1:
        return t
    BG, H, m = t.shape[:3]
    return t.reshape(BG // G, G, H, m, *t.shape[3:]).transpose(1, 2).reshape(BG // G, H, G * m, *t.shape[3:])


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: fp32 for fp32/bf16/fp16 inputs, fp64 for fp64."""
    return torch.promote_types(dtype, torch.float32)


def _covers_all(piece: Piece) -> bool:
    return piece.q_idx is None and piece.head_start == 0 and piece.head_step == 1


class _Sum:
    """Running sum over (B, H, L, ...) rows. It adopts a first term that covers every row as it is (no zero fill and
    no extra pass, so one block costs what the kernel costs) and turns to the accumulation dtype (fp32, fp64 for
    fp64 inputs) once a second term arrives."""

    def __init__(self, shape, like: torch.Tensor):
        self.shape, self.device, self.dtype, self.t = tuple(shape), like.device, _acc_dtype(like.dtype), None

    def acc(self) -> torch.Tensor:
        """The sum in the accumulation dtype, materialised."""
        if self.t is None:
            self.t = torch.zeros(self.shape, dtype=self.dtype, device=self.device)
        elif self.t.dtype != self.dtype:
            self.t = self.t.to(self.dtype)
        return self.t

    def add(self, g: torch.Tensor, head_start: int = 0, head_step: int = 1, idx: torch.Tensor | None = None):
        if self.t is None and head_start == 0 and head_step == 1 and idx is None:
            self.t = g
            return
        view = self.acc()[:, head_start::head_step]
        view.add_(g) if idx is None else view.index_add_(2, idx, g.to(view.dtype))

    def result(self, dtype: torch.dtype) -> torch.Tensor:
        return torch.zeros(self.shape, dtype=dtype, device=self.device) if self.t is None else self.t.to(dtype)


class _Softmax:
    """Running (out, lse) of the rows, merged block by block with online softmax in fp32."""

    def __init__(self, q: torch.Tensor):
        self.q, self.out, self.lse = q, None, None

    def add(self, piece: Piece, out_b: torch.Tensor, lse_b: torch.Tensor) -> None:
        if self.out is None and _covers_all(piece):
            self.out, self.lse = out_b, lse_b
            return
        dt = _acc_dtype(self.q.dtype)
        if self.out is None:
            self.out = torch.zeros(self.q.shape, dtype=dt, device=self.q.device)
            self.lse = torch.full(self.q.shape[:3], float("-inf"), dtype=dt, device=self.q.device)
        else:
            self.out, self.lse = self.out.to(dt), self.lse.to(dt)
        oa, la = self.out[:, piece.head_start :: piece.head_step], self.lse[:, piece.head_start :: piece.head_step]
        if piece.q_idx is None:
            _merge_(oa, la, out_b, lse_b)
        else:
            o_cur, l_cur = oa.index_select(2, piece.q_idx), la.index_select(2, piece.q_idx)
            _merge_(o_cur, l_cur, out_b, lse_b)
            oa.index_copy_(2, piece.q_idx, o_cur)
            la.index_copy_(2, piece.q_idx, l_cur)

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        q = self.q
        if self.out is None:  # no block at all: every row attends to nothing
            return torch.zeros_like(q), torch.full(q.shape[:3], float("-inf"), device=q.device)
        return self.out.to(q.dtype), self.lse


def _merge_(out: torch.Tensor, lse: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor) -> None:
    """Online-softmax merge of a block into fp32 accumulators, in place; rows still at -inf stay 0."""
    new = torch.logaddexp(lse, lse_b)
    ref = new.masked_fill(new == float("-inf"), 0.0)
    out.mul_(torch.exp(lse - ref).unsqueeze(-1)).add_(out_b.to(out.dtype) * torch.exp(lse_b - ref).unsqueeze(-1))
    lse.copy_(new)


def _forward_pieces(pieces, q, k, v, kpm, acc: _Softmax, scale):
    for piece in pieces:
        kp, vp, kpm_p, _ = _piece_kv(piece, q.shape[1], k, v, kpm)
        G = piece.groups
        out_b, lse_b = block_forward(_fold(_rows(q, piece), G), _fold(kp, G), _fold(vp, G),
                                     _block_mask(piece, kpm_p), scale)
        acc.add(piece, _unfold(out_b, G), _unfold(lse_b, G))


def _backward_pieces(pieces, q, k, v, kpm, out, lse, dout, dq: _Sum, dk: _Sum, dv: _Sum, scale):
    for piece in pieces:
        kp, vp, kpm_p, head_idx = _piece_kv(piece, q.shape[1], k, v, kpm)
        G = piece.groups
        grads = block_backward(
            *(_fold(t, G) for t in (_rows(dout, piece), _rows(q, piece), kp, vp, _rows(out, piece), _rows(lse, piece))),
            _block_mask(piece, kpm_p), scale,
        )
        dq_b, dk_b, dv_b = (_unfold(t, G) for t in grads)
        dq.add(dq_b, piece.head_start, piece.head_step, piece.q_idx)
        for acc, g in ((dk, dk_b), (dv, dv_b)):
            if head_idx is not None:  # fold query-head copies back onto their kv heads
                dt = _acc_dtype(g.dtype)
                g = torch.zeros(acc.shape[0], acc.shape[1], g.shape[2], g.shape[3], dtype=dt,
                                device=g.device).index_add_(1, head_idx, g.to(dt))
            acc.add(g, idx=piece.k_idx)


def _packet(k, v, kpm):
    return [k, v] if kpm is None else [k, v, kpm.to(torch.uint8)]


def _unpack(bufs):
    return bufs[0], bufs[1], _mask_or_none(bufs[2].bool() if len(bufs) > 2 else None)


def _mask_or_none(kpm: torch.Tensor | None) -> torch.Tensor | None:
    """A chunk with no padded key needs no mask: its blocks keep the unmasked (faster) kernel path.

    The mask still travels with the chunk (every rank sends the same packet); only its use is skipped."""
    return None if kpm is None or bool(kpm.all()) else kpm


def ring_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kpm: torch.Tensor | None, plan: Plan,
    comm: RingComm | None, scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the plan: out (B, Hq, L, D) in q's dtype and lse (B, Hq, L) in fp32 (fp64 for fp64 inputs), -inf for
    rows with no key."""
    acc = _Softmax(q)
    packet = _packet(k, v, kpm)
    steps = plan.comm_steps
    bufs = [[torch.empty_like(t) for t in packet] for _ in range(min(2, len(steps)))]

    def post(i):
        recv_from, send_to, _ = plan.steps[steps[i]]
        return comm.exchange("kv", _KV_TAG + 8 * steps[i], send_to, packet, recv_from, bufs[i % 2])

    pending = post(0) if steps else None  # first transfer overlaps the local block
    _forward_pieces(plan.steps[0][2], q, k, v, _mask_or_none(kpm), acc, scale)
    for i, s in enumerate(steps):
        pending.wait()
        pending = post(i + 1) if i + 1 < len(steps) else None
        recv_from, _, pieces = plan.steps[s]
        if recv_from is not None:
            kc, vc, kpmc = _unpack(bufs[i % 2])
            _forward_pieces(pieces, q, kc, vc, kpmc, acc, scale)
    return acc.result()


def ring_backward(
    dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kpm: torch.Tensor | None,
    out: torch.Tensor, lse: torch.Tensor, plan: Plan, comm: RingComm | None, scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of the local shards: dq (B, Hq, L, D), dk/dv (B, Hkv, L, D) in the inputs' dtypes."""
    # A row with no key has every key masked in every block, so p = 0 whatever its lse: use a finite one (0), as
    # some kernels compute s - lse before masking and -inf - (-inf) would be NaN.
    lse = lse.masked_fill(lse == float("-inf"), 0.0)
    dq, dk, dv = _Sum(q.shape, q), _Sum(k.shape, k), _Sum(k.shape, k)
    packet = _packet(k, v, kpm)
    steps = plan.comm_steps
    nbuf = min(2, len(steps))
    kv_bufs = [[torch.empty_like(t) for t in packet] for _ in range(nbuf)]
    B, Hkv, L, D = k.shape
    home_flat = torch.empty(2, B * Hkv * ((L + 1) // 2) * D, dtype=_acc_dtype(k.dtype), device=k.device) if steps \
        else None

    def home(n):  # contiguous landing buffers for an incoming dK/dV part of n key rows
        return [home_flat[j, : B * Hkv * n * D].view(B, Hkv, n, D) for j in range(2)]

    def post_kv(i):
        recv_from, send_to, _ = plan.steps[steps[i]]
        return comm.exchange("kv", _KV_TAG + 8 * steps[i], send_to, packet, recv_from, kv_bufs[i % 2])

    pending_kv = post_kv(0) if steps else None
    _backward_pieces(plan.steps[0][2], q, k, v, _mask_or_none(kpm), out, lse, dout, dq, dk, dv, scale)
    pending_dkv = None  # (handle, key rows of the part that arrives or None); one dK/dV exchange in flight
    for i, s in enumerate(steps):
        pending_kv.wait()
        pending_kv = post_kv(i + 1) if i + 1 < len(steps) else None
        recv_from, send_to, _ = plan.steps[s]
        kc, vc, kpmc = _unpack(kv_bufs[i % 2])
        for j, (lo, hi, pieces) in enumerate(plan.key_parts[s]):
            part = []  # dK/dV (fp32) of the chunk's key rows [lo, hi), for the chunk's owner
            if recv_from is not None:
                sums = [_Sum((B, Hkv, hi - lo, D), k) for _ in range(2)]  # adopts a whole-block grad
                _backward_pieces(pieces, q, kc[:, :, lo:hi], vc[:, :, lo:hi], None if kpmc is None else
                                 kpmc[:, lo:hi], out, lse, dout, dq, *sums, scale)
                part = [t.acc().contiguous() for t in sums]
            if pending_dkv is not None:  # the previous part travelled while this one was computed
                _add_home(*pending_dkv, home, dk, dv)
            # send the part home; the rank we sent our K/V to sends back its part for our chunk
            handle = comm.exchange("dkv", _DKV_TAG + 8 * s + 2 * j, recv_from, part, send_to, home(hi - lo))
            pending_dkv = (handle, (lo, hi) if send_to is not None else None)
    if pending_dkv is not None:
        _add_home(*pending_dkv, home, dk, dv)
    return dq.result(q.dtype), dk.result(k.dtype), dv.result(v.dtype)


def _add_home(handle, rows, home, dk, dv):
    handle.wait()
    if rows is not None:
        lo, hi = rows
        hk, hv = home(hi - lo)
        dk.acc()[:, :, lo:hi].add_(hk)
        dv.acc()[:, :, lo:hi].add_(hv)


class _RingDilatedAttention(torch.autograd.Function):
    """Thin autograd shell: saves only local, O(S/P) tensors and reruns the ring in backward."""

    @staticmethod
    def forward(ctx, q, k, v, kpm, plan, group, scale, overlap):
        comm = RingComm(group, overlap) if plan.world_size > 1 else None
        out, lse = ring_forward(q, k, v, kpm, plan, comm, scale)
        ctx.save_for_backward(q, k, v, kpm, out, lse)
        ctx.plan, ctx.comm, ctx.scale = plan, comm, scale
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, kpm, out, lse = ctx.saved_tensors
        dq, dk, dv = ring_backward(dout.contiguous(), q, k, v, kpm, out, lse, ctx.plan, ctx.comm, ctx.scale)
        return dq, dk, dv, None, None, None, None, None


_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _local_errors(q, k, v, kpm, layout: str, world: int) -> list[str]:
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
    B, Hq, L, D = q.shape
    if k.shape[0] != B or k.shape[2] != L or k.shape[3] != D:
        errs.append(f"k/v shape {tuple(k.shape)} does not match q {tuple(q.shape)} in batch, length or head_dim")
    if k.shape[1] == 0 or Hq % k.shape[1]:
        errs.append(f"q has {Hq} heads, k/v have {k.shape[1]}: the query heads must be a multiple of the kv heads")
    if L == 0:
        errs.append("the local shard is empty (q.shape[2] == 0)")
    if layout not in LAYOUTS:
        errs.append(f"layout={layout!r} is not supported: use one of {LAYOUTS}")
    elif layout == "zigzag" and L % 2:
        errs.append(f"layout='zigzag' needs an even shard length, got {L}: pad the sequence to a multiple of "
                    f"2*world_size={2 * world}")
    if kpm is not None:
        if not isinstance(kpm, torch.Tensor) or kpm.dtype != torch.bool:
            errs.append(f"key_padding_mask must be a bool tensor (True = real token), got "
                        f"{getattr(kpm, 'dtype', type(kpm))}: pass mask.bool()")
        elif tuple(kpm.shape) != (B, L):
            errs.append(f"key_padding_mask must have shape (batch, local_len) = {(B, L)}, got {tuple(kpm.shape)}")
        elif kpm.device != q.device:
            errs.append(f"key_padding_mask is on {kpm.device}, q on {q.device}: move it to q's device")
    return errs


def _check_group(q, k, kpm, pattern_key, layout, scale, errs, group, world, rank) -> None:
    """All ranks exchange a few integers and raise the same ValueError if any rank is unhappy or shapes differ."""
    shape = list(q.shape) + [k.shape[1]] if q.dim() == 4 and k.dim() == 4 else [-1] * 5
    meta = [int(bool(errs))] + shape + [
        _DTYPES.index(q.dtype) if q.dtype in _DTYPES else -1, int(kpm is not None),
        LAYOUTS.index(layout) if layout in LAYOUTS else -1, zlib.crc32(repr(pattern_key).encode()),
        round(scale * 1e6),
    ]
    device = q.device if dist.get_backend(group) == "nccl" else torch.device("cpu")
    mine = torch.tensor(meta, dtype=torch.int64, device=device)
    alls = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(alls, mine, group=group)
    rows = [t.tolist() for t in alls]
    if errs:
        raise ValueError("ring_dilated_attention: " + "; ".join(errs))
    bad = [r for r, m in enumerate(rows) if m[0]]
    if bad:
        raise ValueError(f"ring_dilated_attention: rank(s) {bad} of the ring rejected their inputs (their errors "
                         "say why); every rank stops before any K/V is sent")
    names = ["batch", "q heads", "local_len", "head_dim", "kv heads", "dtype", "has key_padding_mask", "layout",
             "pattern (segment_lengths, dilation_rates, causal, window)", "scale"]
    for col, name in enumerate(names, start=1):
        values = [m[col] for m in rows]
        if len(set(values)) > 1:
            raise ValueError(
                f"ring_dilated_attention: {name} differs across the ring's ranks ({values} by rank; this is rank "
                f"{rank}): every rank must pass shards of the same shape and the same options"
            )


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
) -> torch.Tensor:
    """Exact (dilated) attention over a sequence sharded across the ranks of ``group``.

    q: (B, Hq, L, D), k/v: (B, Hkv, L, D) local shards (Hq % Hkv == 0; K/V travel with Hkv heads).
    key_padding_mask: (B, L) bool, True = real token. Returns (B, Hq, L, D) in q's dtype.

    segment_lengths / dilation_rates: LongNet pairs on GLOBAL positions (None = the whole sequence, the default is
    exact full attention). causal: keys t <= i only. window: keys with i - t < window only. scale: default
    1/sqrt(D). layout: how the sequence is cut over the ring ("contiguous" or "zigzag"). local: treat the tensors as
    the whole sequence (no communication), e.g. for generation. overlap: post each transfer before the compute it
    hides behind (False serialises them, for benchmarks).
    A query with no key to attend to gets 0. Bad input raises ValueError on every rank before any K/V is sent.
    """
    world, rank = (1, 0) if local else group_size_rank(group)
    errs = []
    try:
        pattern = Pattern.make(segment_lengths, dilation_rates, causal, window)
    except ValueError as e:
        errs.append(str(e))
        pattern = Pattern()
    errs += _local_errors(q, k, v, key_padding_mask, layout, world)
    if scale is None and not errs:
        scale = 1.0 / math.sqrt(q.shape[-1])
    if world > 1:
        _check_group(q, k, key_padding_mask, pattern.key(), layout, scale or 0.0, errs, group, world, rank)
    elif errs:
        raise ValueError("ring_dilated_attention: " + "; ".join(errs))
    plan = make_plan(pattern, q.shape[2], world, rank, layout, q.shape[1], q.device)
    return _RingDilatedAttention.apply(
        q.contiguous(), k.contiguous(), v.contiguous(), key_padding_mask, plan, group, float(scale), overlap
    )
