"""One short GPU check: correctness of the CUDA block kernels against the dense definition, and timings.

    PYTHONPATH=. python benchmarks/gpu_check.py --out gpu_check.json

1. ring_dilated_attention (local=True: one GPU, no ring) vs a float64 dense reference, forward and dq/dk/dv, for
   dense, causal, padded, windowed, GQA and dilated patterns, in float32 and bfloat16 (flash and efficient paths).
2. The per-rank block path (fwd+bwd, dense) vs scaled_dot_product_attention with the flash backend, bf16, D=128.
3. Dilated patterns vs dense at the same S: time ratio against the ratio of attended pairs.
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from reference import dense_reference, multiplicity  # noqa: E402

import ds_ring  # noqa: E402


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30)).item()


def correctness(dev):
    rows = []
    S, D, B = 256, 64, 2
    cases = [
        dict(name="dense", kw={}),
        dict(name="causal", kw=dict(causal=True)),
        dict(name="causal+padding", kw=dict(causal=True), pad=True),
        dict(name="window+padding", kw=dict(causal=True, window=37), pad=True),
        dict(name="longnet", kw=dict(segment_lengths=[64, 128, 256], dilation_rates=[1, 2, 4])),
        dict(name="longnet causal+pad", kw=dict(segment_lengths=[48, 100], dilation_rates=[1, 2], causal=True),
             pad=True),
    ]
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        for c in cases:
            for hq, hkv in ((8, 8), (8, 2)):
                g = torch.Generator(device="cpu").manual_seed(0)
                q, k, v, do = (torch.randn(B, h, S, D, generator=g) for h in (hq, hkv, hkv, hq))
                kpm = None
                if c.get("pad"):
                    kpm = torch.ones(B, S, dtype=torch.bool)
                    kpm[0, :40] = False
                    kpm[1, 200:] = False
                try:
                    qd, kd, vd = (t.double().requires_grad_() for t in (q, k, v))
                    ref = dense_reference(qd, kd, vd, key_padding_mask=kpm, **c["kw"])
                    ref.backward(do.double())
                    qg, kg, vg = (t.to(dev, dtype).requires_grad_() for t in (q, k, v))
                    out = ds_ring.ring_dilated_attention(
                        qg, kg, vg, key_padding_mask=None if kpm is None else kpm.to(dev), local=True, **c["kw"])
                    out.backward(do.to(dev, dtype))
                    errs = [rel(a.cpu(), b) for a, b in ((out, ref), (qg.grad, qd.grad), (kg.grad, kd.grad),
                                                          (vg.grad, vd.grad))]
                    ok = all(e < tol for e in errs)
                    rows.append(dict(case=c["name"], dtype=str(dtype), heads=f"{hq}/{hkv}", errs=errs, ok=ok))
                except Exception:
                    rows.append(dict(case=c["name"], dtype=str(dtype), heads=f"{hq}/{hkv}", ok=False,
                                     error=traceback.format_exc()[-1500:]))
                print(rows[-1], flush=True)
    return rows


def timed(fn, iters=10, warmup=3):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(iters):
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return times[len(times) // 2]


def kernel_timings(dev, sizes):
    rows = []
    B, H, D = 1, 16, 128
    for S in sizes:
        for causal in (False, True):
            q, k, v, do = (torch.randn(B, H, S, D, device=dev, dtype=torch.bfloat16, requires_grad=i < 3)
                           for i in range(4))

            def ours():
                ds_ring.ring_dilated_attention(q, k, v, causal=causal, local=True).backward(do)

            def sdpa():
                with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION):
                    F.scaled_dot_product_attention(q, k, v, is_causal=causal).backward(do)

            kpm = torch.ones(B, S, dtype=torch.bool, device=dev)
            kpm[:, : S // 10] = False  # left padding: the masked (memory-efficient kernel) path

            def ours_padded():
                ds_ring.ring_dilated_attention(q, k, v, causal=causal, key_padding_mask=kpm, local=True).backward(do)

            t_sdpa, t_ours, t_pad = timed(sdpa), timed(ours), timed(ours_padded)
            flops = 4 * B * H * S * S * D * 3.5 / (2 if causal else 1)  # fwd 2 matmuls + bwd 5
            rows.append(dict(S=S, causal=causal, sdpa_ms=t_sdpa, ds_ring_ms=t_ours, ratio=t_ours / t_sdpa,
                             ds_ring_tflops=flops / t_ours / 1e9, ds_ring_padded_ms=t_pad))
            print(rows[-1], flush=True)
    return rows


def dilated_timings(dev, S):
    rows = []
    B, H, D = 1, 16, 128
    q, k, v, do = (torch.randn(B, H, S, D, device=dev, dtype=torch.bfloat16, requires_grad=i < 3) for i in range(4))
    dense = timed(lambda: ds_ring.ring_dilated_attention(q, k, v, local=True).backward(do))
    patterns = [([S // 8], [1]), ([S // 4, S // 2, S], [1, 2, 4]), ([S // 2], [2]), ([S], [4]), ([S // 16], [1])]
    for segs, rates in patterns:
        m = multiplicity(2048, 16, [s * 2048 // S for s in segs], rates)  # pair fraction from a scaled copy
        frac = (m.sum() / (16 * 2048 * 2048)).item()
        t = timed(lambda: ds_ring.ring_dilated_attention(q, k, v, segs, rates, local=True).backward(do))
        rows.append(dict(S=S, segments=segs, rates=rates, pair_fraction=frac, time_ratio=t / dense,
                         ratio_over_fraction=t / dense / frac))
        print(rows[-1], flush=True)
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="gpu_check.json")
    p.add_argument("--sizes", type=int, nargs="+", default=[8192, 16384])
    p.add_argument("--dilated-seq", type=int, default=16384)
    a = p.parse_args()
    dev = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = False
    res = dict(torch=torch.__version__, gpu=torch.cuda.get_device_name(), correctness=correctness(dev))
    for key, fn in (("kernel", lambda: kernel_timings(dev, a.sizes)),
                    ("dilated", lambda: dilated_timings(dev, a.dilated_seq))):
        try:
            res[key] = fn()
        except Exception:
            res[key] = traceback.format_exc()[-2000:]
            print(res[key], flush=True)
    Path(a.out).write_text(json.dumps(res, indent=1))
    bad = [r for r in res["correctness"] if not r["ok"]]
    print(f"correctness: {len(res['correctness']) - len(bad)} passed, {len(bad)} failed")


if __name__ == "__main__":
    main()
