"""Ring communication: asynchronous point-to-point exchange of K/V packets and dK/dV partials.

``RingComm`` owns the peers and posts one batch of isend/irecv per exchange; the caller waits on the returned
handle after its compute, so the transfer overlaps with it. Every rank derives the same schedule from the plan, so
sends and receives always pair up. ``count_comm()`` records what travelled, for tests and benchmarks.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch
import torch.distributed as dist


@dataclass
class CommCounter:
    """Bytes and messages this process sent and received, by kind ("kv", "dkv")."""

    sent_bytes: dict[str, int] = field(default_factory=dict)
    recv_bytes: dict[str, int] = field(default_factory=dict)
    sends: dict[str, int] = field(default_factory=dict)
    peers: set[int] = field(default_factory=set)

    def add(self, kind: str, peer_send: int | None, peer_recv: int | None, send_bytes: int, recv_bytes: int):
        if peer_send is not None:
            self.sent_bytes[kind] = self.sent_bytes.get(kind, 0) + send_bytes
            self.sends[kind] = self.sends.get(kind, 0) + 1
            self.peers.add(peer_send)
        if peer_recv is not None:
            self.recv_bytes[kind] = self.recv_bytes.get(kind, 0) + recv_bytes
            self.peers.add(peer_recv)


_COUNTERS: list[CommCounter] = []


@contextlib.contextmanager
def count_comm() -> Iterator[CommCounter]:
    """Record the ring traffic of this process inside the block."""
    c = CommCounter()
    _COUNTERS.append(c)
    try:
        yield c
    finally:
        _COUNTERS.remove(c)


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

    def exchange(
        self, kind: str, tag: int, send_to: int | None, send: Sequence[torch.Tensor],
        recv_from: int | None, recv: Sequence[torch.Tensor],
    ) -> _Pending:
        """Post sends of ``send`` to ``send_to`` and receives into ``recv`` from ``recv_from`` (either may be None).

        Returns a handle to ``wait()`` on; with ``overlap=False`` the exchange has completed on return.
        """
        ops = []
        if send_to is not None:
            dst = self._global(send_to)
            ops += [dist.P2POp(dist.isend, t, dst, self.group, tag + i) for i, t in enumerate(send)]
        if recv_from is not None:
            src = self._global(recv_from)
            ops += [dist.P2POp(dist.irecv, t, src, self.group, tag + i) for i, t in enumerate(recv)]
        for c in _COUNTERS:
            c.add(kind, send_to, recv_from, sum(t.numel() * t.element_size() for t in send),
                  sum(t.numel() * t.element_size() for t in recv))
        pending = _Pending(dist.batch_isend_irecv(ops) if ops else [], [op.tensor for op in ops])
        if not self.overlap:
            pending.wait()
        return pending
