"""Per-rank memory of the ring op: an analytic estimate, and a measurement helper that checks it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per rank for one attention call (forward + backward)."""

    saved_bytes: int  # what autograd keeps between forward and backward: q, k, v, mask, out, lse
    forward_peak_bytes: int  # peak the op allocates during forward
    backward_peak_bytes: int  # peak the op allocates from forward's start to backward's end (out, lse included)
    single_rank_peak_bytes: int  # the same op with the whole sequence on one rank
    world_size: int
    ring_buffer_bytes: int = 0  # K/V (+ mask) receive buffers, part of both peaks
    output_bytes: int = 0  # out and lse: part of saved_bytes AND of backward_peak_bytes (count them once)

    @property
    def peak_bytes(self) -> int:
        """Peak bytes the op allocates in forward + backward (the caller's q, k, v, dout not included)."""
        return max(self.forward_peak_bytes, self.backward_peak_bytes)

    @property
    def memory_reduction_factor(self) -> float:
        """How many times less memory a rank needs than one rank holding the whole sequence."""
        return self.single_rank_peak_bytes / self.peak_bytes


@dataclass(frozen=True)
class KernelConstants:
    """What the block kernel allocates, in bytes per query element (q's numel): forward (output and scratch),
    backward against all keys, and backward against half the keys (the ring steps). A value is
    ``fixed + per_byte * e`` for elements of ``e`` bytes."""

    name: str
    source: str  # where the numbers come from, as ``ds-ring plan`` prints it
    fwd: tuple[float, float]
    bwd: tuple[float, float]
    bwd_half_keys: tuple[float, float]

    def at(self, e: int) -> tuple[float, float, float]:
        return tuple(a + b * e for a, b in (self.fwd, self.bwd, self.bwd_half_keys))


KERNELS = {
    # torch's CPU flash kernel, measured with ``measure_peak_bytes`` at L <= 4096 for fp32 and bf16 (its output and
    # fp32 scratch do not depend on the dtype). The whole estimate agrees with measurements within 20% for shards of
    # L <= 2048 (tests/test_memory.py); the kernel's scratch grows more slowly than L, so at larger L the estimate
    # drifts (benchmarks/bench_memory.py).
    "cpu": KernelConstants("cpu", "measured on CPU (torch's flash kernel)", (8.4, 0.0), (20.0, 0.0), (12.0, 0.0)),
    # CUDA FlashAttention-2 / cuDNN / FlexAttention through SDPA: forward allocates its output (e) and an fp32 lse
    # (4 / head_dim per element, at most 0.5); backward dq (e), its fp32 accumulator (4), dk/dv (at most e each per
    # query element with GQA), the fp32 softmax-dot term (0.5). COUNTED from the kernels' documented outputs, NOT
    # measured: no GPU has checked these.
    "cuda": KernelConstants("cuda", "UNVERIFIED: counted for CUDA flash / FlexAttention kernels, not measured",
                            (0.5, 1.0), (4.5, 3.0), (4.5, 3.0)),
}


def _peaks(B, Hq, Hkv, L, D, e, has_mask, comm_buffers, kernels: KernelConstants = KERNELS["cpu"]):
    Q, K, R = B * Hq * L * D, B * Hkv * L * D, B * Hq * L
    M = B * L if has_mask else 0
    k_fwd, k_bwd, k_bwd_half = kernels.at(e)
    kv = comm_buffers * (2 * K * e + M)  # K/V (+ mask) receive buffers
    saved = (Q + 2 * K) * e + M + Q * e + 4 * R  # q, k, v, mask, out, lse
    ring = comm_buffers > 0
    # One rank keeps the kernel's own outputs; a ring merges blocks into fp32 accumulators (plus the merge's
    # temporaries) and receives K/V into buffers.
    fwd = k_fwd * Q
    if ring:
        fwd += 4 * Q + 4 * R + M + kv + (0 if e == 4 else 4 * Q) + 4 * Q + 12 * R
    # out and lse from forward, fp32 dq/dk/dv (ring only), receive buffers, then the local block (all keys) ...
    held = Q * e + 8 * R + kv + (4 * Q + 8 * K if ring else 0)
    bwd = held + k_bwd * Q + (4 * K if ring else 0)
    if ring:  # ... and ring steps: dK/dV halves (one computed, one travelling, one arriving), fp32
        bwd = max(bwd, held + k_bwd_half * Q + 12 * K)
    return saved, int(fwd), int(bwd), Q * e + 4 * R  # ..., out + lse


def memory_estimate(
    seq_len: int,
    batch_size: int,
    num_heads: int,
    head_dim: int,
    world_size: int,
    *,
    num_kv_heads: int | None = None,
    dtype: torch.dtype = torch.bfloat16,
    key_padding_mask: bool = False,
    communicates: bool = True,
    kernels: str = "cpu",
) -> MemoryEstimate:
    """Estimate the per-rank bytes of ``ring_dilated_attention`` forward + backward on a sequence of ``seq_len``.

    The estimate is for the dense pattern (dilated patterns need less: their pieces are smaller). ``communicates``:
    False when the pattern needs no exchange (segments inside one shard), which drops the receive buffers.
    ``kernels``: whose block-kernel constants (``KERNELS``): ``"cpu"`` (measured) or ``"cuda"`` (counted, unverified).
    """
    if kernels not in KERNELS:
        raise ValueError(f"memory_estimate: kernels must be one of {sorted(KERNELS)}, got {kernels!r}")
    kc = KERNELS[kernels]
    if seq_len % world_size:
        raise ValueError(f"seq_len={seq_len} must be divisible by world_size={world_size}")
    Hkv = num_heads if num_kv_heads is None else num_kv_heads
    e = torch.empty((), dtype=dtype).element_size()
    L = seq_len // world_size
    bufs = min(2, world_size - 1) if communicates else 0
    saved, fwd, bwd, outputs = _peaks(batch_size, num_heads, Hkv, L, head_dim, e, key_padding_mask, bufs, kc)
    _, f1, b1, _ = _peaks(batch_size, num_heads, Hkv, seq_len, head_dim, e, key_padding_mask, 0, kc)
    buffers = bufs * batch_size * L * (2 * Hkv * head_dim * e + (1 if key_padding_mask else 0))
    return MemoryEstimate(saved, fwd, bwd, max(f1, b1), world_size, buffers, outputs)


def measure_peak_bytes(fn: Callable[[], object]) -> int:
    """Peak bytes allocated on the CPU while ``fn()`` runs, above what was allocated before.

    Reads the allocator's own allocation and free events, in time order, from the torch profiler.
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]" and e.device_type().name
              == "CPU"]
    live = peak = 0
    for ev in sorted(events, key=lambda e: e.start_ns()):
        live += ev.nbytes()
        peak = max(peak, live)
    return peak
