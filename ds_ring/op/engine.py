"""The ring engine: one loop for every pattern and layout, forward and backward, under a thin autograd shell.

Forward: each rank keeps its shards of Q, K, V. At step s it receives the K/V chunk (and key-padding mask) of rank
p - s, posted before the previous step's compute so the transfer overlaps with it, runs the schedule's pieces against it
and merges them into fp32 accumulators with online softmax (running log-sum-exp).
Backward: saves only the local q, k, v, mask, out and the final lse (all O(S/P)), rotates K/V again with the same
schedule and sends each dK/dV partial (fp32) home to the chunk's owner, in two halves of the chunk's keys so that one
half travels while the next is computed.

Everything about the other ranks (which chunks carry padding) comes from the agreement (``RingFacts``), decided
before the loop: the loop itself makes no host sync. The front door (attention.py) validates and builds the
schedule (schedule.py).
"""

from __future__ import annotations

import functools
from typing import Iterator

import torch
import torch.distributed as dist

from .agreement import RingFacts
from .comm import RingComm
from .kernels import block_backward, block_forward
from .pairs import AllowedPairs
from .schedule import Piece, Schedule, Step


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


def _select(t: torch.Tensor, dim: int, idx: torch.Tensor | slice | None) -> torch.Tensor:
    """Rows ``idx`` of ``t`` along ``dim``: all (None), evenly spaced rows (a slice: a view) or an index tensor (a
    copy)."""
    if idx is None:
        return t
    if isinstance(idx, slice):
        return t.narrow(dim, idx.start, idx.stop - idx.start) if idx.step is None else t[(slice(None),) * dim + (idx,)]
    return t.index_select(dim, idx)


def _batch(t: torch.Tensor, piece: Piece) -> torch.Tensor:
    """The piece's batch row (a view), or all rows."""
    return t if piece.batch is None else t.narrow(0, piece.batch, 1)


def _piece_kv(piece: Piece, num_q: int, k: torch.Tensor, v: torch.Tensor, kpm: torch.Tensor | None):
    head_idx = _kv_head_index(num_q, k.shape[1], piece.head_start, piece.head_step, str(k.device))
    k, v = _batch(k, piece), _batch(v, piece)
    if head_idx is not None:
        k, v = k.index_select(1, head_idx), v.index_select(1, head_idx)
    k, v = _select(k, 2, piece.k_idx), _select(v, 2, piece.k_idx)
    if kpm is not None:
        kpm = _select(_batch(kpm, piece), 1, piece.k_idx)
    G = piece.groups
    k, v, kpm = _sub_rows(_fold(k, G), piece.k_sub), _sub_rows(_fold(v, G), piece.k_sub), \
        _sub_rows(_fold_padding(kpm, G), piece.k_sub, 1)
    if _strided(piece.k_idx):
        k, v, kpm = (_dense_off_cpu(t) for t in (k, v, kpm))
    return k, v, kpm, head_idx


def _strided(idx) -> bool:
    return isinstance(idx, slice) and idx.step is not None


def _dense_off_cpu(t: torch.Tensor | None) -> torch.Tensor | None:
    """Evenly spaced rows as they are for the CPU kernel (it reads row strides: measured exact); a contiguous copy
    for the CUDA paths, which were timed on contiguous rows only (what the gather gave them)."""
    return t if t is None or t.device.type == "cpu" else t.contiguous()


def _rows(t: torch.Tensor, piece: Piece) -> torch.Tensor:
    """The piece's batch rows, query heads and rows of a (B, Hq, L, ...) tensor."""
    return _select(_batch(t, piece)[:, piece.head_start :: piece.head_step], 2, piece.q_idx)


def _allowed_pairs(piece: Piece) -> AllowedPairs:
    """What the kernel masks in one piece's block (positions: causal, window, segments; document ids), made once and
    kept with the piece (so with the schedule), with what kernels derive from it (the Flex BlockMask)."""
    if "pairs" not in piece.kernel_cache:
        piece.kernel_cache["pairs"] = AllowedPairs(piece.q_pos, piece.k_pos, piece.seg, piece.causal, piece.window,
                                                   piece.causal_diag, piece.q_doc, piece.k_doc)
    return piece.kernel_cache["pairs"]


def _sub_rows(t: torch.Tensor | None, sub: tuple[int, int, int] | None, dim: int = 2) -> torch.Tensor | None:
    """Rows [a, b) of every folded block (a view), for ``sub`` = (a, b, m); all rows for None."""
    return t if t is None or sub is None else t.narrow(dim, sub[0], sub[1] - sub[0])


def _block_rows(t: torch.Tensor, piece: Piece) -> torch.Tensor:
    """The kernel's view of a (B, Hq, L, ...) tensor's rows for ``piece``: its rows folded into blocks, narrowed to
    the piece's rows of each block."""
    t = _sub_rows(_fold(_rows(t, piece), piece.groups), piece.q_sub)
    return _dense_off_cpu(t) if _strided(piece.q_idx) else t


def _unfold_to(t: torch.Tensor, G: int, sub) -> torch.Tensor:
    """A kernel result (B * G, H, n, ...) as the rows it belongs to: (B, H, G * n, ...), or (B, H, G, n, ...) for
    rows of each block (``sub``), to land in ``_in_blocks`` of the accumulator."""
    if sub is None:
        return _unfold(t, G)
    return t.reshape(t.shape[0] // G, G, *t.shape[1:]).transpose(1, 2)


def _in_blocks(view: torch.Tensor, G: int, sub) -> torch.Tensor:
    """Rows [a, b) of each of the G blocks of a (B, H, G * m, ...) view, as a (B, H, G, b - a, ...) view."""
    if sub is None:
        return view
    return view.unflatten(2, (G, sub[2])).narrow(3, sub[0], sub[1] - sub[0])


def _fold_padding(kpm: torch.Tensor | None, G: int) -> torch.Tensor | None:
    """(B, G * n) -> (B * G, n), as ``_fold`` batches the segment blocks."""
    return kpm if kpm is None or G == 1 else kpm.reshape(kpm.shape[0] * G, -1)


def _fold(t: torch.Tensor, G: int) -> torch.Tensor:
    """(B, H, G * m, ...) -> (B * G, H, m, ...): one batch entry per segment block."""
    if G == 1:
        return t
    if t.shape[0] == 1 and t.device.type == "cpu":
        # a strided view, no copy: the CPU kernel reads the strides (measured exact; B > 1 cannot merge B and G)
        return t[0].unflatten(1, (G, t.shape[2] // G)).transpose(0, 1)
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
    return (piece.q_idx is None and piece.q_sub is None and piece.head_start == 0 and piece.head_step == 1
            and piece.batch is None)


class _RunningSum:
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

    def add(self, g: torch.Tensor, head_start: int = 0, head_step: int = 1, idx: torch.Tensor | slice | None = None,
            batch: int | None = None, groups: int = 1, sub: tuple[int, int, int] | None = None):
        if self.t is None and head_start == 0 and head_step == 1 and idx is None and batch is None and sub is None:
            self.t = g
            return
        view = self.acc()
        view = (view if batch is None else view.narrow(0, batch, 1))[:, head_start::head_step]
        if sub is not None:  # rows of each block (idx is never a tensor then: the cut keeps tensors as indices)
            _in_blocks(_select(view, 2, idx), groups, sub).add_(g)
        elif isinstance(idx, torch.Tensor):
            view.index_add_(2, idx, g.to(view.dtype))
        else:
            _select(view, 2, idx).add_(g)

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
        oa, la = _batch(self.out, piece), _batch(self.lse, piece)
        oa, la = oa[:, piece.head_start :: piece.head_step], la[:, piece.head_start :: piece.head_step]
        if not isinstance(piece.q_idx, torch.Tensor):  # all rows or a contiguous range: merge in place
            G, sub = piece.groups, piece.q_sub
            _merge_(_in_blocks(_select(oa, 2, piece.q_idx), G, sub), _in_blocks(_select(la, 2, piece.q_idx), G, sub),
                    out_b, lse_b)
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
        out_b, lse_b = block_forward(_block_rows(q, piece), kp, vp, _allowed_pairs(piece), scale, kpm_p)
        acc.add(piece, _unfold_to(out_b, G, piece.q_sub), _unfold_to(lse_b, G, piece.q_sub))


def _backward_pieces(pieces, q, k, v, kpm, out, lse, dout, dq: _RunningSum, dk: _RunningSum, dv: _RunningSum,
                     scale):
    for piece in pieces:
        kp, vp, kpm_p, head_idx = _piece_kv(piece, q.shape[1], k, v, kpm)
        G = piece.groups
        dout_b, q_b, out_b, lse_b = (_block_rows(t, piece) for t in (dout, q, out, lse))
        grads = block_backward(dout_b, q_b, kp, vp, out_b, lse_b, _allowed_pairs(piece), scale, kpm_p)
        dq_b = _unfold_to(grads[0], G, piece.q_sub)
        dk_b, dv_b = (_unfold_to(t, G, piece.k_sub) for t in grads[1:])
        dq.add(dq_b, piece.head_start, piece.head_step, piece.q_idx, piece.batch, G, piece.q_sub)
        for acc, g in ((dk, dk_b), (dv, dv_b)):
            if head_idx is not None:  # fold query-head copies back onto their kv heads
                dt = _acc_dtype(g.dtype)
                g = torch.zeros(g.shape[0], acc.shape[1], *g.shape[2:], dtype=dt,
                                device=g.device).index_add_(1, head_idx, g.to(dt))
            acc.add(g, idx=piece.k_idx, batch=piece.batch, groups=G, sub=piece.k_sub)


def _rows_view(flat: torch.Tensor, like: torch.Tensor, n: int) -> torch.Tensor:
    """A contiguous (B, H, n, ...) view at the start of the flat buffer ``flat`` (shape of ``like``, n rows)."""
    shape = (*like.shape[:2], n, *like.shape[3:]) if like.dim() > 2 else (like.shape[0], n)
    return flat[: torch.Size(shape).numel()].view(shape)


def _rotate(
    schedule: Schedule, comm: RingComm | None, k: torch.Tensor, v: torch.Tensor, kpm: torch.Tensor | None,
    facts: RingFacts,
) -> Iterator[tuple[Step, torch.Tensor, torch.Tensor, torch.Tensor | None]]:
    """Yield (step, k, v, key-padding mask or None) for the local chunk, then for every step with traffic, with the
    received rows (``step.recv_rows`` of the source's shard) only.

    The next transfer is posted before the current chunk is yielded, so it travels while the caller computes; a
    buffer is reused two steps later, after the caller moved on. The mask travels when any rank of the ring is
    padded (then every packet has one) and is used only for chunks that are padded.
    """
    local = [k, v]
    if facts.any_padded:
        local.append(torch.ones(k.shape[0], k.shape[2], dtype=torch.uint8, device=k.device) if kpm is None
                     else kpm.to(torch.uint8))
    steps = schedule.comm_steps
    bufs = [[torch.empty(t.numel(), dtype=t.dtype, device=t.device) for t in local] for _ in range(min(2, len(steps)))]

    def post(i: int):
        st = steps[i]
        a, b = st.send_rows
        send = [t.narrow(t.dim() - 2 if t.dim() > 2 else 1, a, b - a).contiguous() for t in local] \
            if st.dest is not None else []
        n = st.recv_rows[1] - st.recv_rows[0]
        recv = [_rows_view(f, t, n) for f, t in zip(bufs[i % 2], local)] if st.source is not None else []
        return comm.exchange("kv", st.index, 0, st.dest, send, st.source, recv), recv

    pending = post(0) if steps else None  # the first transfer overlaps the local block
    yield schedule.steps[0], k, v, kpm if facts.padded[schedule.rank] else None
    for i, st in enumerate(steps):
        handle, recv = pending
        handle.wait()
        pending = post(i + 1) if i + 1 < len(steps) else None
        if st.source is None:
            yield st, None, None, None  # we only sent: the backward still exchanges dK/dV at this step
            continue
        kc, vc, *mask = recv
        yield st, kc, vc, mask[0].bool() if facts.padded[st.source] else None


def ring_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kpm: torch.Tensor | None, schedule: Schedule,
    comm: RingComm | None, scale: float, facts: RingFacts,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the schedule: out (B, Hq, M, D) in q's dtype and lse (B, Hq, M) in fp32 (fp64 for fp64 inputs), -inf for
    rows with no key."""
    acc = _Softmax(q)
    for st, kc, vc, kpmc in _rotate(schedule, comm, k, v, kpm, facts):
        if st.source is not None:
            _forward_pieces(st.pieces, q, kc, vc, kpmc, acc, scale)
    return acc.result()


class _HomewardGrads:
    """dK/dV partials on their way home, one exchange in flight.

    At step s this rank computed against rows of ``step.source``: each of its key parts' partial goes back to that
    owner, while the partials for OUR rows (``step.home_parts``) arrive from ``step.dest``, the rank we sent them to.
    Both ends cut the rows by the same rule (``schedule.key_halves``), so exchange j pairs up. The exchange of one
    part travels while the next part is computed; it lands (is added into dk/dv) before the next is posted, so two
    fp32 landing buffers of half a shard serve every step.
    """

    def __init__(self, comm: RingComm, k: torch.Tensor, dk: _RunningSum, dv: _RunningSum):
        B, Hkv, L, D = k.shape
        self.comm, self.dk, self.dv, self.like = comm, dk, dv, k
        self.flat = torch.empty(2, B * Hkv * ((L + 1) // 2) * D, dtype=_acc_dtype(k.dtype), device=k.device)
        self.pending, self.rows = None, None

    def send(self, st: Step, index: int, grads: list[torch.Tensor], rows: tuple[int, int] | None) -> None:
        """Post ``grads`` (dk, dv of our key part ``index`` of the source's rows; [] if none) to their owner and the
        receive of our rows ``rows`` (None if none come back in this exchange)."""
        self.land()
        landing = [] if rows is None else [_rows_view(self.flat[j], self.like, rows[1] - rows[0]) for j in range(2)]
        self.pending = self.comm.exchange("dkv", st.index, index, st.source if grads else None, grads,
                                          st.dest if rows is not None else None, landing)
        self.rows = None if rows is None else (rows, landing)

    def land(self) -> None:
        if self.pending is None:
            return
        self.pending.wait()
        if self.rows is not None:
            (lo, hi), (hk, hv) = self.rows
            self.dk.acc()[:, :, lo:hi].add_(hk)
            self.dv.acc()[:, :, lo:hi].add_(hv)
        self.pending, self.rows = None, None


def ring_backward(
    dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kpm: torch.Tensor | None,
    out: torch.Tensor, lse: torch.Tensor, schedule: Schedule, comm: RingComm | None, scale: float, facts: RingFacts,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of the local shards: dq (B, Hq, M, D), dk/dv (B, Hkv, L, D) in the inputs' dtypes."""
    # A row with no key has every key masked in every block, so p = 0 whatever its lse: use a finite one (0), as
    # some kernels compute s - lse before masking and -inf - (-inf) would be NaN.
    lse = lse.masked_fill(lse == float("-inf"), 0.0)
    dq, dk, dv = _RunningSum(q.shape, q), _RunningSum(k.shape, k), _RunningSum(k.shape, k)
    home = _HomewardGrads(comm, k, dk, dv) if schedule.comm_steps else None
    B, Hkv, _, D = k.shape
    for st, kc, vc, kpmc in _rotate(schedule, comm, k, v, kpm, facts):
        if st.index == 0:  # our own chunk: its dK/dV are ours
            _backward_pieces(st.pieces, q, kc, vc, kpmc, out, lse, dout, dq, dk, dv, scale)
            continue
        for j in range(max(len(st.key_parts), len(st.home_parts))):
            grads = []  # dK/dV (fp32) of the received rows of part j, for their owner
            if j < len(st.key_parts):
                part = st.key_parts[j]
                # each adopts a whole-block gradient as it is
                sums = [_RunningSum((B, Hkv, part.hi - part.lo, D), k) for _ in range(2)]
                rows = slice(part.lo, part.hi)
                _backward_pieces(part.pieces, q, kc[:, :, rows], vc[:, :, rows], None if kpmc is None else
                                 kpmc[:, rows], out, lse, dout, dq, *sums, scale)
                grads = [t.acc().contiguous() for t in sums]
            home.send(st, j, grads, st.home_parts[j] if j < len(st.home_parts) else None)
    if home is not None:
        home.land()
    return dq.result(q.dtype), dk.result(k.dtype), dv.result(v.dtype)


class _RingAttention(torch.autograd.Function):
    """Thin autograd shell: saves only local, O(S/P) tensors and reruns the ring in backward."""

    @staticmethod
    def forward(ctx, q, k, v, kpm, schedule, group, scale, overlap, facts):
        comm = RingComm(group, overlap) if schedule.world_size > 1 else None
        out, lse = ring_forward(q, k, v, kpm, schedule, comm, scale, facts)
        ctx.save_for_backward(q, k, v, kpm, out, lse)
        ctx.schedule, ctx.comm, ctx.scale, ctx.facts = schedule, comm, scale, facts
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, kpm, out, lse = ctx.saved_tensors
        dq, dk, dv = ring_backward(dout.contiguous(), q, k, v, kpm, out, lse, ctx.schedule, ctx.comm, ctx.scale,
                                   ctx.facts)
        return dq, dk, dv, None, None, None, None, None, None


def run(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kpm: torch.Tensor | None, schedule: Schedule,
    group: dist.ProcessGroup | None, scale: float, overlap: bool, facts: RingFacts,
) -> torch.Tensor:
    """Differentiable ring attention of validated local shards under ``schedule``: (B, Hq, M, D) in q's dtype."""
    return _RingAttention.apply(q.contiguous(), k.contiguous(), v.contiguous(), kpm, schedule, group, scale, overlap,
                                facts)
