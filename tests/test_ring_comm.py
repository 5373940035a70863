"""Communication follows the pattern: bytes and peers counted on real ranks; empty blocks cost no compute."""

from __future__ import annotations

import torch

from dist_utils import run_distributed

import ds_ring
from ds_ring.op.layouts import get_layout
from ds_ring.op.pattern import Pattern
from ds_ring.op.schedule import make_schedule

B, H, HKV, D, L = 2, 4, 2, 8, 16
P = 4


def _traffic(rank, world, cases):
    out = []
    for kw in cases:
        kw = dict(kw)
        if "documents" in kw:  # global ids of the whole row -> this rank's shard
            kw["document_ids"] = ds_ring.shard_sequence(kw.pop("documents"), 1)
        q = torch.randn(B, H, L, D, requires_grad=True)
        k = torch.randn(B, HKV, L, D, requires_grad=True)
        v = torch.randn(B, HKV, L, D, requires_grad=True)
        kpm = torch.rand(B, L) > 0.2
        with ds_ring.count_comm() as fwd:
            o = ds_ring.ring_dilated_attention(q, k, v, key_padding_mask=kpm, **kw)
        with ds_ring.count_comm() as bwd:
            o.backward(torch.randn_like(o))
        out.append((fwd, bwd))
    return out


CASES = [
    dict(),  # dense
    dict(causal=True),  # causal, contiguous: only earlier ranks
    dict(segment_lengths=[L], dilation_rates=[1]),  # segments inside one shard: no communication
    dict(segment_lengths=[2 * L], dilation_rates=[1]),  # groups of 2 ranks
    dict(segment_lengths=[24], dilation_rates=[1]),  # segments crossing shards at odd places
    dict(causal=True, window=5),  # sliding window shorter than a shard: the previous rank only
]
# Packed rows whose documents are all shorter than a shard (16): [0,10) [10,20) [20,32) [32,41) [41,55) [55,64).
# Boundary 16 cuts a document (ranks 0-1 share it), 32 falls between two (ranks 1-2 share none), 48 cuts one (2-3).
DOCS = torch.repeat_interleave(torch.arange(6), torch.tensor([10, 10, 12, 9, 14, 9])).expand(B, -1)
DOC_CASES = [dict(documents=DOCS), dict(documents=DOCS, causal=True)]


KV_ROW = 2 * B * HKV * D * 4 + B  # bytes per key row on the wire: fp32 k and v, uint8 mask
DKV_ROW = 2 * B * HKV * D * 4  # fp32 dK/dV partial per key row


def _schedule_bytes(kw: dict, rank: int) -> dict[str, dict[str, int]]:
    """The bytes rank's schedule implies: its send rows at each step with a destination (received: its receive rows);
    in backward the same again plus the dK/dV partials of the received rows, and ours coming home."""
    pattern = Pattern.make(kw.get("segment_lengths"), kw.get("dilation_rates"), kw.get("causal", False), kw.get("window"))
    schedule = make_schedule(pattern.pieces(get_layout("contiguous"), L, P, H), rank)
    n = lambda rows: rows[1] - rows[0]  # noqa: E731
    sent = {"kv": sum(KV_ROW * n(st.send_rows) for st in schedule.steps[1:] if st.dest is not None)}
    recv = {"kv": sum(KV_ROW * n(st.recv_rows) for st in schedule.steps[1:] if st.source is not None)}
    dkv_sent = sum(DKV_ROW * (kp.hi - kp.lo) for st in schedule.steps[1:] for kp in st.key_parts)
    dkv_recv = sum(DKV_ROW * (b - a) for st in schedule.steps[1:] for a, b in st.home_parts)
    drop = lambda d: {k: v for k, v in d.items() if v}  # noqa: E731
    return {"fwd_sent": drop(sent), "fwd_recv": drop(recv), "bwd_sent": drop({**sent, "dkv": dkv_sent}),
            "bwd_recv": drop({**recv, "dkv": dkv_recv})}


def test_bytes_and_peers_follow_the_pattern():
    """Only the ranks a pattern connects exchange, and only the key rows the receiver's pieces read."""
    res = run_distributed(_traffic, P, CASES + DOC_CASES)
    kv_packet, dkv_chunk = KV_ROW * L, DKV_ROW * L  # a whole shard

    for rank in range(P):  # what travelled is exactly what the schedule implies, for every pattern
        for kw, (fwd, bwd) in zip(CASES, res[rank][: len(CASES)]):
            want = _schedule_bytes(kw, rank)
            got = {"fwd_sent": fwd.sent_bytes, "fwd_recv": fwd.recv_bytes, "bwd_sent": bwd.sent_bytes,
                   "bwd_recv": bwd.recv_bytes}
            assert got == want, (rank, kw, got, want)

    everyone = set(range(P))
    for rank in range(P):
        fwd, bwd = res[rank][0]  # dense: P-1 chunks out and in, each dK/dV partial home once
        assert fwd.peers == everyone - {rank}
        assert fwd.sent_bytes == {"kv": (P - 1) * kv_packet} and fwd.recv_bytes == {"kv": (P - 1) * kv_packet}
        assert bwd.sent_bytes == {"kv": (P - 1) * kv_packet, "dkv": (P - 1) * dkv_chunk}
        assert bwd.recv_bytes == {"kv": (P - 1) * kv_packet, "dkv": (P - 1) * dkv_chunk}

        fwd, bwd = res[rank][1]  # causal: chunks go to later ranks only, partials come back from them
        later, earlier = P - 1 - rank, rank
        assert fwd.sent_bytes.get("kv", 0) == later * kv_packet
        assert fwd.recv_bytes.get("kv", 0) == earlier * kv_packet
        assert bwd.sent_bytes.get("dkv", 0) == earlier * dkv_chunk
        assert bwd.recv_bytes.get("dkv", 0) == later * dkv_chunk

        fwd, bwd = res[rank][2]  # segment == shard: no traffic at all
        assert not fwd.sent_bytes and not fwd.recv_bytes and not bwd.sent_bytes and not bwd.recv_bytes

        fwd, bwd = res[rank][3]  # segment of two shards: only the partner, which needs every row
        assert fwd.peers == {rank ^ 1}
        assert fwd.sent_bytes == {"kv": kv_packet} and bwd.sent_bytes == {"kv": kv_packet, "dkv": dkv_chunk}

    # w = 24 over shards of 16: segments [0,24) [24,48) [48,64) -> 0-1, 1-2, rank 3 alone. Rows sent: rank 0 all 16
    # (rank 1's rows 16-23 see them), rank 1 rows 16-23 to rank 0 and 24-31 to rank 2, rank 2 all 16 to rank 1.
    expected = {0: ({1}, 16, 8), 1: ({0, 2}, 16, 16 + 16), 2: ({1}, 16, 8), 3: (set(), 0, 0)}
    for rank, (peers, rows_sent, rows_recv) in expected.items():
        fwd, _ = res[rank][4]
        assert fwd.peers == peers, (rank, fwd.peers)
        assert fwd.sent_bytes.get("kv", 0) == rows_sent * KV_ROW and fwd.recv_bytes.get("kv", 0) == rows_recv * KV_ROW

    # Packed documents [0,10) [10,20) [20,32) [32,41) [41,55) [55,64), shards of 16: only ranks whose shards share a
    # document exchange, and only that document's rows: 0 -> 1 rows 10-15, 1 -> 0 rows 16-19 (boundary 32 falls
    # between two documents: ranks 1-2 share none), 2 -> 3 rows 41-47, 3 -> 2 rows 48-54.
    share = {0: {1}, 1: {0}, 2: {3}, 3: {2}}
    rows_out = {0: 6, 1: 4, 2: 7, 3: 7}
    rows_in = {0: 4, 1: 6, 2: 7, 3: 7}
    for rank in range(P):
        (fwd, bwd), (cfwd, cbwd) = res[rank][len(CASES):]
        assert fwd.peers == share[rank] and bwd.peers == share[rank], (rank, fwd.peers, bwd.peers)
        assert fwd.sent_bytes == {"kv": rows_out[rank] * KV_ROW} and fwd.recv_bytes == {"kv": rows_in[rank] * KV_ROW}
        assert bwd.sent_bytes == {"kv": rows_out[rank] * KV_ROW, "dkv": rows_in[rank] * DKV_ROW}
        assert bwd.recv_bytes == {"kv": rows_in[rank] * KV_ROW, "dkv": rows_out[rank] * DKV_ROW}
        later = rank + 1 in share[rank]  # causal: K/V only go forward, dK/dV partials come back
        assert cfwd.sent_bytes.get("kv", 0) == (rows_out[rank] * KV_ROW if later else 0)
        assert cfwd.recv_bytes.get("kv", 0) == (0 if later else rows_in[rank] * KV_ROW)
        assert cbwd.recv_bytes.get("dkv", 0) == (rows_out[rank] * DKV_ROW if later else 0)

    for rank in range(P):  # causal window 5 < shard: the previous rank's last 4 rows only
        fwd, bwd = res[rank][5]
        assert fwd.recv_bytes.get("kv", 0) == (4 * KV_ROW if rank > 0 else 0)
        assert fwd.sent_bytes.get("kv", 0) == (4 * KV_ROW if rank < P - 1 else 0)
        assert bwd.sent_bytes.get("dkv", 0) == (4 * DKV_ROW if rank > 0 else 0)


def _work(schedule):
    """Query-key pairs the kernels are asked to compute, per step, summed over heads of each piece."""
    per_step = []
    for st in schedule.steps:
        per_step.append(sum(pc.q_pos.numel() * pc.k_pos.shape[1] * len(range(pc.head_start, H, pc.head_step))
                            for pc in st.pieces))
    return per_step


def test_empty_blocks_cost_no_compute():
    S = P * L
    for rank in range(P):
        # causal contiguous: nothing from later ranks, and blocks from earlier ranks need no mask
        schedule = make_schedule(Pattern.make(causal=True).pieces(get_layout("contiguous"), L, P, H), rank)
        for s, st in enumerate(schedule.steps[1:], start=1):
            src = (rank - s) % P
            assert (len(st.pieces) == 0) == (src > rank)
            assert (st.source is None) == (src > rank)
            assert all(not pc.causal and pc.seg is None for pc in st.pieces)
        # zigzag causal: every rank has the same amount of work
        zz = sum(_work(make_schedule(Pattern.make(causal=True).pieces(get_layout("zigzag"), L, P, H), rank)))
        assert zz == sum(_work(make_schedule(Pattern.make(causal=True).pieces(get_layout("zigzag"), L, P, H), 0)))
    # segments shorter than a shard: each segment only computes against itself (L * w pairs per head, not L * L)
    schedule = make_schedule(Pattern.make([4], [1]).pieces(get_layout("contiguous"), L, P, H), 0)
    assert _work(schedule) == [H * L * 4] + [0] * (P - 1)
    # dilation r: every head reads 1/r of the rows of each segment, so 1/r^2 of the pairs
    schedule = make_schedule(Pattern.make([S], [4]).pieces(get_layout("contiguous"), L, P, H), 0)
    assert sum(_work(schedule)) == H * (L // 4) * (S // 4)


def _gather_job(rank, world):
    out = []
    for layout in ("contiguous", "zigzag"):
        for dim in (1, 2):
            gen = torch.Generator().manual_seed(3)
            full = torch.randn(2, 8 * world, 8 * world, 3, generator=gen)
            weight = torch.randn(full.shape, generator=gen)
            local = ds_ring.shard_sequence(full, dim, layout=layout).requires_grad_()
            gathered = ds_ring.gather_sequence(local, dim, layout=layout)
            (gathered * weight).sum().backward()  # every rank computes the same loss from the gathered tensor
            idx = get_layout(layout).positions(local.shape[dim], world, rank)
            out.append((torch.equal(gathered, full), torch.allclose(local.grad, world * weight.index_select(dim, idx))))
    return out


def test_shard_and_gather_round_trip_and_gradient():
    """gather_sequence(shard_sequence(x)) == x in both layouts; its backward sums every rank's gradient (the
    adjoint of all-gather), so a loss computed on every rank counts world_size times."""
    for rank_result in run_distributed(_gather_job, 3):
        assert all(same and grad_ok for same, grad_ok in rank_result), rank_result
