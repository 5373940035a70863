"""Sequence layouts: which global positions each rank of a ring holds. The one home of every layout fact.

A layout is chosen once by name (``get_layout("zigzag")``) and the same object answers every question about it:
the global ranges and positions of a rank's shard, the divisor a sequence length must meet, and the check of a
local shard length. ``shard_sequence``/``gather_sequence`` (sharding.py), ``shard_batch`` (data.py), the op's
validation, the schedules, the demo and the examples all ask it; no other module compares layout names.

Sequence of S = 16 tokens over P = 4 ranks (rank: global positions held, in local order)::

    contiguous   rank 0: 0  1  2  3     zigzag   rank 0:  0  1 | 14 15
                 rank 1: 4  5  6  7              rank 1:  2  3 | 12 13
                 rank 2: 8  9 10 11              rank 2:  4  5 | 10 11
                 rank 3: 12 13 14 15             rank 3:  6  7 |  8  9

Zigzag cuts the sequence into 2P chunks and gives rank p chunks p and 2P-1-p, so under a causal mask every rank
does the same amount of work.
"""

from __future__ import annotations

import math

import torch


class Layout:
    """How a sequence is cut over a ring: into ``chunks_per_rank * world_size`` equal chunks, rank p holding the
    chunks ``chunks(world_size, p)`` in that order. Subclasses define the name, the count and the assignment."""

    name: str
    chunks_per_rank: int

    def chunks(self, world_size: int, rank: int) -> list[int]:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"Layout({self.name!r})"

    # Equal by name (the name says the cut, the grid's included): layouts key cached schedules.
    def __eq__(self, other: object) -> bool:
        return isinstance(other, Layout) and self.name == other.name

    def __hash__(self) -> int:
        return hash(self.name)

    def divisor(self, world_size: int) -> int:
        """A sequence length must be a multiple of this to shard over ``world_size`` ranks."""
        return self.chunks_per_rank * world_size

    def padded_length(self, seq_len: int, world_size: int) -> int:
        """``seq_len`` rounded up to the next length that shards."""
        d = self.divisor(world_size)
        return -(-seq_len // d) * d

    def local_len_error(self, local_len: int, world_size: int) -> str | None:
        """Why a local shard of ``local_len`` tokens cannot be in this layout (None if it can)."""
        c = self.chunks_per_rank
        if local_len % c:
            what = "an even" if c == 2 else f"a multiple-of-{c}"
            return (f"layout={self.name!r} needs {what} shard length, got {local_len}: pad the sequence to a "
                    f"multiple of {self.divisor(world_size)} ({c} x world_size={world_size}); ds_ring.shard_batch "
                    "pads")
        return None

    def seq_len_error(self, seq_len: int, world_size: int) -> str | None:
        """Why a whole sequence of ``seq_len`` tokens cannot be sharded (None if it can)."""
        d = self.divisor(world_size)
        if seq_len % d:
            return (f"sequence length {seq_len} is not a multiple of {d} (world_size={world_size}, layout="
                    f"{self.name!r}): pad it to {self.padded_length(seq_len, world_size)} (ds_ring.shard_batch pads)")
        return None

    def ranges(self, local_len: int, world_size: int, rank: int) -> list[tuple[int, int]]:
        """Global ``[start, end)`` ranges held by ``rank``, in local order."""
        err = self.local_len_error(local_len, world_size)
        if err:
            raise ValueError(err)
        c = local_len // self.chunks_per_rank
        return [(i * c, (i + 1) * c) for i in self.chunks(world_size, rank)]

    def positions(self, local_len: int, world_size: int, rank: int, device=None) -> torch.Tensor:
        """Global positions (int64, shape (local_len,)) of ``rank``'s shard."""
        return torch.cat([torch.arange(a, b, device=device) for a, b in self.ranges(local_len, world_size, rank)])

    def unshard_index(self, local_len: int, world_size: int, device=None) -> torch.Tensor | None:
        """Index into the rank-major concatenation of all shards that gives global order (None: already in order)."""
        cat = torch.cat([self.positions(local_len, world_size, r) for r in range(world_size)])
        if torch.equal(cat, torch.arange(cat.numel())):
            return None
        return torch.argsort(cat).to(device)


class Contiguous(Layout):
    name, chunks_per_rank = "contiguous", 1

    def chunks(self, world_size: int, rank: int) -> list[int]:
        return [rank]


class Zigzag(Layout):
    name, chunks_per_rank = "zigzag", 2

    def chunks(self, world_size: int, rank: int) -> list[int]:
        return [rank, 2 * world_size - 1 - rank]


class UlyssesRing(Layout):
    """The two-dimensional grid: ``world_size`` = R ring positions x u Ulysses ranks, sequence-parallel rank
    p = r * u + j. Ring position r's block (u * L tokens) is its shard under ``ring`` over R positions; Ulysses rank
    j holds tokens j*L..(j+1)*L of that block (in the block's local order), so the Ulysses all-to-all rebuilds the
    block in order. S = 16 over (R, u) = (2, 2), zigzag ring::

        block of ring position 0: 0 1 2 3 | 12 13 14 15  ->  rank 0: 0 1 2 3      rank 1: 12 13 14 15
        block of ring position 1: 4 5 6 7 |  8  9 10 11  ->  rank 2: 4 5 6 7      rank 3:  8  9 10 11
    """

    def __init__(self, ring: Layout, ulysses_size: int):
        self.ring, self.u = ring, ulysses_size
        self.name, self.chunks_per_rank = f"{ring.name} x ulysses {ulysses_size}", 1

    def _split(self, world_size: int) -> int:
        if world_size % self.u:
            raise ValueError(f"{world_size} ranks do not split into Ulysses groups of {self.u}")
        return world_size // self.u

    def divisor(self, world_size: int) -> int:
        return math.lcm(self.ring.divisor(self._split(world_size)), world_size)

    def local_len_error(self, local_len: int, world_size: int) -> str | None:
        err = self.ring.local_len_error(self.u * local_len, self._split(world_size))
        return None if err is None else (f"the block of {self.u} Ulysses ranks x {local_len} tokens: {err}")

    def ranges(self, local_len: int, world_size: int, rank: int) -> list[tuple[int, int]]:
        r, j = divmod(rank, self.u)
        lo, hi, out, at = j * local_len, (j + 1) * local_len, [], 0
        for a, b in self.ring.ranges(self.u * local_len, self._split(world_size), r):
            s, e = max(a, a + lo - at), min(b, a + hi - at)  # the part of [a, b) at block offsets [lo, hi)
            if s < e:
                out.append((s, e))
            at += b - a
        return out


LAYOUTS: dict[str, Layout] = {lay.name: lay for lay in (Contiguous(), Zigzag())}


def get_layout(layout: str | Layout, ulysses_size: int = 1) -> Layout:
    """The layout object for a name (or the object itself), on a grid of ``ulysses_size`` Ulysses ranks per ring
    position when > 1; ValueError naming the choices otherwise."""
    if ulysses_size > 1:
        return UlyssesRing(get_layout(layout), ulysses_size)
    if isinstance(layout, Layout):
        return layout
    try:
        return LAYOUTS[layout]
    except (KeyError, TypeError):
        raise ValueError(f"layout={layout!r} is not supported: use one of {list(LAYOUTS)}") from None
