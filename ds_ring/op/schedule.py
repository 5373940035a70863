"""The schedule of one rank's ring: the pieces of work, the steps that carry them, and the one builder.

Work is split into *pieces*: dense sub-blocks between the local queries and one source rank's keys (which rows,
which query heads, which positions, which constraints still bite). A *source of pieces* says which pieces rank
``dst``'s queries have against rank ``src``'s keys; there are two, the attention pattern (``pattern.PatternPieces``:
LongNet segments and dilation, causal, window) and packed documents (``documents.DocumentPieces``). ``build_schedule``
turns a source into the ``Schedule`` of one rank, the same way for both: step s computes against rank p - s, and
sends and receives only the key rows the pieces on each end read. Everything here is integer math on shapes and the
source, so every rank derives the same communication schedule (the engine, engine.py, runs it).
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field
from typing import Protocol, Sequence

import torch

from .kernels import causal_cut_rows


@dataclass(frozen=True)
class Piece:
    """One dense sub-block of work between the local queries and one source rank's keys.

    ``head_start``/``head_step``: the query heads of the offset class (a slice over Hq). ``q_idx``/``k_idx``: local
    rows of the query shard / the source's key shard: an index tensor ordered segment by segment, a ``slice`` when
    the rows are evenly spaced (a document's run, or a dilation class: every r-th row; read as a strided view, no
    gather; ``stop`` is the last row + 1), or ``None`` = all rows. ``batch``: the one batch row the piece
    computes (documents differ per row), ``None`` = all rows.
    ``groups``: the rows form G equal segments, which the kernel runs as G batched blocks, so a segment never pays
    for its neighbours' keys. ``q_pos``/``k_pos``: global positions, shape (G, rows per segment). ``seg``: segment
    length to compare inside a block (``None`` when each block is one segment). ``causal_diag``: every block is its
    own causal diagonal (same positions on both sides), so the kernel's causal flag is exact.
    ``q_sub``/``k_sub`` = (a, b, m): the rows of ``q_idx``/``k_idx`` form G blocks of m rows and the piece reads rows
    [a, b) of each (a part of a cut causal block, cut_causal_diagonals), read as strided views; positions hold those
    rows only. ``None``: all rows.
    ``q_doc``/``k_doc``: document ids (G, rows) of the query and key rows when the piece is a packed chunk's whole
    diagonal block (documents.DocumentPieces under ``kernels.fused_documents``): only pairs with equal ids interact,
    a term of the piece's mask; ``None``: every pair shares a document (each other piece of packed rows).
    ``kernel_cache``: what the kernels derive from the piece once (its AllowedPairs, the Flex BlockMask): kept with
    the schedule, never rebuilt per call; a replaced piece starts empty.
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
    q_sub: tuple[int, int, int] | None = None
    k_sub: tuple[int, int, int] | None = None
    q_doc: torch.Tensor | None = None
    k_doc: torch.Tensor | None = None
    kernel_cache: dict = field(default_factory=dict, init=False, compare=False, repr=False)


def make_piece(start, step, q_idx, k_idx, q_pos, k_pos, seg, causal, window, batch: int | None = None,
               docs: tuple[torch.Tensor, torch.Tensor] | None = None) -> Piece:
    """A piece with the constraints that cannot bite on it dropped, so the kernel can skip the mask. Positions are
    host tensors here (schedules are built on the host and moved to the device once). ``docs``: (q_doc, k_doc)
    document ids shaped like the positions, or None."""
    q_idx, k_idx = (_compact(i) if isinstance(i, torch.Tensor) else i for i in (q_idx, k_idx))
    causal = causal and bool((k_pos.amax(1) > q_pos.amin(1)).any())
    if window is not None and not bool((q_pos.amax(1) - k_pos.amin(1) >= window).any()):
        window = None
    if docs is not None and bool((docs[0] == docs[0][:, :1]).all() & (docs[1] == docs[0][:, :1]).all()):
        docs = None  # one document on both sides: every pair shares it
    q_doc, k_doc = docs if docs is not None else (None, None)
    # with a document term the kernel's causal flag alone is not exact: such a piece is never a causal diagonal
    # (so the CPU path's causal cut never cuts it, and the kernels read its mask)
    diag = causal and window is None and seg is None and docs is None and torch.equal(q_pos, k_pos)
    return Piece(start, step, q_idx, k_idx, q_pos, k_pos, seg, causal, window, diag, q_pos.shape[0], batch,
                 q_doc=q_doc, k_doc=k_doc)


def _row_index(idx: torch.Tensor | slice | None, n: int) -> torch.Tensor:
    """``idx`` (None = all ``n`` rows, a slice, an index tensor) as an index tensor."""
    if idx is None:
        return torch.arange(n)
    return torch.arange(idx.start, idx.stop, idx.step or 1) if isinstance(idx, slice) else idx


def _compact(rows: torch.Tensor) -> torch.Tensor | slice:
    """An index tensor as a slice when its rows are evenly spaced and increasing (read as a strided view, merged in
    place: no gather, no scatter), else as it is."""
    n = rows.numel()
    if n == 0:
        return rows
    a = int(rows[0])
    step = int(rows[1]) - a if n > 1 else 1
    if step < 1 or not torch.equal(rows, torch.arange(a, a + step * (n - 1) + 1, step)):
        return rows
    return slice(a, a + step * (n - 1) + 1, None if step == 1 else step)


def offset_rows(idx: torch.Tensor | slice | None, n: int, offset: int) -> torch.Tensor | slice:
    """Rows ``idx`` of a run of ``n`` rows (None = all of them), counted from ``offset`` instead of the run's start."""
    if idx is None:
        return slice(offset, offset + n)
    if isinstance(idx, slice):
        return slice(idx.start + offset, idx.stop + offset, idx.step)
    return idx + offset


def _cut_diagonal(pc: Piece) -> list[Piece]:
    """A causal diagonal piece (G blocks of m rows) as its causal halves (one piece of 2G blocks when m is even)
    and the dense off-diagonal quarter (second half of the rows x first half of the keys, one piece of G blocks,
    no mask: every key there precedes every query)."""
    G, m = pc.q_pos.shape
    h = m // 2
    args = (pc.head_start, pc.head_step)

    def part(qa, qb, ka, kb):
        """Rows [qa, qb) x keys [ka, kb) of every block: strided views of the piece's rows where they are views
        (no gather), else index tensors."""
        qp, kp = pc.q_pos[:, qa:qb], pc.k_pos[:, ka:kb]
        if isinstance(pc.q_idx, torch.Tensor) or isinstance(pc.k_idx, torch.Tensor):
            q_rows, k_rows = _row_index(pc.q_idx, G * m).view(G, m), _row_index(pc.k_idx, G * m).view(G, m)
            return make_piece(*args, _compact(q_rows[:, qa:qb].reshape(-1)), _compact(k_rows[:, ka:kb].reshape(-1)),
                              qp, kp, None, True, None, pc.batch)
        return dataclasses.replace(make_piece(*args, pc.q_idx, pc.k_idx, qp, kp, None, True, None, pc.batch),
                                   q_sub=(qa, qb, m), k_sub=(ka, kb, m))

    if 2 * h == m:  # rows stay in order: the halves keep the piece's rows as they are (None stays None)
        halves = [make_piece(*args, pc.q_idx, pc.k_idx, pc.q_pos.reshape(2 * G, h), pc.k_pos.reshape(2 * G, h), None,
                             True, None, pc.batch)]
    else:
        halves = [part(0, h, 0, h), part(h, m, h, m)]
    return halves + [part(h, m, 0, h)]


def cut_causal_diagonals(pieces: Sequence[Piece], rows: tuple[int, int, int] | None) -> tuple[Piece, ...]:
    """``pieces`` with every causal diagonal piece of at most ``rows[1]`` rows per block (``rows[2]`` if its rows are
    gathered by index) cut into its causal halves and the dense off-diagonal quarter, recursively while a half keeps
    at least ``rows[0]`` rows (None: no cut).

    Why: a kernel that skips only whole key tiles above the diagonal (ATen's CPU flash kernel: 512 columns) computes
    a causal block of <= 512 rows as the full square; cut, each level computes only its quarter unmasked, so the
    block costs about 1/2 + min_rows / (2 m) of the square. The parts are ordinary pieces (equal blocks batched in
    one call) merged by log-sum-exp like any other, and each gets its exact gradients from the final out and lse.
    The diagonal parts come first, so a piece over every row still serves as the accumulator. A piece with a
    document term (a packed chunk's whole diagonal block, for the Flex path) is never a causal diagonal
    (``make_piece``), so it is never cut: its mask, documents included, is what the kernel reads."""
    if rows is None:
        return tuple(pieces)
    lo, hi, hi_gathered = rows
    out = []
    for pc in pieces:
        diag, quarters, todo = [], [], [pc]
        gathered = isinstance(pc.q_idx, torch.Tensor) or isinstance(pc.k_idx, torch.Tensor)
        top = hi_gathered if gathered else hi
        while todo:
            p = todo.pop(0)
            m = p.q_pos.shape[1]
            if not p.causal_diag or p.q_sub is not None or m > top or m < 2 * lo:
                diag.append(p)
                continue
            *halves, quarter = _cut_diagonal(p)
            todo += halves
            quarters.append(quarter)
        out += diag + quarters
    return tuple(out)


def _indexed(pc: Piece) -> Piece:
    """``pc`` with its block rows (``q_sub``/``k_sub``) as index tensors."""
    def rows(idx, sub):
        if sub is None:
            return idx
        a, b, m = sub
        return _row_index(idx, pc.groups * m).view(pc.groups, m)[:, a:b].reshape(-1)

    return dataclasses.replace(pc, q_idx=rows(pc.q_idx, pc.q_sub), k_idx=rows(pc.k_idx, pc.k_sub), q_sub=None,
                               k_sub=None)


def restrict_keys(piece: Piece, lo: int, hi: int) -> list[Piece]:
    """The parts of ``piece`` whose key rows lie in [lo, hi) of the source shard, indexed from ``lo``.

    Segments wholly inside stay batched; a segment cut by the bound becomes a piece of its own. Document ids (a
    packed chunk's diagonal piece) follow their rows.
    """
    if piece.q_sub is not None or piece.k_sub is not None:
        piece = _indexed(piece)
    q_doc, k_doc = piece.q_doc, piece.k_doc

    def docs(q_rows, k_rows):  # the document ids of the part's (query, key) rows of the piece's blocks
        return None if q_doc is None else (q_doc[q_rows], k_doc[k_rows])

    every = slice(None)
    if isinstance(piece.k_idx, slice) and piece.k_idx.step is None and piece.groups == 1:  # one contiguous run
        a, e = max(piece.k_idx.start, lo), min(piece.k_idx.stop, hi)
        if a >= e:
            return []
        cols = (every, slice(a - piece.k_idx.start, e - piece.k_idx.start))
        return [make_piece(piece.head_start, piece.head_step, piece.q_idx, slice(a - lo, e - lo), piece.q_pos,
                           piece.k_pos[cols], piece.seg, piece.causal, piece.window, piece.batch,
                           docs(every, cols))]
    G = piece.groups
    if piece.k_idx is None and G == 1:  # every key row: the part's rows are the range itself (sliced by the caller)
        cols = (every, slice(lo, hi))
        return [make_piece(piece.head_start, piece.head_step, piece.q_idx, None, piece.q_pos, piece.k_pos[cols],
                           piece.seg, piece.causal, piece.window, piece.batch, docs(every, cols))]
    k_idx = _row_index(piece.k_idx, piece.k_pos.numel()).view(G, -1)
    q_idx = _row_index(piece.q_idx, piece.q_pos.numel()).view(G, -1)
    inside = (k_idx >= lo) & (k_idx < hi)
    whole, cut = inside.all(1), inside.any(1) & ~inside.all(1)
    out = []
    if bool(whole.all()) and piece.k_idx is None:
        return [piece]
    args = (piece.head_start, piece.head_step)
    if bool(whole.any()):
        every_row = piece.q_idx is None and bool(whole.all())
        out.append(make_piece(*args, None if every_row else q_idx[whole].reshape(-1),
                              (k_idx[whole] - lo).reshape(-1), piece.q_pos[whole], piece.k_pos[whole], piece.seg,
                              piece.causal, piece.window, piece.batch, docs(whole, whole)))
    for g in cut.nonzero().flatten().tolist():
        keep = inside[g]
        q_rows = None if piece.q_idx is None and G == 1 else q_idx[g]
        out.append(make_piece(*args, q_rows, k_idx[g][keep] - lo, piece.q_pos[g : g + 1],
                              piece.k_pos[g : g + 1, keep], piece.seg, piece.causal, piece.window, piece.batch,
                              docs(slice(g, g + 1), (slice(g, g + 1), keep))))
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
class Schedule:
    """Everything one rank needs for one call: which peers at which step, and the pieces of work against each."""

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
    k_idx = offset_rows(pc.k_idx, 0, -lo)
    return dataclasses.replace(pc, k_idx=k_idx)


def _make_step(index: int, source: int | None, dest: int | None, ours: Sequence[Piece], theirs: Sequence[Piece],
               local_len: int, device: str) -> Step:
    """A step from this rank's pieces against the source (``ours``, source-shard rows) and the destination's pieces
    against this rank (``theirs``): what travels is the rows they read, on both ends."""
    if index == 0:
        recv = send = (0, local_len)
    else:
        recv, send = _key_rows(ours, local_len), _key_rows(theirs, local_len)
    pieces = tuple(_shift(pc, recv[0]) for pc in ours)
    parts = tuple(KeyPart(lo, hi, tuple(p for pc in pieces for p in restrict_keys(pc, lo, hi)))
                  for lo, hi in key_halves(recv[1] - recv[0])) if source is not None else ()
    home = tuple((send[0] + a, send[0] + b) for a, b in key_halves(send[1] - send[0])) if dest is not None else ()
    return _to_device(Step(index, source, dest, pieces, parts, recv, send, home), device)


def _to_device(st: Step, device: str) -> Step:
    """``st`` with its pieces' index and position tensors on ``device`` (schedules are built on the host)."""
    def move(pc: Piece) -> Piece:
        return dataclasses.replace(pc, **{f: getattr(pc, f).to(device)
                                          for f in ("q_idx", "k_idx", "q_pos", "k_pos", "q_doc", "k_doc")
                                          if isinstance(getattr(pc, f), torch.Tensor)})

    parts = tuple(dataclasses.replace(kp, pieces=tuple(map(move, kp.pieces))) for kp in st.key_parts)
    return dataclasses.replace(st, pieces=tuple(map(move, st.pieces)), key_parts=parts)


class PieceSource(Protocol):
    """Where pieces come from: the ring's size, the key shard length, and rank ``dst``'s pieces against rank
    ``src``'s keys (rows in the source's shard coordinates, host tensors). Equal inputs on every rank give equal
    pieces: that is what makes the schedules of all ranks pair up."""

    world_size: int
    local_len: int

    def pieces(self, dst: int, src: int) -> tuple[Piece, ...]: ...


def build_schedule(source: PieceSource, rank: int, device: torch.device | str = "cpu") -> Schedule:
    """The schedule of ``rank``: step 0 is its own chunk; at step s it computes against rank - s (if it has pieces
    there) and sends to rank + s (if that rank has pieces against it). Index and position tensors on ``device``.
    Causal diagonal pieces are cut where the block path of ``device`` gains from it (``kernels.causal_cut_rows``)."""
    return _build(source, rank, str(device), causal_cut_rows(device))


def _build(source: PieceSource, rank: int, device: str, cut: tuple[int, int, int] | None) -> Schedule:
    world, n = source.world_size, source.local_len
    pieces = lambda dst, src: cut_causal_diagonals(source.pieces(dst, src), cut)  # noqa: E731
    steps = [_make_step(0, rank, None, pieces(rank, rank), (), n, device)]
    for s in range(1, world):
        src, dst = (rank - s) % world, (rank + s) % world
        ours, theirs = pieces(rank, src), pieces(dst, rank)
        steps.append(_make_step(s, src if ours else None, dst if theirs else None, ours, theirs, n, device))
    return Schedule(world, rank, tuple(steps))


def make_schedule(source: PieceSource, rank: int, device: torch.device | str = "cpu") -> Schedule:
    """``build_schedule``, cached for hashable sources that describe a call by value (patterns: the same for every
    call of the same shapes). Documents change every batch; their schedules are cached per forward instead
    (``documents.Documents.schedule``)."""
    return _cached_build(source, rank, str(device), causal_cut_rows(device))


_cached_build = functools.lru_cache(maxsize=64)(_build)  # keyed by the cut too: a forced path gets its own
