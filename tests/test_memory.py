"""Memory is O(S/P) per rank: bytes saved for backward, peak growth under weak scaling, and the estimate."""

from __future__ import annotations

import torch

from dist_utils import run_distributed

import ds_ring
from ds_ring.planning.op_memory import measure_peak_bytes, memory_estimate

B, H, HKV, D = 1, 4, 2, 32


def _inputs(L, dtype=torch.float32):
    q = torch.randn(B, H, L, D, dtype=dtype, requires_grad=True)
    k = torch.randn(B, HKV, L, D, dtype=dtype, requires_grad=True)
    v = torch.randn(B, HKV, L, D, dtype=dtype, requires_grad=True)
    return q, k, v, torch.randn(B, H, L, D, dtype=dtype), torch.rand(B, L) > 0.1


def _saved_bytes(L, causal):
    q, k, v, _, kpm = _inputs(L)
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        ds_ring.ring_dilated_attention(q, k, v, causal=causal, key_padding_mask=kpm)
    return sum(saved)


def _peak(L, dtype):
    q, k, v, dout, _ = _inputs(L, dtype)

    def step():
        ds_ring.ring_dilated_attention(q, k, v).backward(dout)

    step()  # warm: plans are cached after the first call
    q.grad = k.grad = v.grad = None
    return measure_peak_bytes(step)


def _job(rank, world, S_fixed, L_fixed):
    return {
        "saved": _saved_bytes(S_fixed // world, causal=True),
        "peak_f32": _peak(L_fixed, torch.float32),
        "peak_bf16": _peak(L_fixed, torch.bfloat16),
    }


def test_memory_is_o_of_s_over_p():
    S_fixed, L_fixed = 1024, 1024
    single = {"saved": _saved_bytes(S_fixed, causal=True)}
    by_world = {1: [single]}
    for world in (2, 4):
        by_world[world] = run_distributed(_job, world, S_fixed, L_fixed)

    # (a) autograd saves only local tensors: P=4 keeps at most 0.3 of what one rank keeps for the same S
    saved = {w: max(r["saved"] for r in res) for w, res in by_world.items()}
    assert saved[4] <= 0.3 * saved[1], saved
    assert saved[2] <= 0.55 * saved[1], saved

    # (b) weak scaling: with the shard length fixed, more ranks do not grow the per-rank peak
    for key in ("peak_f32", "peak_bf16"):
        p2, p4 = max(r[key] for r in by_world[2]), max(r[key] for r in by_world[4])
        assert p4 <= 1.15 * p2, (key, p2, p4)

    # the analytic estimate agrees with the measurement within 20%
    for world in (2, 4):
        for key, dtype in (("peak_f32", torch.float32), ("peak_bf16", torch.bfloat16)):
            measured = max(r[key] for r in by_world[world])
            est = memory_estimate(L_fixed * world, B, H, D, world, num_kv_heads=HKV, dtype=dtype).peak_bytes
            assert 0.8 <= measured / est <= 1.2, (world, key, measured, est)


def test_estimate_single_rank_matches_measurement_and_reduction_factor():
    S = 2048
    measured = _peak(S, torch.float32)
    est1 = memory_estimate(S, B, H, D, 1, num_kv_heads=HKV, dtype=torch.float32)
    assert 0.8 <= measured / est1.peak_bytes <= 1.2, (measured, est1.peak_bytes)
    est4 = memory_estimate(S, B, H, D, 4, num_kv_heads=HKV, dtype=torch.float32)
    assert est4.single_rank_peak_bytes == est1.peak_bytes
    assert abs(est4.memory_reduction_factor - est1.peak_bytes / est4.peak_bytes) < 1e-9
    assert est4.memory_reduction_factor > 2.0
