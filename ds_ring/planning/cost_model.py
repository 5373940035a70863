"""The communication and time model of one attention layer for each (Ulysses x ring) factorization.

For a model's attention shape, a sequence length, ``sp_size`` ranks of which ``ranks_per_node`` share a node, and a
cluster's bandwidths and FLOP/s, it gives per factorization (u Ulysses ranks x R ring positions):

* bytes per rank per layer over each link (intra-node, inter-node): the Ulysses all-to-alls, the ring's K/V sends
  and the dK/dV partials coming home. Ring bytes come from the same schedules the op runs
  (``schedule.make_schedule``), so they are exactly what a rank sends (tests count them on CPU ranks);
* the predicted attention time, forward and backward, with overlap, and its efficiency against the ideal (the
  same attention computed at the kernel's full-block rate with no communication);
* a recommendation: the fastest factorization the heads allow.

Assumptions (stated, not hidden): each rank sends over its own link (NVLink inside a node; one NIC per GPU across
nodes, as on rail-optimised clusters), full duplex; a ring step's transfer overlaps the previous step's compute
(time = max), all-to-alls do not overlap anything; the block kernel runs at the achieved FLOP/s the user gives
(``flops``: measure it with one flash call on a full block) whatever the block size; the online-softmax merge of a
block into fp32 accumulators is memory-bound and runs on the compute stream: ``merge_bytes`` per output element
per merge at ``memory_bw`` (the first block of a step adopts its result, later ones merge). Dense pattern,
causal or not; no padding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..op.layouts import get_layout
from ..op.pattern import Pattern
from ..op.schedule import make_schedule
from ..op.ulysses import heads_error


# Bytes read and written per output element per merge, ds_ring's _merge_ on fp32 accumulators: scale out in place
# (read 4, write 4), upcast the block's out (read e, write 4), scale it (read 4, write 4), add (read 8, write 4);
# the lse passes are per row, negligible beside D elements. 34 for bf16/fp16 inputs, 28 for fp32 (no upcast).
def merge_bytes(dtype_bytes: int) -> float:
    return 8 + (dtype_bytes + 4 if dtype_bytes != 4 else 0) + 8 + 12


# The backward's memory passes per ring step: each block's dq added into the fp32 dq sum (upcast read e write 4,
# add read 8 write 4) per query element; each dK/dV partial made fp32 for the trip home (read e write 4) per received
# key element, and each partial that lands added into ours (read 8 write 4) per key element.
def backward_bytes(dtype_bytes: int, q_elements: int, kv_received: int, kv_home: int) -> float:
    upcast = dtype_bytes + 4 if dtype_bytes != 4 else 0
    return q_elements * (upcast + 12) + kv_received * upcast + kv_home * 12
# Backward FLOPs over forward FLOPs of flash attention (5 matmuls incl. the recomputed QK^T, over 2).
BACKWARD_FLOPS = 2.5


@dataclass(frozen=True)
class Cluster:
    """What the model needs to know about the machines: bytes/s per rank per direction, achieved FLOP/s."""

    ranks_per_node: int
    intra_node_bw: float
    inter_node_bw: float
    flops: float
    memory_bw: float


# Datasheet links, achieved flash-attention FLOP/s measured where cited; a user with measurements passes their own.
CLUSTERS = {
    # 8 x H100 SXM per node: NVLink 4 (450 GB/s per direction), one 400 Gb/s NDR NIC per GPU; flash bf16 ~ 450
    # TFLOP/s achieved at D=128 (our H100 run, docs/performance.md section 6: 1.00-1.03x SDPA flash).
    "h100": Cluster(8, 450e9, 50e9, 450e12, 3.35e12),
    # 8 x H800: NVLink limited to 200 GB/s per direction; the flash rate ring-flash-attention measured there
    # (591.5 causal forwards of 8k tokens, 32 heads, D=128 per second: 325 TFLOP/s).
    "h800": Cluster(8, 200e9, 50e9, 325e12, 3.35e12),
}


@dataclass(frozen=True)
class AttentionShape:
    heads: int
    kv_heads: int
    head_dim: int
    dtype_bytes: int = 2


@dataclass(frozen=True)
class Traffic:
    """Bytes one rank sends per attention layer (forward + backward), by link; equal to what it receives."""

    a2a_intra: int = 0
    a2a_inter: int = 0
    ring_intra: int = 0
    ring_inter: int = 0

    @property
    def total(self) -> int:
        return self.a2a_intra + self.a2a_inter + self.ring_intra + self.ring_inter


@dataclass(frozen=True)
class Prediction:
    ulysses: int
    ring: int
    traffic: Traffic  # of the slowest rank
    per_position: tuple[Traffic, ...]  # of ring position r's rank (every Ulysses rank of a position sends as much)
    forward_s: float
    backward_s: float
    ideal_s: float  # forward + backward of this rank's share at the kernel's rate, no communication

    @property
    def efficiency(self) -> float:
        return self.ideal_s / (self.forward_s + self.backward_s)


def factorizations(sp_size: int, shape: AttentionShape, ranks_per_node: int) -> list[tuple[int, int]]:
    """(u, R) with u * R = sp_size that the heads allow and whose Ulysses groups stay inside one node."""
    out = []
    for u in range(1, sp_size + 1):
        if sp_size % u or (u > 1 and heads_error(shape.heads, shape.kv_heads, u)):
            continue
        if u > 1 and ranks_per_node % u:
            continue
        out.append((u, sp_size // u))
    return out


def _node(rank: int, ranks_per_node: int) -> int:
    return rank // ranks_per_node


def _pairs(pc) -> int:
    """Allowed (query, key) pairs of one piece, per head: keys t <= i (causal) and i - t < window, counted by
    binary search (a dense pattern's key positions increase along a piece)."""
    n = 0
    for qp, kp in zip(pc.q_pos, pc.k_pos):
        hi = torch.searchsorted(kp, qp, right=True) if pc.causal else torch.full_like(qp, kp.numel())
        lo = torch.searchsorted(kp, qp - pc.window, right=True) if pc.window is not None else torch.zeros_like(qp)
        n += int((hi - lo).clamp(min=0).sum())
    return n


@dataclass(frozen=True)
class _StepCost:
    """One ring step of one position, in key rows of a shard and (query, key) pairs per head."""

    index: int
    source: int | None
    dest: int | None
    sent_rows: int  # our K/V rows to dest
    recv_rows: int  # the source's K/V rows to us
    home_rows: int  # our dK/dV rows coming back from dest
    partial_rows: int  # the source's dK/dV rows going home
    pairs: int


def _ring_costs(pattern: Pattern, block_len: int, R: int, r: int, layout: str, heads: int) -> list[_StepCost]:
    """The steps of ring position r, from the schedule the op runs. Without a window the schedule's rows grow
    linearly with the block, so a large block is planned at 1/k of its length: rows scale by k exactly, pairs by
    k^2 (the causal diagonal's O(1/L) share aside)."""
    k = 1
    if pattern.window is None:
        lay = get_layout(layout)
        while block_len % (2 * k) == 0 and block_len // (2 * k) >= 64 and \
                lay.local_len_error(block_len // (2 * k), R) is None:
            k *= 2
    schedule = make_schedule(pattern.pieces(get_layout(layout), block_len // k, R, heads), r)
    rows = lambda a_b: (a_b[1] - a_b[0]) * k  # noqa: E731
    out = []
    for st in schedule.steps:
        out.append(_StepCost(
            st.index, st.source, st.dest, rows(st.send_rows) if st.dest is not None else 0,
            rows(st.recv_rows) if st.source is not None else 0, sum(rows(hp) for hp in st.home_parts),
            sum((kp.hi - kp.lo) * k for kp in st.key_parts), sum(_pairs(pc) for pc in st.pieces) * k * k))
    return out


def predict(
    shape: AttentionShape, seq_len: int, sp_size: int, ulysses: int, cluster: Cluster, *, batch: int = 1,
    causal: bool = True, layout: str = "zigzag", window: int | None = None,
) -> Prediction:
    """Bytes and time of one attention layer (forward + backward) at (u = ``ulysses``, R = sp_size / u)."""
    u, R = ulysses, sp_size // ulysses
    L = seq_len // sp_size
    e, B, D = shape.dtype_bytes, batch, shape.head_dim
    hq, hkv = shape.heads // u, max(1, shape.kv_heads // u)
    pattern = Pattern.make(None, None, causal, window)
    err = get_layout(layout).local_len_error(u * L, R) or get_layout(layout, u).seq_len_error(seq_len, sp_size)
    if err:
        raise ValueError(f"predict: {err}")
    # Ulysses: q, k, v in and out forward; dout in, dq, dk, dv out backward; (u-1)/u of each leaves the rank (a
    # replicated kv head goes to u-1 ranks whole). Inside one node by construction (factorizations()).
    kv_out = 2 * B * L * D * e * (shape.kv_heads * (u - 1) // u if shape.kv_heads >= u else (u - 1))
    q_out = B * L * shape.heads * D * e * (u - 1) // u
    a2a = 2 * (2 * q_out + kv_out)
    a2a_t = a2a / cluster.intra_node_bw
    kv_row, dkv_row = 2 * B * hkv * D * e, 2 * B * hkv * D * 4
    rank_of = lambda pos: pos * u  # noqa: E731  Ulysses rank 0 of a ring position: dense work is the same for all
    per_position, worst = [], None
    for r in range(R):  # every ring position of one SP group (the other groups repeat it); keep the slowest
        ring_intra = ring_inter = 0
        fwd = bwd = 0.0
        for st in _ring_costs(pattern, u * L, R, r, layout, hq):
            t = 4 * B * hq * D * st.pairs / cluster.flops
            if st.index == 0:  # the local block: no traffic, its result is the accumulators' first value
                fwd, bwd = fwd + t, bwd + BACKWARD_FLOPS * t
                continue
            crosses = {peer: peer is not None and _node(rank_of(peer), cluster.ranks_per_node) !=
                       _node(rank_of(r), cluster.ranks_per_node) for peer in (st.source, st.dest)}
            sent, got = st.sent_rows * kv_row, st.recv_rows * kv_row
            home, partials = st.home_rows * dkv_row, st.partial_rows * dkv_row
            for nbytes, inter in ((2 * sent, crosses[st.dest]), (partials, crosses[st.source])):
                ring_inter, ring_intra = (ring_inter + nbytes, ring_intra) if inter else (ring_inter,
                                                                                         ring_intra + nbytes)

            def link_time(flows):  # (bytes out, bytes in, crosses nodes): full duplex, per link kind
                return max(max(sum(o for o, _, x in flows if x == inter), sum(i for _, i, x in flows if x == inter))
                           / (cluster.inter_node_bw if inter else cluster.intra_node_bw) for inter in (False, True))

            merge = B * hq * u * L * D * merge_bytes(e) / cluster.memory_bw if st.source is not None else 0.0
            passes = backward_bytes(e, B * hq * u * L * D if st.source is not None else 0,
                                    2 * B * hkv * st.recv_rows * D, 2 * B * hkv * st.home_rows * D) / cluster.memory_bw
            fwd += max(t, link_time([(sent, 0, crosses[st.dest]), (0, got, crosses[st.source])])) + merge
            bwd += max(BACKWARD_FLOPS * t, link_time([(sent, home, crosses[st.dest]),
                                                      (partials, got, crosses[st.source])])) + passes
        traffic = Traffic(a2a_intra=a2a if u > 1 else 0, ring_intra=ring_intra, ring_inter=ring_inter)
        per_position.append(traffic)
        if worst is None or fwd + bwd > worst[0] + worst[1]:
            worst = (fwd, bwd, traffic)
    full_pairs = seq_len * seq_len // (2 if causal else 1)  # the whole attention, split evenly over sp_size ranks
    ideal = (1 + BACKWARD_FLOPS) * 4 * B * shape.heads * D * full_pairs / sp_size / cluster.flops
    fwd, bwd, traffic = worst
    return Prediction(u, R, traffic, tuple(per_position), fwd + a2a_t / 2, bwd + a2a_t / 2, ideal)


def recommend(shape: AttentionShape, seq_len: int, sp_size: int, cluster: Cluster, **kw) -> list[Prediction]:
    """Every allowed factorization, fastest first."""
    preds = [predict(shape, seq_len, sp_size, u, cluster, **kw)
             for u, _ in factorizations(sp_size, shape, cluster.ranks_per_node)]
    return sorted(preds, key=lambda p: p.forward_s + p.backward_s)


def table(preds: list[Prediction], seq_len: int, sp_size: int, cluster: Cluster) -> str:
    """``recommend``'s predictions as the text ``ds-ring plan`` prints: bytes per rank per layer by link, predicted
    attention time (forward + backward, one layer) and efficiency against the ideal; the first row is recommended."""
    mb = lambda b: f"{b / 1e6:,.1f}"  # noqa: E731
    head = (f"attention per layer, {seq_len:,} tokens over {sp_size} ranks, {cluster.ranks_per_node} per node "
            f"(NVLink-class {cluster.intra_node_bw / 1e9:g} GB/s, across nodes {cluster.inter_node_bw / 1e9:g} GB/s "
            f"per rank and direction; kernel {cluster.flops / 1e12:g} TFLOP/s, memory {cluster.memory_bw / 1e12:g} "
            "TB/s):")
    cols = ("(u, R)", "all-to-all MB", "ring in-node MB", "ring across MB", "fwd ms", "bwd ms", "of ideal")
    lines = [head, "  " + "".join(f"{c:>16}" for c in cols)]
    for i, p in enumerate(preds):
        t = p.traffic
        row = (f"({p.ulysses}, {p.ring})", mb(t.a2a_intra + t.a2a_inter), mb(t.ring_intra), mb(t.ring_inter),
               f"{p.forward_s * 1e3:,.2f}", f"{p.backward_s * 1e3:,.2f}", f"{p.efficiency:.1%}")
        lines.append("  " + "".join(f"{c:>16}" for c in row) + ("   <- recommended" if i == 0 else ""))
    lines.append("  (u Ulysses ranks inside a node x R ring positions; bytes one rank sends, forward + backward; "
                 "assumptions: docs/ulysses_ring.md)")
    return "\n".join(lines)
