"""The agreement: what the ranks of a ring must know about each other, decided once before any K/V is sent.

One all_gather of a few integers per rank, read on the host once (ONE collective, ONE host sync). Every rank then
raises the same error, or none, so bad input on one rank never leaves the others waiting in the ring. The facts it
returns (``RingFacts``) are all the ring loop needs about the other ranks, so the loop makes no host sync.

``agree_ring`` is the one builder of the agreement: the op runs it per call with the entries of its arguments, the
Hugging Face integration once per model forward with the entries of the model's inputs, and hands the facts to every
attention layer (transformers passes extra forward kwargs down to the attention function). Under two-dimensional
sequence parallelism it agrees inside the Ulysses group first (one more small all_gather there), gathers the
block's key-padding mask and document ids, then agrees over the ring.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from .comm import all_gather_rows, group_size_rank
from .documents import DECREASE, Documents, agreement_fields, from_agreement
from .layouts import Layout
from .ulysses import gather_block


@dataclass(frozen=True)
class RingFacts:
    """Facts about every rank of one ring for one call (or one model forward).

    ``padded[r]``: ring rank r's shard has at least one padded key, so its chunk needs the masked kernel; when any
    rank is padded every chunk travels with its mask (all packets have the same shape on every rank).
    ``documents``: the packed-document structure of every shard (documents.py), or None for unpacked rows.
    """

    world_size: int
    batch: int
    local_len: int
    padded: tuple[bool, ...]
    documents: Documents | None = None
    block_key_padding_mask: torch.Tensor | None = field(default=None, compare=False, repr=False)  # two-dimensional:
    # the key-padding mask of this ring position's whole block, gathered once in its Ulysses group

    @property
    def any_padded(self) -> bool:
        return any(self.padded)

    def matches(self, batch: int, local_len: int, world_size: int) -> bool:
        return (self.batch, self.local_len, self.world_size) == (batch, local_len, world_size)


def code(value: object) -> int:
    """An int64 that is equal on two ranks iff ``value`` is (ints as they are, anything else by a checksum)."""
    if isinstance(value, bool) or not isinstance(value, int):
        return zlib.crc32(repr(value).encode())
    return value


def exchange(
    group: dist.ProcessGroup | None,
    *,
    errors: list[str],
    must_match: dict[str, object],
    rank_facts: dict[str, int | torch.Tensor],
    device: torch.device,
    rank_vectors: dict[str, torch.Tensor] | None = None,
    scope: str = "ring",
) -> tuple[list[str], list[dict[str, int | list[int]]]]:
    """Exchange ``must_match`` (equal on every rank) and ``rank_facts`` (this rank's own facts) over ``group``;
    return the errors (equal in substance on every rank of the group) and every rank's facts and vectors by group rank.

    ``errors``: this rank's complaints about its own inputs; a rank with any makes every rank report an error (its
    own message, or the ranks to look at), as does a ``must_match`` entry that differs (named, with the values by
    rank). Every rank must pass the same keys (the row's size is fixed by them, not by the inputs). ``rank_facts``
    values may be 0-d tensors on ``device`` (flags computed there need no sync of their own). ``rank_vectors``: 1-D
    int tensors whose sizes follow from the ``must_match`` entries; exchanged in a second all_gather only once the
    first found no error (a size mismatch would hang a collective).
    """
    # NCCL collectives need device tensors; gloo needs CPU ones.
    where = device if dist.get_backend(group) == "nccl" else torch.device("cpu")
    head = torch.tensor([int(bool(errors))] + [code(v) for v in must_match.values()], dtype=torch.int64, device=where)
    facts = [v.to(where, torch.int64).reshape(1) if isinstance(v, torch.Tensor)
             else torch.tensor([v], dtype=torch.int64, device=where) for v in rank_facts.values()]
    rows = all_gather_rows(torch.cat([head, *facts]), group, "agreement")
    start = 1 + len(must_match)
    out = [dict(zip(rank_facts, row[start:])) for row in rows]
    if errors:
        return errors, out
    bad = [r for r, row in enumerate(rows) if row[0]]
    if bad:
        return [f"rank(s) {bad} of the {scope} rejected their inputs (their errors say why); every rank stops "
                "before any K/V is sent"], out
    for col, name in enumerate(must_match, start=1):
        values = [row[col] for row in rows]
        if len(set(values)) > 1:
            return [f"{name} differs across the {scope}'s ranks ({values} by rank; this is rank "
                    f"{dist.get_rank(group)}): every rank must pass shards of the same shape and the same "
                    "options"], out
    if rank_vectors:
        flat = torch.cat([v.reshape(-1).to(where, torch.int64) for v in rank_vectors.values()])
        for got, row in zip(out, all_gather_rows(flat, group, "agreement")):
            at = 0
            for name, v in rank_vectors.items():
                got[name], at = row[at : at + v.numel()], at + v.numel()
    return [], out


def agree(group: dist.ProcessGroup | None, *, who: str, **kw) -> list[dict[str, int | list[int]]]:
    """``exchange``, raising its errors as one ValueError (on every rank of the group, before any K/V is sent)."""
    errors, rows = exchange(group, **kw)
    if errors:
        raise ValueError(f"{who}: " + "; ".join(errors))
    return rows


BATCH = "batch fingerprint"  # the agreement's entry for ``ds_ring.shard_batch``'s fingerprint of the full batch
ONE_BATCH_FIX = ("each rank of a ring keeps its own slice of ONE full batch, and a dataloader sharded over every "
                 "process (a DistributedSampler over the world, or accelerator.prepare(dataloader)) gives each rank a "
                 "different one: load with ds_ring.sp_dataloader(dataset, sp, ...), whose sampler shards over the "
                 "data-parallel ranks (rings) only, or give your sampler num_replicas=sp.dp_size, rank=sp.dp_rank")


def _one_batch_error(values: list[int], scope: str) -> str | None:
    """Why the ranks of ``scope`` do not hold one batch (None if they do). Ranks are grouped by batch, not listed
    with their fingerprints, so every Ulysses group words the same error."""
    if len(set(values)) < 2:
        return None
    groups = {}
    for r, v in enumerate(values):
        groups.setdefault(v, []).append(r)
    unmarked = f"; rank(s) {groups[0]} passed no fingerprint (no ds_ring.shard_batch)" if 0 in groups else ""
    return (f"the ranks of one {scope} were given different batches (ranks by batch: {list(groups.values())}"
            f"{unmarked}): {ONE_BATCH_FIX}")


def agree_ring(
    group: dist.ProcessGroup | None,
    *,
    who: str,
    errors: list[str],
    must_match: dict[str, object],
    layout: Layout,
    batch: int,
    local_len: int,
    device: torch.device,
    key_padding_mask: torch.Tensor | None = None,
    document_ids: torch.Tensor | None = None,
    flags: dict[str, int | torch.Tensor] | None = None,
    batch_fingerprint: int | torch.Tensor | None = None,
    ulysses_group: dist.ProcessGroup | None = None,
    local: bool = False,
) -> tuple[RingFacts, dict[str, list[int]]]:
    """The ring's agreement for one call or one model forward: the facts, and for each of ``flags`` the ring ranks
    that raised it. Raises the same ValueError on every rank of the ring (and of its Ulysses groups) when a rank
    has ``errors``, a ``must_match`` entry differs, the ranks hold different batches, or the documents are out of
    order; before any K/V is sent.

    ``must_match``: the caller's entries that must be equal on every rank (shapes, options, model). ``layout``: the
    ring's layout (over ring positions). ``batch``/``local_len``: this rank's shard shape. ``key_padding_mask``
    (B, L) bool, True = real token, and ``document_ids`` (B, L): this rank's shard, or None (ids: None on every rank
    or on none; under Ulysses the mask too). ``flags``: the caller's 0/1 facts (0-d device tensors need no sync of their own).
    ``batch_fingerprint``: ``ds_ring.shard_batch``'s fingerprint of the full batch this rank received (None: 0).
    ``ulysses_group``: two-dimensional SP; the Ulysses group agrees first and its verdict (errors, flags ORed, the
    block's mask and ids gathered) joins the ring's agreement, so a bad rank anywhere stops every rank.
    ``local``: the rank's tensors are the whole sequence (no communication; a ring of one rank needs none either).
    One ring rank reads its facts on the host: no collective.
    """
    flags, errors = dict(flags or {}), list(errors)
    fingerprint = 0 if batch_fingerprint is None else batch_fingerprint
    # the documents' second exchange has a size only when every rank has ids (and the gathers below need them on
    # every rank of the Ulysses group, as the mask)
    must_match = {**must_match, "has document_ids": int(document_ids is not None)}
    u = 1 if local or ulysses_group is None else dist.get_world_size(ulysses_group)
    if u > 1:  # stage 1: the Ulysses group; its verdict is carried to the ring, not raised
        gathered = {"has key_padding_mask": int(key_padding_mask is not None)}
        errors, rows = exchange(ulysses_group, errors=errors, must_match={**must_match, **gathered},
                                rank_facts={**flags, BATCH: fingerprint}, device=device, scope="Ulysses group")
        flags = {k: max(row[k] for row in rows) for k in flags}  # the group's, carried to the ring
        err = None if errors else _one_batch_error([row[BATCH] for row in rows], "Ulysses group")
        errors, fingerprint = errors + [err] if err else errors, rows[0][BATCH]
        if not errors:
            local_len *= u
            key_padding_mask = None if key_padding_mask is None else gather_block(key_padding_mask, ulysses_group, u)
            document_ids = None if document_ids is None else gather_block(document_ids, ulysses_group, u)
    # every rank sends the same keys (the row's size must not depend on the inputs); values default to 0
    ours: dict[str, int | torch.Tensor] = {
        "padded": (~key_padding_mask).any() if key_padding_mask is not None and not errors else 0,
        **flags, BATCH: fingerprint, DECREASE: 0}
    vectors: dict[str, torch.Tensor] = {}
    if document_ids is not None and not errors:
        doc_facts, vectors = agreement_fields(document_ids, layout.chunks_per_rank)
        ours.update(doc_facts)
    world = 1 if local else group_size_rank(group)[0]
    if world > 1:
        rows = agree(group, who=who, errors=errors, must_match=must_match, rank_facts=ours, device=device,
                     rank_vectors=vectors)
    elif errors:
        raise ValueError(f"{who}: " + "; ".join(errors))
    else:  # one ring position: its own facts decide (host reads; the HF integration decides once per forward)
        rows = [{**{k: int(v) for k, v in ours.items()}, **{k: v.tolist() for k, v in vectors.items()}}]
    err = _one_batch_error([row[BATCH] for row in rows], "ring")
    if err:
        raise ValueError(f"{who}: {err}")
    docs = None if document_ids is None else from_agreement(rows, document_ids, layout, local_len, who)
    facts = RingFacts(world, batch, local_len, tuple(bool(row["padded"]) for row in rows), docs,
                      key_padding_mask if u > 1 else None)
    return facts, {k: [p for p, row in enumerate(rows) if row[k]] for k in flags}
