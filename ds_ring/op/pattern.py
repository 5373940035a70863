"""The attention pattern: LongNet segments and dilation, causal, sliding window, and which blocks of work it implies.

Semantics. For pair j = (w_j, r_j) and query head h the offset is o = h % r_j; global position t is selected iff
(t % w_j) % r_j == o. Query i and key t interact under pair j iff i // w_j == t // w_j and both are selected; with
``causal`` only t <= i; with ``window`` only i - t < window; a padded key never interacts. Pairs are mixed by their
softmax denominators, i.e. dense attention with bias log m(i, t), m = number of pairs under which i and t interact.

Work is split into *pieces*: (K/V chunk of one source rank) x (pair j) x (offset class o). A piece gathers its selected
query rows and key rows into dense sub-blocks, so a rate r costs 1/r^2 of the dense FLOPs. Everything here is integer
math on shapes and the pattern alone, so every rank derives the same communication schedule.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Sequence

import torch

from .layouts import get_layout


@dataclass(frozen=True)
class Pattern:
    """A validated attention pattern. ``segment_lengths`` entries of ``None`` mean the whole sequence."""

    segment_lengths: tuple[int | None, ...] = (None,)
    dilation_rates: tuple[int, ...] = (1,)
    causal: bool = False
    window: int | None = None

    @classmethod
    def make(
        cls,
        segment_lengths: Sequence[int | None] | int | None = None,
        dilation_rates: Sequence[int] | int | None = None,
        causal: bool = False,
        window: int | None = None,
    ) -> "Pattern":
        """Validate user arguments; raise ValueError naming the argument and the fix."""
        if isinstance(segment_lengths, int) or segment_lengths is None:
            segment_lengths = [segment_lengths]
        if dilation_rates is None:
            dilation_rates = [1] * len(segment_lengths)
        elif isinstance(dilation_rates, int):
            dilation_rates = [dilation_rates]
        segs, rates = list(segment_lengths), list(dilation_rates)
        if len(segs) != len(rates):
            raise ValueError(
                f"segment_lengths ({len(segs)} entries) and dilation_rates ({len(rates)} entries) must have the same "
                "length: give one dilation rate per segment length"
            )
        if not segs:
            raise ValueError("segment_lengths is empty: pass None for full attention or at least one length")
        for w in segs:
            if w is not None and (isinstance(w, bool) or not isinstance(w, int) or w <= 0):
                raise ValueError(f"segment_lengths must hold positive ints or None, got {w!r}")
        for r in rates:
            if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
                raise ValueError(f"dilation_rates must hold positive ints, got {r!r}")
        if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window <= 0):
            raise ValueError(f"window must be a positive int or None, got {window!r}")
        return cls(tuple(segs), tuple(rates), bool(causal), window)

    @property
    def has_segments(self) -> bool:
        """True unless this is plain full attention (one pair: the whole sequence, rate 1)."""
        return any(w is not None for w in self.segment_lengths) or any(r != 1 for r in self.dilation_rates)

    def pairs(self, seq_len: int) -> list[tuple[int, int]]:
        """(w, r) per pair with ``None`` resolved to the sequence length."""
        return [(seq_len if w is None else w, r) for w, r in zip(self.segment_lengths, self.dilation_rates)]

    def key(self) -> tuple:
        return (self.segment_lengths, self.dilation_rates, self.causal, self.window)


@dataclass(frozen=True)
class Piece:
    """One dense sub-block of work between the local queries and one source rank's keys.

    ``head_start``/``head_step``: the query heads of the offset class (a slice over Hq). ``q_idx``/``k_idx``: local
    rows of the query shard / the source's key shard: an index tensor ordered segment by segment, a contiguous
    ``slice`` (a document's run: read as a view), or ``None`` = all rows. ``batch``: the one batch row the piece
    computes (documents differ per row), ``None`` = all rows.
    ``groups``: the rows form G equal segments, which the kernel runs as G batched blocks, so a segment never pays
    for its neighbours' keys. ``q_pos``/``k_pos``: global positions, shape (G, rows per segment). ``seg``: segment
    length to compare inside a block (``None`` when each block is one segment). ``causal_diag``: every block is its
    own causal diagonal (same positions on both sides), so the kernel's causal flag is exact.
    """

    head_start: int
    head_step: int
    q_idx: torch.Tensor | None
    k_idx: torch.Tensor | None
    q_pos: torch.Tensor
    k_pos: torch.Tensor
    seg: int | None
    causal: bool
    window: int | None
    causal_diag: bool
    groups: int = 1
    batch: int | None = None


def _piece(start, step, q_idx, k_idx, q_pos, k_pos, seg, causal, window, batch: int | None = None) -> Piece:
    """A piece with the constraints that cannot bite on it dropped, so the kernel can skip the mask. Positions are
    host tensors here (plans are built on the host and moved to the device once)."""
    causal = causal and bool((k_pos.amax(1) > q_pos.amin(1)).any())
    if window is not None and not bool((q_pos.amax(1) - k_pos.amin(1) >= window).any()):
        window = None
    diag = causal and window is None and seg is None and torch.equal(q_pos, k_pos)
    return Piece(start, step, q_idx, k_idx, q_pos, k_pos, seg, causal, window, diag, q_pos.shape[0], batch)


def restrict_keys(piece: Piece, lo: int, hi: int) -> list[Piece]:
    """The parts of ``piece`` whose key rows lie in [lo, hi) of the source shard, indexed from ``lo``.

    Segments wholly inside stay batched; a segment cut by the bound becomes a piece of its own.
    """
    if isinstance(piece.k_idx, slice):  # one contiguous run of keys (a document's)
        a, e = max(piece.k_idx.start, lo), min(piece.k_idx.stop, hi)
        if a >= e:
            return []
        kp = piece.k_pos[:, a - piece.k_idx.start : e - piece.k_idx.start]
        return [_piece(piece.head_start, piece.head_step, piece.q_idx, slice(a - lo, e - lo), piece.q_pos, kp,
                       piece.seg, piece.causal, piece.window, piece.batch)]
    G = piece.groups
    if piece.k_idx is None and G == 1:  # every key row: the part's rows are the range itself (sliced by the caller)
        return [_piece(piece.head_start, piece.head_step, piece.q_idx, None, piece.q_pos, piece.k_pos[:, lo:hi],
                       piece.seg, piece.causal, piece.window, piece.batch)]
    n_k = piece.k_pos.numel()
    k_idx = piece.k_idx if piece.k_idx is not None else torch.arange(n_k, device=piece.k_pos.device)
    k_idx = k_idx.view(G, -1)
    q_all = piece.q_idx if piece.q_idx is not None else torch.arange(piece.q_pos.numel(), device=piece.q_pos.device)
    q_idx = q_all.view(G, -1)
    inside = (k_idx >= lo) & (k_idx < hi)
    whole, cut = inside.all(1), inside.any(1) & ~inside.all(1)
    out = []
    if bool(whole.all()) and piece.k_idx is None:
        return [piece]
    args = (piece.head_start, piece.head_step)
    if bool(whole.any()):
        every_row = piece.q_idx is None and bool(whole.all())
        out.append(_piece(*args, None if every_row else q_idx[whole].reshape(-1),
                          (k_idx[whole] - lo).reshape(-1), piece.q_pos[whole], piece.k_pos[whole], piece.seg,
                          piece.causal, piece.window))
    for g in cut.nonzero().flatten().tolist():
        keep = inside[g]
        q_rows = None if piece.q_idx is None and G == 1 else q_idx[g]
        out.append(_piece(*args, q_rows, k_idx[g][keep] - lo, piece.q_pos[g : g + 1],
                          piece.k_pos[g : g + 1, keep], piece.seg, piece.causal, piece.window))
    return out


@dataclass(frozen=True)
class KeyPart:
    """A step's pieces restricted to the source's key rows [lo, hi), indexed from ``lo``. The backward sends each
    part's dK/dV home as soon as it is done, so one part travels while the next is computed and the partial buffers
    stay a chunk in size for any P."""

    lo: int
    hi: int
    pieces: tuple[Piece, ...]


@dataclass(frozen=True)
class Step:
    """Step ``index`` of one rank's ring. At step s >= 1 rank p receives K/V rows of rank p - s and sends its own to
    rank p + s, each only where the receiver has a non-empty piece, and only the rows its pieces read: the same
    predicate is evaluated on both ends, so sends and receives always pair up in count and size. Step 0 is the local
    chunk (``source`` = the rank itself, no traffic, rows in shard coordinates).

    ``source``: the rank whose keys this rank computes against, None if it needs nothing from it; ``recv_rows``: the
    [lo, hi) rows of the source's shard it receives (``pieces`` and ``key_parts`` index the received rows). ``dest``:
    the rank this rank sends its own K/V to, None if that rank needs nothing; ``send_rows``: the rows of this rank's
    shard it sends; ``home_parts``: the rows of this rank's shard whose dK/dV partials come back from ``dest``, one
    exchange each (the halves of ``send_rows``, as the receiver cuts its ``key_parts``).
    """

    index: int
    source: int | None
    dest: int | None
    pieces: tuple[Piece, ...]
    key_parts: tuple[KeyPart, ...]
    recv_rows: tuple[int, int] = (0, 0)
    send_rows: tuple[int, int] = (0, 0)
    home_parts: tuple[tuple[int, int], ...] = ()


@dataclass(frozen=True)
class Plan:
    """Everything one rank needs for one (pattern, shape, group, layout): which peers at which step, and the pieces."""

    world_size: int
    rank: int
    steps: tuple[Step, ...]

    @property
    def comm_steps(self) -> tuple[Step, ...]:
        """The steps >= 1 with traffic in either direction, in ring order (every rank walks the same indices)."""
        return tuple(st for st in self.steps[1:] if st.source is not None or st.dest is not None)


def key_halves(n: int) -> list[tuple[int, int]]:
    """How received keys are cut for the backward (both ends cut the same way): two halves, one part if n < 2."""
    return [(0, n // 2), (n // 2, n)] if n > 1 else [(0, n)] if n else []


def _key_rows(pieces: Sequence[Piece], local_len: int) -> tuple[int, int]:
    """The [lo, hi) rows of the source's shard that ``pieces`` read ((0, 0) for none). Host tensors."""
    lo, hi = local_len, 0
    for pc in pieces:
        if pc.k_idx is None:
            return 0, local_len
        a, e = (pc.k_idx.start, pc.k_idx.stop) if isinstance(pc.k_idx, slice) else (int(pc.k_idx.min()),
                                                                                    int(pc.k_idx.max()) + 1)
        lo, hi = min(lo, a), max(hi, e)
    return (lo, hi) if hi > lo else (0, 0)


def _shift(pc: Piece, lo: int) -> Piece:
    """``pc`` with its keys indexed from row ``lo`` of the source's shard (the first received row)."""
    if lo == 0:
        return pc
    k_idx = slice(pc.k_idx.start - lo, pc.k_idx.stop - lo) if isinstance(pc.k_idx, slice) else pc.k_idx - lo
    return dataclasses.replace(pc, k_idx=k_idx)


def make_step(index: int, source: int | None, dest: int | None, mine: Sequence[Piece], theirs: Sequence[Piece],
              local_len: int, device: str) -> Step:
    """A step from this rank's pieces against the source (``mine``, source-shard rows) and the destination's pieces
    against this rank (``theirs``): what travels is the rows they read, on both ends."""
    if index == 0:
        recv = send = (0, local_len)
    else:
        recv, send = _key_rows(mine, local_len), _key_rows(theirs, local_len)
    pieces = tuple(_shift(pc, recv[0]) for pc in mine)
    parts = tuple(KeyPart(lo, hi, tuple(p for pc in pieces for p in restrict_keys(pc, lo, hi)))
                  for lo, hi in key_halves(recv[1] - recv[0])) if source is not None else ()
    home = tuple((send[0] + a, send[0] + b) for a, b in key_halves(send[1] - send[0])) if dest is not None else ()
    return to_device(Step(index, source, dest, pieces, parts, recv, send, home), device)


def _selected(pos: torch.Tensor, w: int, r: int, o: int) -> torch.Tensor:
    return (pos % w) % r == o


def _rows_with_partner(
    pos: torch.Tensor, other: list[tuple[int, int]], w: int, r: int, o: int, causal: bool, window: int | None,
    is_query: bool,
) -> torch.Tensor:
    """Mask of ``pos`` rows that have at least one selected partner among the ``other`` ranges (exact).

    For a query row i the partners are keys t in the same segment, t <= i if causal, i - t < window; for a key row
    it is the mirror image. Works on ranges, so it costs O(len(pos)) per range.
    """
    seg_start = (pos // w) * w
    seg_end = seg_start + w
    found = torch.zeros_like(pos, dtype=torch.bool)
    for a, b in other:
        lo = torch.clamp(seg_start, min=a)
        hi = torch.clamp(seg_end, max=b)
        if is_query:
            if causal:
                hi = torch.minimum(hi, pos + 1)
            if window is not None:
                lo = torch.maximum(lo, pos - window + 1)
        else:
            if causal:
                lo = torch.maximum(lo, pos)
            if window is not None:
                hi = torch.minimum(hi, pos + window)
        # first position x >= lo in the segment with (x - seg_start) % r == o
        first = lo + (o - (lo - seg_start)) % r
        found |= first < hi
    return found


# More distinct segment shapes than this in one piece: run it as one masked block instead of many small ones.
_MAX_SEGMENT_SHAPES = 8


def _segment_pieces(start, o, r, w, qsel, ksel, pos_q, pos_k, pattern: Pattern) -> list[Piece]:
    """Pieces for the selected rows: segments with the same (query rows, key rows) counts are batched together."""
    q_rows, k_rows = qsel.nonzero().flatten(), ksel.nonzero().flatten()
    qp, kp = pos_q[q_rows], pos_k[k_rows]
    q_seg, q_cnt = torch.unique_consecutive(qp // w, return_counts=True)
    k_seg, k_cnt = torch.unique_consecutive(kp // w, return_counts=True)
    args = (pattern.causal, pattern.window)
    full_q, full_k = bool(qsel.all()), bool(ksel.all())
    shapes = sorted(set(zip(q_cnt.tolist(), k_cnt.tolist()))) if torch.equal(q_seg, k_seg) else []
    if len(q_seg) == 1 and shapes or not shapes or len(shapes) > _MAX_SEGMENT_SHAPES:
        seg = None if len(q_seg) == 1 and shapes else w
        return [_piece(start, r, None if full_q else q_rows, None if full_k else k_rows, qp[None], kp[None], seg,
                       *args)]
    out = []
    q_of = torch.repeat_interleave(torch.arange(len(q_seg)), q_cnt)  # segment index of each selected row
    k_of = torch.repeat_interleave(torch.arange(len(k_seg)), k_cnt)
    for nq, nk in shapes:
        chosen = ((q_cnt == nq) & (k_cnt == nk)).nonzero().flatten()
        qm, km = torch.isin(q_of, chosen), torch.isin(k_of, chosen)
        G = len(chosen)
        # all rows of the shard, in order: no gather, and the piece's result can stand as the accumulator
        q_idx = None if full_q and bool(qm.all()) else q_rows[qm]
        k_idx = None if full_k and bool(km.all()) else k_rows[km]
        out.append(_piece(start, r, q_idx, k_idx, qp[qm].view(G, nq), kp[km].view(G, nk), None, *args))
    return out


@functools.lru_cache(maxsize=64)
def _plan_cached(
    pattern_key: tuple, local_len: int, world: int, rank: int, layout: str, num_heads: int, device: str, q_len: int,
    head_base: int,
) -> Plan:
    pattern = Pattern(*pattern_key)
    lay = get_layout(layout)
    seq_len = local_len * world
    k_ranges = [lay.ranges(local_len, world, p) for p in range(world)]
    # queries are the last q_len positions of the keys (decoding with a cache, world 1): aligned bottom-right
    q_ranges = k_ranges if q_len == local_len else [[(local_len - q_len, local_len)]]
    k_pos = [torch.cat([torch.arange(a, b) for a, b in rs]) for rs in k_ranges]
    q_pos = [torch.cat([torch.arange(a, b) for a, b in rs]) for rs in q_ranges]
    pairs = pattern.pairs(seq_len)

    def pieces(dst: int, src: int) -> tuple[Piece, ...]:
        out = []
        for w, r in pairs:
            for o in range(r):  # offset class o holds the GLOBAL heads h with h % r == o
                start = (o - head_base) % r  # its first local head (local head i is global head head_base + i)
                if start >= num_heads:
                    continue
                qsel = _selected(q_pos[dst], w, r, o) & _rows_with_partner(
                    q_pos[dst], k_ranges[src], w, r, o, pattern.causal, pattern.window, True
                )
                if not bool(qsel.any()):
                    continue
                ksel = _selected(k_pos[src], w, r, o) & _rows_with_partner(
                    k_pos[src], q_ranges[dst], w, r, o, pattern.causal, pattern.window, False
                )
                out += _segment_pieces(start, o, r, w, qsel, ksel, q_pos[dst], k_pos[src], pattern)
        return tuple(out)

    steps = [make_step(0, rank, None, pieces(rank, rank), (), local_len, device)]
    for s in range(1, world):
        src, dst = (rank - s) % world, (rank + s) % world
        mine, theirs = pieces(rank, src), pieces(dst, rank)
        steps.append(make_step(s, src if mine else None, dst if theirs else None, mine, theirs, local_len, device))
    return Plan(world, rank, tuple(steps))


def to_device(st: Step, device: str) -> Step:
    """``st`` with its pieces' index and position tensors on ``device`` (plans are built on the host)."""
    def move(pc: Piece) -> Piece:
        return dataclasses.replace(pc, **{f: getattr(pc, f).to(device) for f in ("q_idx", "k_idx", "q_pos", "k_pos")
                                          if isinstance(getattr(pc, f), torch.Tensor)})

    parts = tuple(dataclasses.replace(kp, pieces=tuple(map(move, kp.pieces))) for kp in st.key_parts)
    return dataclasses.replace(st, pieces=tuple(map(move, st.pieces)), key_parts=parts)


def make_plan(
    pattern: Pattern, local_len: int, world_size: int, rank: int, layout: str, num_heads: int,
    device: torch.device | str = "cpu", q_len: int | None = None, head_base: int = 0,
) -> Plan:
    """The (cached) plan of ``rank``; identical inputs give identical plans on every rank.

    ``local_len`` is the key shard length; ``q_len`` (default ``local_len``) may be shorter on a single rank only:
    the queries are then the last ``q_len`` positions (decoding with a KV cache), so a step costs O(q_len x keys).
    ``head_base``: the global index of the first of the ``num_heads`` local query heads (under Ulysses a rank holds
    a slice of the heads; dilation offsets count global heads).
    """
    q_len = local_len if q_len is None else q_len
    if q_len != local_len and (world_size != 1 or not 0 < q_len < local_len):
        raise ValueError(f"make_plan: {q_len} queries for {local_len} keys: fewer queries than keys only on one "
                         "rank, as the keys' last positions")
    return _plan_cached(pattern.key(), local_len, world_size, rank, get_layout(layout).name, num_heads, str(device),
                        q_len, head_base)
