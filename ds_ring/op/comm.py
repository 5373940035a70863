"""Ring communication: asynchronous point-to-point exchange of K/V packets and dK/dV partials, and the one small
collective the front door runs before the loop.

``RingComm`` owns the peers, the message tags and the ordering of every exchange: a caller names what it sends
(kind, step, part) and gets a handle to wait on after its compute, so the transfer overlaps with it. Every rank
derives the same schedule (schedule.py), so sends and receives always pair up. ``count_comm()`` records what
travelled (bytes, peers, collectives), for tests and benchmarks.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch
import torch.distributed as dist


def group_size_rank(group: dist.ProcessGroup | None) -> tuple[int, int]:
    """(world size, rank) of ``group``; ``None`` means WORLD when initialised, else a single process."""
    if group is None and not (dist.is_available() and dist.is_initialized()):
        return 1, 0
    return dist.get_world_size(group), dist.get_rank(group)



# What travels, one tag space each. gloo matches messages by tag (NCCL by order): a tag must identify the message
# among everything two ranks can have in flight at once, so it encodes (kind, step, part, tensor of the packet).
KINDS = ("kv", "dkv")
_MAX_TENSORS = 8  # tensors per packet: k, v, key-padding mask, document ids, ...
_MAX_PARTS = 4  # parts per step: the backward sends dK/dV home in key halves


@dataclass
class CommCounter:
    """What this process sent and received: bytes by kind ("kv", "dkv", collectives by name), ring peers (group
    ranks), point-to-point bytes sent to each peer, and collectives by name."""

    sent_bytes: dict[str, int] = field(default_factory=dict)
    recv_bytes: dict[str, int] = field(default_factory=dict)
    peers: set[int] = field(default_factory=set)
    sent_to: dict[int, int] = field(default_factory=dict)
    collectives: dict[str, int] = field(default_factory=dict)

    def add(self, kind: str, peer_send: int | None, peer_recv: int | None, send_bytes: int, recv_bytes: int):
        if peer_send is not None:
            self.sent_bytes[kind] = self.sent_bytes.get(kind, 0) + send_bytes
            self.sent_to[peer_send] = self.sent_to.get(peer_send, 0) + send_bytes
            self.peers.add(peer_send)
        if peer_recv is not None:
            self.recv_bytes[kind] = self.recv_bytes.get(kind, 0) + recv_bytes
            self.peers.add(peer_recv)


_COUNTERS: list[CommCounter] = []


@contextlib.contextmanager
def count_comm() -> Iterator[CommCounter]:
    """Record the ring traffic and the collectives of this process inside the block."""
    c = CommCounter()
    _COUNTERS.append(c)
    try:
        yield c
    finally:
        _COUNTERS.remove(c)


def note_collective(name: str, sent_bytes: int = 0, recv_bytes: int = 0) -> None:
    """Count one collective issued by ds_ring (the agreement, an all-to-all, ...) in the active counters, with the
    bytes it moves off and onto this rank (an all-to-all's own chunk stays home), under ``name``."""
    for c in _COUNTERS:
        c.collectives[name] = c.collectives.get(name, 0) + 1
        if sent_bytes or recv_bytes:
            c.sent_bytes[name] = c.sent_bytes.get(name, 0) + sent_bytes
            c.recv_bytes[name] = c.recv_bytes.get(name, 0) + recv_bytes


def all_gather_rows(row: torch.Tensor, group: dist.ProcessGroup | None, name: str) -> list[list[int]]:
    """All-gather one small int64 vector per rank and read it on the host: ONE collective and ONE host sync.

    ``row`` may live on the device (NCCL) so that flags computed there need no sync of their own."""
    note_collective(name)
    rows = [torch.empty_like(row) for _ in range(dist.get_world_size(group))]
    dist.all_gather(rows, row, group=group)
    return torch.stack(rows).tolist()


class _Pending:
    """Handle of posted transfers; holds their tensors so no buffer is freed or reused before ``wait``."""

    def __init__(self, works, tensors):
        self.works, self.tensors = works, tensors

    def wait(self) -> None:
        for w in self.works:
            w.wait()
        self.works, self.tensors = [], []


class RingComm:
    """Point-to-point exchanges inside ``group`` (group ranks in, global ranks for torch.distributed)."""

    def __init__(self, group: dist.ProcessGroup | None, overlap: bool = True):
        self.group = group
        self.overlap = overlap
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)

    def _global(self, r: int) -> int:
        return r if self.group is None else dist.get_global_rank(self.group, r)

    @staticmethod
    def tag(kind: str, step: int, part: int, index: int) -> int:
        """The message tag of tensor ``index`` of (kind, step, part): unique among all messages of one call."""
        assert part < _MAX_PARTS and index < _MAX_TENSORS, (part, index)
        return ((step * _MAX_PARTS + part) * len(KINDS) + KINDS.index(kind)) * _MAX_TENSORS + index

    def exchange(
        self, kind: str, step: int, part: int, send_to: int | None, send: Sequence[torch.Tensor],
        recv_from: int | None, recv: Sequence[torch.Tensor],
    ) -> _Pending:
        """Post sends of ``send`` to ``send_to`` and receives into ``recv`` from ``recv_from`` (either may be None).

        Sends are posted before receives, in packet order, on every rank. Returns a handle to ``wait()`` on; with
        ``overlap=False`` the exchange has completed on return.
        """
        ops = []
        if send_to is not None:
            dst = self._global(send_to)
            ops += [dist.P2POp(dist.isend, t, dst, self.group, self.tag(kind, step, part, i))
                    for i, t in enumerate(send)]
        if recv_from is not None:
            src = self._global(recv_from)
            ops += [dist.P2POp(dist.irecv, t, src, self.group, self.tag(kind, step, part, i))
                    for i, t in enumerate(recv)]
        for c in _COUNTERS:
            c.add(kind, send_to, recv_from, sum(t.numel() * t.element_size() for t in send),
                  sum(t.numel() * t.element_size() for t in recv))
        pending = _Pending(dist.batch_isend_irecv(ops) if ops else [], [op.tensor for op in ops])
        if not self.overlap:
            pending.wait()
        return pending
