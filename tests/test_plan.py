"""The schedules' invariants, in process (milliseconds, no ranks): every rank derives its schedule from shapes and
the pattern alone, so all ranks' schedules can be built here and checked against the definition of the pattern."""

from __future__ import annotations

import random

import pytest
import torch

from reference import multiplicity

from ds_ring.op.layouts import LAYOUTS, get_layout
from ds_ring.op.pattern import Pattern
from ds_ring.op.schedule import make_schedule

H = 4
CASES = [  # (world, local_len, segment_lengths, dilation_rates, causal, window)
    (1, 24, None, None, True, None),
    (2, 12, None, None, False, None),
    (3, 8, [8, 16, None], [1, 2, 4], True, None),
    (4, 6, [7, 20], [1, 3], False, 9),
    (4, 6, [5, 11, 29], [2, 1, 2], True, 30),
    (2, 10, [12], [8], False, None),
    (4, 8, None, None, True, 5),
]


def _schedule(pattern, local_len, world, rank, layout, q_len=None):
    return make_schedule(pattern.pieces(get_layout(layout), local_len, world, H, q_len=q_len), rank)


def _covered(piece, heads: int) -> torch.Tensor:
    """(H, q rows, k cols) counts of the (head, query position, key position) triples one piece computes."""
    allowed = (piece.q_pos[:, :, None] >= 0) & (piece.k_pos[:, None, :] >= 0)  # (G, M, N) all True
    qp, kp = piece.q_pos[:, :, None], piece.k_pos[:, None, :]
    if piece.seg is not None:
        allowed &= (qp // piece.seg) == (kp // piece.seg)
    if piece.causal:
        allowed &= kp <= qp
    if piece.window is not None:
        allowed &= (qp - kp) < piece.window
    return allowed, list(range(piece.head_start, heads, piece.head_step))


def _coverage(schedules, world, local_len, layout, pieces_of=lambda st: [(0, None, st.pieces)], q_from=0):
    """Counts per (head, query position, key position) over all ranks' pieces. ``q_from``: the first key row the
    queries sit at (decoding: the last rows)."""
    S = world * local_len
    count = torch.zeros(H, S, S, dtype=torch.int64)
    lay = get_layout(layout)
    for p, schedule in enumerate(schedules):
        for st in schedule.steps:
            src = st.source
            if src is None:
                continue
            for part_lo, part_hi, pieces in pieces_of(st):  # the rows a piece sees: the part's, or all received
                for pc in pieces:
                    allowed, heads = _covered(pc, H)
                    G, M, N = allowed.shape
                    # positions are global: the rows a piece reads (q_idx of this shard; k_idx of the received rows,
                    # from recv_rows[0] + the part's start) must hold exactly those positions
                    q_glob = lay.positions(local_len, world, p)[q_from:]
                    a, b = st.recv_rows
                    k_glob = lay.positions(local_len, world, src)[a:b][part_lo:part_hi]
                    for idx, glob, pos in ((pc.q_idx, q_glob, pc.q_pos), (pc.k_idx, k_glob, pc.k_pos)):
                        rows = glob if idx is None else glob[idx]
                        assert torch.equal(rows, pos.flatten()), (p, st.index, idx, pos)
                    for g in range(G):
                        qi, ki = torch.meshgrid(pc.q_pos[g], pc.k_pos[g], indexing="ij")
                        for h in heads:
                            count[h].index_put_((qi[allowed[g]], ki[allowed[g]]),
                                                torch.ones((), dtype=torch.int64), accumulate=True)
    return count


def _definition(world, local_len, segs, rates, causal, window):
    S = world * local_len
    m = multiplicity(S, H, segs, rates).round().long()
    i = torch.arange(S)
    if causal:
        m = m * (i[None, :] <= i[:, None])
    if window is not None:
        m = m * ((i[:, None] - i[None, :]) < window)
    return m


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"P{c[0]}-L{c[1]}-{c[2]}-{c[3]}-c{int(c[4])}-w{c[5]}")
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_every_allowed_pair_is_computed_exactly_once(case, layout):
    """Over all ranks' pieces, each (head, query, key) is computed as many times as the pattern's pairs allow it
    (the multiplicity m that makes the bias log m), and nothing else: forward pieces and backward key parts."""
    world, local_len, segs, rates, causal, window = case
    pattern = Pattern.make(segs, rates, causal, window)
    schedules = [_schedule(pattern, local_len, world, p, layout) for p in range(world)]
    want = _definition(world, local_len, segs, rates, causal, window)
    got = _coverage(schedules, world, local_len, layout)
    assert torch.equal(got, want)
    # the backward's key halves cover the same, each in its own half of the source's keys
    got = _coverage(schedules, world, local_len, layout,
                    pieces_of=lambda st: [(kp.lo, kp.hi, kp.pieces) for kp in st.key_parts])
    assert torch.equal(got, want)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_sends_pair_with_receives(layout):
    """At step s rank p sends to p+s exactly when rank p+s receives from p, for random patterns and sizes."""
    rng = random.Random(0)
    for _ in range(12):
        world = rng.randint(2, 5)
        local_len = 2 * rng.randint(1, 8)
        S = world * local_len
        segs = [rng.choice([None, rng.randint(1, S)]) for _ in range(rng.randint(1, 3))]
        rates = [rng.randint(1, 4) for _ in segs]
        pattern = Pattern.make(segs, rates, rng.random() < 0.5, rng.choice([None, rng.randint(1, S)]))
        schedules = [_schedule(pattern, local_len, world, p, layout) for p in range(world)]
        for p in range(world):
            for s in range(1, world):
                to = (p + s) % world
                sends = schedules[p].steps[s].dest == to
                receives = schedules[to].steps[s].source == p
                assert sends == receives, (pattern, world, local_len, p, s)
                assert schedules[p].steps[s].dest in (None, to) and schedules[to].steps[s].source in (None, p)


def test_decode_schedule_costs_one_row_per_query():
    """Decoding with a cache: q_len queries at the keys' last positions cost q_len x keys pairs, not keys^2, and
    cover exactly the last q_len rows of the full schedule."""
    L, q_len = 64, 1
    for segs, rates in ((None, None), ([16, 32], [1, 2])):
        pattern = Pattern.make(segs, rates, True)
        full = _coverage([_schedule(pattern, L, 1, 0, "contiguous")], 1, L, "contiguous")
        dec = _schedule(pattern, L, 1, 0, "contiguous", q_len=q_len)
        pairs = sum(pc.q_pos.numel() * pc.k_pos.shape[1] for pc in dec.steps[0].pieces)
        assert pairs <= 2 * L  # one query row against (at most) every key, per pair
        got = _coverage([dec], 1, L, "contiguous", q_from=L - q_len)
        assert torch.equal(got[:, L - q_len:], full[:, L - q_len:]) and not got[:, : L - q_len].any()
    with pytest.raises(ValueError, match="one rank"):
        _schedule(Pattern.make(), 8, 2, 0, "contiguous", q_len=4)
