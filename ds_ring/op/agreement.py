"""The agreement: what the ranks of a ring must know about each other, decided once before any K/V is sent.

One all_gather of a few integers per rank, read on the host once (ONE collective, ONE host sync). Every rank then
raises the same error, or none, so bad input on one rank never leaves the others waiting in the ring. The facts it
returns (``RingFacts``) are all the ring loop needs about the other ranks, so the loop makes no host sync.

The op runs it per call; the Hugging Face integration runs it once per model forward and hands the facts to every
attention layer (transformers passes extra forward kwargs down to the attention function).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from .comm import all_gather_rows
from .documents import Documents


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
    block_mask: torch.Tensor | None = field(default=None, compare=False, repr=False)  # two-dimensional: the
    # key-padding mask of this ring position's whole block, gathered once per forward in its Ulysses group

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
    same: dict[str, object],
    mine: dict[str, int | torch.Tensor],
    device: torch.device,
    vectors: dict[str, torch.Tensor] | None = None,
    scope: str = "ring",
) -> tuple[list[str], list[dict[str, int | list[int]]]]:
    """Exchange ``same`` (must be equal on every rank) and ``mine`` (this rank's facts) over ``group``; return the
    errors (equal in substance on every rank of the group) and every rank's ``mine`` and ``vectors`` by group rank.

    ``errors``: this rank's complaints about its own inputs; a rank with any makes every rank report an error (its
    own message, or the ranks to look at), as does a ``same`` entry that differs (named, with the values by rank).
    Every rank must pass the same keys (the row's size is fixed by them, not by the inputs). ``mine`` values may be
    0-d tensors on ``device`` (flags computed there need no sync of their own). ``vectors``: 1-D int tensors whose
    sizes follow from the ``same`` entries; exchanged in a second all_gather only once the first found no error (a
    size mismatch would hang a collective).
    """
    # NCCL collectives need device tensors; gloo needs CPU ones.
    where = device if dist.get_backend(group) == "nccl" else torch.device("cpu")
    head = torch.tensor([int(bool(errors))] + [code(v) for v in same.values()], dtype=torch.int64, device=where)
    facts = [v.to(where, torch.int64).reshape(1) if isinstance(v, torch.Tensor)
             else torch.tensor([v], dtype=torch.int64, device=where) for v in mine.values()]
    rows = all_gather_rows(torch.cat([head, *facts]), group, "agreement")
    start = 1 + len(same)
    out = [dict(zip(mine, row[start:])) for row in rows]
    if errors:
        return errors, out
    bad = [r for r, row in enumerate(rows) if row[0]]
    if bad:
        return [f"rank(s) {bad} of the {scope} rejected their inputs (their errors say why); every rank stops "
                "before any K/V is sent"], out
    for col, name in enumerate(same, start=1):
        values = [row[col] for row in rows]
        if len(set(values)) > 1:
            return [f"{name} differs across the {scope}'s ranks ({values} by rank; this is rank "
                    f"{dist.get_rank(group)}): every rank must pass shards of the same shape and the same "
                    "options"], out
    if vectors:
        flat = torch.cat([v.reshape(-1).to(where, torch.int64) for v in vectors.values()])
        for got, row in zip(out, all_gather_rows(flat, group, "agreement")):
            at = 0
            for name, v in vectors.items():
                got[name], at = row[at : at + v.numel()], at + v.numel()
    return [], out


def agree(group: dist.ProcessGroup | None, *, who: str, **kw) -> list[dict[str, int | list[int]]]:
    """``exchange``, raising its errors as one ValueError (on every rank of the group, before any K/V is sent)."""
    errors, rows = exchange(group, **kw)
    if errors:
        raise ValueError(f"{who}: " + "; ".join(errors))
    return rows
