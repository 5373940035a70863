"""Packed documents: which rows of which shards may attend to each other, decided before the ring starts.

A packed row holds several documents back to back; a query and a key interact only inside one document, so a
packed row gives every document exactly the result it would get alone. Document ids are GLOBAL and non-decreasing
along the row (``ds_ring.shard_batch`` numbers them from the whole row), so each document is one contiguous run
and two different chunks of the layout share at most ONE document: the last run of the earlier chunk continuing
as the first run of the later one. Four integers per (chunk, batch row) therefore describe every interaction
between chunks exactly:

    (first id, last id, length of the first run, length of the last run)

They travel in the ring's agreement (see agreement.py). From them every rank derives, identically, the pieces of
work (``DocumentPieces``, a source of pieces for schedule.py): per rank pair and batch row, the (query run x key
run) sub-blocks that share a document, as contiguous row ranges (views, no per-element mask; under a dilated
pattern, each block's pieces per pair and offset class, counted from the document's start); the schedule then
skips steps with no work (no compute) and sends no rank needs (no traffic). A chunk's own runs, needed only for its
diagonal blocks, are read on the owning rank.

A chunk's block with itself holds one piece per run on the CPU path (views: cheap there). Where the Flex path
serves it (``kernels.fused_documents``: CUDA, or Flex forced) and the pattern has no segments or dilation, it is
ONE piece over the whole chunk carrying the runs' local document ids as a term of its mask (AllowedPairs,
flex.mask_mod): one fused call instead of one per document. Blocks between two chunks are one piece either way.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field

import torch

from .layouts import Layout
from .pattern import Pattern, class_pieces
from .kernels import causal_cut_rows, fused_documents
from .schedule import Piece, Schedule, build_schedule, make_piece, offset_rows

Bound = tuple[int, int, int, int]  # first id, last id, first run length, last run length


def summaries(document_ids: torch.Tensor, chunks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per (chunk, batch row) bounds of a (B, L) shard, flattened (chunks * B * 4,) int64, and a 0-d flag that is
    True where ids decrease inside a chunk. Computed on the ids' device (read later with the agreement)."""
    B, L = document_ids.shape
    d = document_ids.long().view(B, chunks, L // chunks)
    first, last = d[:, :, 0], d[:, :, -1]
    # equal ids are contiguous when ids do not decrease, so these counts are the first and last runs' lengths
    first_len, last_len = (d == first[..., None]).sum(-1), (d == last[..., None]).sum(-1)
    bounds = torch.stack([first, last, first_len, last_len], -1).transpose(0, 1)  # (chunks, B, 4)
    return bounds.reshape(-1), (d[:, :, 1:] < d[:, :, :-1]).any()


def local_runs(document_ids: list[list[int]], chunks: int) -> tuple[tuple[tuple[tuple[int, int], ...], ...], ...]:
    """This rank's runs: [chunk][row] -> ((start, end), ...) in the chunk's own row numbering."""
    out = []
    for c in range(chunks):
        rows = []
        for ids in document_ids:
            n = len(ids) // chunks
            part = ids[c * n : (c + 1) * n]
            starts = [0] + [i for i in range(1, n) if part[i] != part[i - 1]]
            rows.append(tuple(zip(starts, starts[1:] + [n])))
        out.append(tuple(rows))
    return tuple(out)


@dataclass(frozen=True)
class Documents:
    """The document structure of one ring for one call (or model forward): ``bounds[r][c][b]`` for ring rank r,
    its chunk c (layout order) and batch row b; ``runs`` this rank's own runs (see ``local_runs``)."""

    bounds: tuple[tuple[tuple[Bound, ...], ...], ...]
    runs: tuple[tuple[tuple[tuple[int, int], ...], ...], ...]
    _schedules: dict = field(default_factory=dict, compare=False, repr=False)  # per (shape, pattern, device)

    @classmethod
    def from_rows(cls, rows: list[list[int]], runs, chunks: int, batch: int) -> "Documents":
        """From every rank's flattened ``summaries`` (as ints, by ring rank) and this rank's runs."""
        bounds = tuple(tuple(tuple(tuple(row[(c * batch + b) * 4 : (c * batch + b) * 4 + 4]) for b in range(batch))
                             for c in range(chunks)) for row in rows)
        return cls(bounds, runs)

    def order_errors(self, lay: Layout, local_len: int) -> list[str]:
        """Ids must not decrease from one chunk to the next in global order (each document one contiguous run)."""
        world = len(self.bounds)
        at = sorted((lay.ranges(local_len, world, r)[c][0], r, c) for r in range(world)
                    for c in range(lay.chunks_per_rank))
        errs = []
        for (_, r0, c0), (s1, r1, c1) in zip(at, at[1:]):
            for b, (prev, nxt) in enumerate(zip(self.bounds[r0][c0], self.bounds[r1][c1])):
                if prev[1] > nxt[0]:
                    errs.append(f"document_ids decrease at global position {s1} of batch row {b} ({prev[1]} -> "
                                f"{nxt[0]}): ids must be numbered over the whole row, non-decreasing, one run per "
                                f"document (ds_ring.shard_batch numbers them)")
        return errs[:3]

    def schedule(self, pattern: Pattern, lay: Layout, local_len: int, rank: int, batch: int, device,
                 num_heads: int = 1, head_base: int = 0, *, dtype: torch.dtype, head_dim: int) -> Schedule:
        """This rank's schedule under the documents and ``pattern`` (segments and dilation count from each
        document's start); built once per forward (every layer reuses it, the backward too, with the AllowedPairs
        and Flex BlockMasks its pieces keep: structure per forward, never per step of the ring loop).
        ``num_heads``/``head_base``: the local query heads and the global index of the first (dilation offsets count
        global heads). ``dtype``/``head_dim``: the query's, for ``kernels.fused_documents`` (whether a chunk's
        diagonal block is one piece with a document term)."""
        fused = fused_documents(device, dtype, head_dim)
        key = (pattern, lay, local_len, rank, batch, str(device), num_heads, head_base, fused,
               causal_cut_rows(device))  # the cut too: a forced path gets its own
        if key not in self._schedules:
            source = DocumentPieces(self, pattern, lay, local_len, batch, num_heads, head_base, fused)
            self._schedules[key] = build_schedule(source, rank, device)
        return self._schedules[key]


@dataclass(frozen=True, eq=False)
class DocumentPieces:
    """The pieces of packed rows (a source of pieces, see schedule.py): per batch row, the (query run x key run)
    blocks that share a document, under ``pattern`` with its segments and dilation counted from the document's own
    start, so every document gets exactly what it would get alone.

    ``fused`` (``kernels.fused_documents``: the Flex path serves the blocks): a chunk's diagonal block holding more
    than one run is ONE piece over the whole chunk with the runs' local document ids as a term of its mask (one
    Flex call; its BlockMask skips the empty tiles between documents), for patterns without segments or dilation
    (dense, causal, window). Dilated and segmented patterns keep one piece per document run even then: their pieces
    are each document's dilation classes gathered into dense sub-blocks counted from the document's own start,
    which a term over the chunk's rows cannot express."""

    docs: Documents
    pattern: Pattern
    layout: Layout
    local_len: int
    batch: int
    num_heads: int = 1
    head_base: int = 0
    fused: bool = False

    @property
    def world_size(self) -> int:
        return len(self.docs.bounds)

    @functools.cached_property
    def _run_starts(self) -> dict:
        """(rank, chunk, batch row) -> global start of the document of the chunk's (first run, last run), from the
        bounds alone (identical on every rank): a first run that continues the previous chunk's last document
        starts where that one started."""
        lay, world, n = self.layout, self.world_size, self.local_len // self.layout.chunks_per_rank
        at = sorted((lay.ranges(self.local_len, world, r)[c][0], r, c) for r in range(world)
                    for c in range(lay.chunks_per_rank))
        starts = {}
        for b in range(self.batch):
            prev, prev_last = None, 0
            for g0, r, c in at:
                first_id, last_id, _, last_len = self.docs.bounds[r][c][b]
                first = prev_last if prev is not None and prev == first_id else g0
                last = first if first_id == last_id else g0 + n - last_len
                starts[r, c, b] = (first, last)
                prev, prev_last = last_id, last
        return starts

    def _blocks(self, dst: int, src: int, b: int):
        """(query rows, key rows, document start, runs) of rank ``dst``'s queries x rank ``src``'s keys that share
        a document, batch row ``b``: local row ranges, the document's first global position and None; or, for a
        chunk's fused diagonal block, the whole chunk, None and its runs (the document term). A chunk with itself:
        its runs (or the chunk, fused); two chunks: at most one shared document."""
        docs, lay, C = self.docs, self.layout, self.layout.chunks_per_rank
        n = self.local_len // C
        q_starts = [a for a, _ in lay.ranges(self.local_len, self.world_size, dst)]
        k_starts = [a for a, _ in lay.ranges(self.local_len, self.world_size, src)]
        for qi in range(C):
            for ki in range(C):
                if dst == src and qi == ki:
                    runs = docs.runs[qi][b]
                    if self.fused and len(runs) > 1 and not self.pattern.has_segments:
                        yield (qi * n, qi * n + n), (ki * n, ki * n + n), None, runs
                        continue
                    for a, e in runs:
                        start = self._run_starts[dst, qi, b][0] if a == 0 else q_starts[qi] + a
                        yield (qi * n + a, qi * n + e), (ki * n + a, ki * n + e), start, None
                    continue
                q, k = docs.bounds[dst][qi][b], docs.bounds[src][ki][b]
                if k_starts[ki] < q_starts[qi]:  # keys before queries: the keys' last run, the queries' first
                    if k[1] == q[0]:
                        yield ((qi * n, qi * n + q[2]), ((ki + 1) * n - k[3], (ki + 1) * n),
                               self._run_starts[src, ki, b][1], None)
                elif q[1] == k[0]:  # keys after queries: the queries' last run, the keys' first
                    yield ((qi + 1) * n - q[3], (qi + 1) * n), (ki * n, ki * n + k[2]), \
                        self._run_starts[dst, qi, b][1], None

    def pieces(self, dst: int, src: int) -> tuple[Piece, ...]:
        pattern, world = self.pattern, self.world_size
        q_pos, k_pos = (self.layout.positions(self.local_len, world, r) for r in (dst, src))
        out = []
        for b in range(self.batch):
            for (q0, q1), (k0, k1), start, runs in self._blocks(dst, src, b):
                qp, kp = q_pos[q0:q1], k_pos[k0:k1]
                first_q, last_q, first_k, last_k = int(qp[0]), int(qp[-1]), int(kp[0]), int(kp[-1])  # host tensors
                if (pattern.causal and first_k > last_q
                        or pattern.window is not None and first_q - last_k >= pattern.window):
                    continue  # no allowed pair (positions increase inside a run)
                if runs is not None:  # a chunk's diagonal block, fused: its runs' local ids as a term
                    ids = torch.repeat_interleave(torch.arange(len(runs)), torch.tensor([e - a for a, e in runs]))
                    out.append(make_piece(0, 1, slice(q0, q1), slice(k0, k1), qp[None], kp[None], None,
                                          pattern.causal, pattern.window, b, docs=(ids[None], ids[None])))
                    continue
                if not pattern.has_segments:  # the whole block: two runs, read as views
                    out.append(make_piece(0, 1, slice(q0, q1), slice(k0, k1), qp[None], kp[None], None,
                                          pattern.causal, pattern.window, b))
                    continue
                # positions from the document's start: its segments and dilation classes are its own
                qr, kr = qp - start, kp - start
                for pc in class_pieces(pattern, qr, kr, [(first_q - start, last_q - start + 1)],
                                       [(first_k - start, last_k - start + 1)], self.num_heads, self.head_base,
                                       self.local_len * world):
                    out.append(dataclasses.replace(pc, q_idx=offset_rows(pc.q_idx, q1 - q0, q0),
                                                   k_idx=offset_rows(pc.k_idx, k1 - k0, k0), batch=b))
        return tuple(out)


# Where transformers' packing collator (DataCollatorWithFlattening) puts the documents: per-token sequence index
# (return_seq_idx), cumulative lengths over the flattened batch (return_flash_attn_kwargs), restarting position_ids.
# The cu_seq_lens_*/max_length_* keys describe the whole flattened batch, not one value per token.
ROW_KEYS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")
PACKING_KEYS = ("document_ids", "seq_idx", *ROW_KEYS)


def document_ids_from(batch: dict, shape: tuple[int, int]) -> torch.Tensor | None:
    """Global document ids (B, S), numbered from 0 along each row, of a packed batch; None when no row holds more
    than one document. From ``document_ids`` or ``seq_idx`` as given, else ``cu_seq_lens_q`` (cumulative lengths over
    the flattened batch), else ``position_ids`` by transformers' rule (``find_packed_sequence_indices``): a document
    starts wherever the position does not grow by exactly 1."""
    B, S = shape
    ids = batch.get("document_ids", batch.get("seq_idx"))
    if ids is None and batch.get("cu_seq_lens_q") is not None:
        cu = torch.as_tensor(batch["cu_seq_lens_q"]).long().flatten()
        if int(cu[0]) != 0 or int(cu[-1]) != B * S or bool((cu[1:] < cu[:-1]).any()):
            raise ValueError(f"cu_seq_lens_q {cu.tolist()} must rise from 0 to batch x seq = {B * S}: pass the "
                             "collator's output unchanged")
        ids = torch.searchsorted(cu[1:], torch.arange(B * S), right=True).view(B, S)
    if ids is None and batch.get("position_ids") is not None:
        pos = batch["position_ids"]
        starts = torch.cat([torch.zeros_like(pos[:, :1], dtype=torch.bool), pos[:, 1:] - pos[:, :-1] != 1], 1)
        ids = starts.long().cumsum(1)
    if ids is None:
        return None
    ids = ids.long()
    ids = ids - ids[:, :1]  # number each row from 0 (cu_seq_lens count over the flattened batch)
    return ids if bool((ids[:, -1] > 0).any()) else None


def positions_in_documents(document_ids: torch.Tensor) -> torch.Tensor:
    """Each token's position inside its document (B, S): what each document alone would use."""
    S = document_ids.shape[1]
    idx = torch.arange(S, device=document_ids.device).expand_as(document_ids)
    starts = torch.cat([torch.ones_like(document_ids[:, :1], dtype=torch.bool),
                        document_ids[:, 1:] != document_ids[:, :-1]], 1)
    first = torch.where(starts, idx, torch.zeros_like(idx)).cummax(1).values
    return idx - first


DECREASE, BOUNDS = "document ids decrease", "document bounds"  # the agreement's entries for documents


def agreement_fields(document_ids: torch.Tensor, chunks: int) -> tuple[dict, dict]:
    """This rank's (rank_facts, rank_vectors) entries of the agreement for its shard's documents (device tensors)."""
    bounds, decrease = summaries(document_ids, chunks)
    return {DECREASE: decrease}, {BOUNDS: bounds}


def from_agreement(rows: list[dict], document_ids: torch.Tensor, lay: Layout, local_len: int, who: str) -> Documents:
    """The Documents of the ring from the agreement's rows, or the same ValueError on every rank."""
    bad = [r for r, row in enumerate(rows) if row[DECREASE]]
    if bad:
        raise ValueError(f"{who}: document_ids decrease inside the shard of rank(s) {bad}: number the documents "
                         "over the whole row, non-decreasing, one run per document (ds_ring.shard_batch does)")
    B, C = document_ids.shape[0], lay.chunks_per_rank
    docs = Documents.from_rows([row[BOUNDS] for row in rows], local_runs(document_ids.tolist(), C), C, B)
    errs = docs.order_errors(lay, local_len)
    if errs:
        raise ValueError(f"{who}: " + "; ".join(errs))
    return docs
