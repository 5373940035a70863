"""The attention pattern: LongNet segments and dilation, causal, sliding window, and the pieces of work it implies.

Semantics. For pair j = (w_j, r_j) and query head h the offset is o = h % r_j; global position t is selected iff
(t % w_j) % r_j == o. Query i and key t interact under pair j iff i // w_j == t // w_j and both are selected; with
``causal`` only t <= i; with ``window`` only i - t < window; a padded key never interacts. Pairs are mixed by their
softmax denominators, i.e. dense attention with bias log m(i, t), m = number of pairs under which i and t interact.

As a source of pieces (``PatternPieces``, see schedule.py) a pattern splits the work against one source rank's K/V
chunk by (pair j) x (offset class o): a piece gathers its selected query rows and key rows into dense sub-blocks, so
a rate r costs 1/r^2 of the dense FLOPs. Everything here is integer math on shapes and the pattern alone.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Sequence

import torch

from .layouts import Layout
from .schedule import Piece, make_piece


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

    def pieces(self, layout: Layout, local_len: int, world_size: int, num_heads: int, *, q_len: int | None = None,
               head_base: int = 0) -> "PatternPieces":
        """This pattern as a source of pieces (schedule.py) for a ring of ``world_size`` ranks cut by ``layout``."""
        return PatternPieces(self, layout, local_len, world_size, num_heads,
                             local_len if q_len is None else q_len, head_base)


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
        return [make_piece(start, r, None if full_q else q_rows, None if full_k else k_rows, qp[None], kp[None], seg,
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
        out.append(make_piece(start, r, q_idx, k_idx, qp[qm].view(G, nq), kp[km].view(G, nk), None, *args))
    return out


def class_pieces(pattern: Pattern, q_pos: torch.Tensor, k_pos: torch.Tensor, q_ranges, k_ranges, num_heads: int,
                 head_base: int, seq_len: int) -> list[Piece]:
    """The pieces of queries at ``q_pos`` against keys at ``k_pos`` (positions, host tensors; the other side's
    positions as [a, b) ranges): per pair and offset class, the selected rows with a partner on the other side.
    Rows are indices into ``q_pos`` / ``k_pos`` (None = all). Positions count from the origin of the segments: the
    sequence's start, or a packed document's (documents.py)."""
    out = []
    for w, r in pattern.pairs(seq_len):
        for o in range(r):  # offset class o holds the GLOBAL heads h with h % r == o
            start = (o - head_base) % r  # its first local head (local head i is global head head_base + i)
            if start >= num_heads:
                continue
            qsel = _selected(q_pos, w, r, o) & _rows_with_partner(q_pos, k_ranges, w, r, o, pattern.causal,
                                                                  pattern.window, True)
            if not bool(qsel.any()):
                continue
            ksel = _selected(k_pos, w, r, o) & _rows_with_partner(k_pos, q_ranges, w, r, o, pattern.causal,
                                                                  pattern.window, False)
            out += _segment_pieces(start, o, r, w, qsel, ksel, q_pos, k_pos, pattern)
    return out


@dataclass(frozen=True)
class PatternPieces:
    """The pieces of ``pattern`` on a ring of ``world_size`` ranks cut by ``layout``, shards of ``local_len`` keys and
    ``num_heads`` local query heads. ``q_len`` < ``local_len`` only on one rank: the queries are then the last
    ``q_len`` positions (decoding with a KV cache), so a step costs O(q_len x keys). ``head_base``: the global index
    of the first local query head (under Ulysses a rank holds a slice of the heads; dilation offsets count global
    heads). Hashable by value: ``schedule.make_schedule`` caches its schedules."""

    pattern: Pattern
    layout: Layout
    local_len: int
    world_size: int
    num_heads: int
    q_len: int
    head_base: int = 0

    def __post_init__(self):
        if self.q_len != self.local_len and (self.world_size != 1 or not 0 < self.q_len < self.local_len):
            raise ValueError(f"PatternPieces: {self.q_len} queries for {self.local_len} keys: fewer queries than "
                             "keys only on one rank, as the keys' last positions")

    @functools.cached_property
    def _ranges(self) -> tuple[list, list, list, list]:
        """Key and query ranges and positions of every rank (host tensors)."""
        n, world = self.local_len, self.world_size
        k_ranges = [self.layout.ranges(n, world, p) for p in range(world)]
        # queries are the last q_len positions of the keys (decoding with a cache, world 1): aligned bottom-right
        q_ranges = k_ranges if self.q_len == n else [[(n - self.q_len, n)]]
        k_pos = [torch.cat([torch.arange(a, b) for a, b in rs]) for rs in k_ranges]
        q_pos = [torch.cat([torch.arange(a, b) for a, b in rs]) for rs in q_ranges]
        return k_ranges, q_ranges, k_pos, q_pos

    def pieces(self, dst: int, src: int) -> tuple[Piece, ...]:
        """Rank ``dst``'s pieces against rank ``src``'s keys: per pair and offset class, the selected rows with a
        partner on the other side."""
        k_ranges, q_ranges, k_pos, q_pos = self._ranges
        return tuple(class_pieces(self.pattern, q_pos[dst], k_pos[src], q_ranges[dst], k_ranges[src], self.num_heads,
                                  self.head_base, self.local_len * self.world_size))
