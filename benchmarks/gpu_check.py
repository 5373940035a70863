"""One short GPU check: correctness of the CUDA block kernels against the dense definition, and timings.

    PYTHONPATH=. python benchmarks/gpu_check.py --out gpu_check.json

1. ring_dilated_attention (local=True: one GPU, no ring) vs a float64 dense reference, forward and dq/dk/dv, for
   dense, causal, padded, windowed, GQA and dilated patterns, in float32 and bfloat16 (flash and efficient paths).
2. The per-rank block path (fwd+bwd, dense) vs scaled_dot_product_attention with the flash backend, bf16, D=128.
3. Dilated patterns vs dense at the same S: time ratio against the ratio of attended pairs.
4. A patched tiny Llama's forward + backward at P=1 under torch.cuda.set_sync_debug_mode("error"): no host sync.
5. Packed (16 documents) and padded rows, bf16, against their documents run as separate flash calls.
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
        dict(name="packed documents causal+pad", kw=dict(causal=True), pad=True, docs=True),
        dict(name="packed documents window", kw=dict(causal=True, window=37), docs=True),
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
                docs = None
                if c.get("docs"):
                    docs = torch.stack([torch.repeat_interleave(torch.arange(4), torch.tensor(n))
                                        for n in ([50, 10, 100, 96], [128, 1, 27, 100])])
                try:
                    qd, kd, vd = (t.double().requires_grad_() for t in (q, k, v))
                    ref = dense_reference(qd, kd, vd, key_padding_mask=kpm, document_ids=docs, **c["kw"])
                    ref.backward(do.double())
                    qg, kg, vg = (t.to(dev, dtype).requires_grad_() for t in (q, k, v))
                    out = ds_ring.ring_dilated_attention(
                        qg, kg, vg, key_padding_mask=None if kpm is None else kpm.to(dev), local=True,
                        document_ids=None if docs is None else docs.to(dev), **c["kw"])
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


def no_sync(dev):
    """A patched model's forward + backward on one GPU must not read the device on the host (issue 8)."""
    from transformers import AutoModelForCausalLM

    from ds_ring.tools.demo import tiny_llama_config

    torch.manual_seed(0)
    model = ds_ring.patch(AutoModelForCausalLM.from_config(tiny_llama_config()).to(dev, torch.bfloat16))
    ids = torch.randint(1, 100, (2, 1024), device=dev)
    model(input_ids=ids).logits.float().sum().backward()  # warm-up: plans and head indices are built once
    torch.cuda.synchronize()
    try:
        torch.cuda.set_sync_debug_mode("error")
        model(input_ids=ids).logits.float().sum().backward()
        return dict(ok=True)
    except Exception:
        return dict(ok=False, error=traceback.format_exc()[-2000:])
    finally:
        torch.cuda.set_sync_debug_mode(0)


def packed_timings(dev, S):
    """A packed row of 16 documents and a padded batch, bf16, against separate unmasked flash calls (target 1.25)."""
    B, H, D = 1, 16, 128
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(S // 32, 3 * S // 32, (64,), generator=g)
    lengths = lengths[: int((lengths.cumsum(0) <= S).sum())]
    lengths = torch.cat([lengths, torch.tensor([S - int(lengths.sum())])])
    lengths = lengths[lengths > 0]
    ids = torch.repeat_interleave(torch.arange(len(lengths)), lengths)[None].to(dev)
    q, k, v, do = (torch.randn(B, H, S, D, device=dev, dtype=torch.bfloat16, requires_grad=i < 3) for i in range(4))
    spans = list(zip([0] + lengths.cumsum(0)[:-1].tolist(), lengths.cumsum(0).tolist()))

    def packed():
        ds_ring.ring_dilated_attention(q, k, v, causal=True, document_ids=ids, local=True).backward(do)

    def separate():
        with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION):
            for a, b in spans:
                F.scaled_dot_product_attention(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b],
                                               is_causal=True).backward(do[:, :, a:b])

    n = S * 9 // 10
    kpm = torch.zeros(2, S, dtype=torch.bool, device=dev)
    kpm[0, :n], kpm[1, : S // 2] = True, True
    q2, k2, v2, do2 = (torch.randn(2, H, S, D, device=dev, dtype=torch.bfloat16, requires_grad=i < 3) for i in range(4))

    def padded():
        ds_ring.ring_dilated_attention(q2, k2, v2, causal=True, key_padding_mask=kpm, local=True).backward(do2)

    def rows_alone():
        with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION):
            for b, m in ((0, n), (1, S // 2)):
                F.scaled_dot_product_attention(q2[b:b + 1, :, :m], k2[b:b + 1, :, :m], v2[b:b + 1, :, :m],
                                               is_causal=True).backward(do2[b:b + 1, :, :m])

    t = {name: timed(fn) for name, fn in (("packed", packed), ("separate", separate), ("padded", padded),
                                           ("rows_alone", rows_alone))}
    return dict(S=S, documents=len(spans), **{f"{k}_ms": x for k, x in t.items()},
                packed_ratio=t["packed"] / t["separate"], padded_ratio=t["padded"] / t["rows_alone"])


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="gpu_check.json")
    p.add_argument("--sizes", type=int, nargs="+", default=[8192, 16384])
    p.add_argument("--dilated-seq", type=int, default=16384)
    a = p.parse_args()
    dev = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = False
    res = dict(torch=torch.__version__, gpu=torch.cuda.get_device_name(), correctness=correctness(dev))
    for key, fn in (("no_sync", lambda: no_sync(dev)),
                    ("packed", lambda: packed_timings(dev, a.dilated_seq)),
                    ("kernel", lambda: kernel_timings(dev, a.sizes)),
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
