"""One prepared GPU check (about 10 minutes on one GPU): every block path against the float64 definition, then timings.

    PYTHONPATH=. python benchmarks/gpu_check.py --out gpu_check.json          # on a CUDA machine
    PYTHONPATH=. python benchmarks/gpu_check.py --dry-run                     # CPU, tiny sizes: the script's own check

1. Correctness: ring_dilated_attention (local=True: one device, no ring) vs the dense float64 definition computed on
   the CPU (tests/reference.py; packed rows against each document alone), forward and dq/dk/dv, for dense, causal,
   padded, windowed, GQA, dilated and packed (dense or dilated) cases, fp32 and bf16, on each block path: the table (``kernels.block_path``), Flex forced, the
   memory-efficient kernel forced. Each row records which paths served its blocks.
2. Dense: the block path (flash) vs scaled_dot_product_attention with the flash backend, bf16, D=128; padded rows
   (Flex) on the same shapes.
3. Padded and packed batches vs their documents/rows alone through dense flash (target <= 1.25x); a packed batch
   of 8 documents per row through the Flex path with the document ids as a term of its mask (one call per chunk's
   diagonal block) and through one flash call per document, against its documents alone.
4. Dilated patterns vs dense at the same S: time ratio over the fraction f of attended pairs (target <= 1.5 f).
5. A patched tiny Llama's training step (forward, backward, SGD step), padded batch, under
   torch.cuda.set_sync_debug_mode("error"): no host sync.
Compile time is reported apart: every timed candidate's first call (which compiles the Flex kernels of its shapes)
is timed on its own, and the medians exclude it. A section or row that would start past --budget-s (default 540 s)
is skipped and says so; correctness stops at 45 % of the budget.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from reference import dense_reference, each_document_alone, multiplicity  # noqa: E402

import ds_ring  # noqa: E402
from ds_ring.op import kernels  # noqa: E402

START = time.perf_counter()
TIMING = dict(iters=10, warmup=2)  # the dry run takes 1 and 1


def elapsed() -> float:
    return time.perf_counter() - START


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30)).item()


@contextlib.contextmanager
def served_paths():
    """Count which block path served each block inside the context (wraps kernels.block_path)."""
    counts: collections.Counter = collections.Counter()
    original = kernels.block_path

    def counting(q, pairs, key_padding):
        path = original(q, pairs, key_padding)
        counts[path] += 1
        return path

    kernels.block_path = counting
    try:
        yield counts
    finally:
        kernels.block_path = original


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, dev):
    """(median ms of TIMING["iters"] calls, ms of the first call): the first call compiles what it needs."""
    iters, warmup = TIMING["iters"], TIMING["warmup"]
    sync(dev)
    t0 = time.perf_counter()
    fn()
    sync(dev)
    first = (time.perf_counter() - t0) * 1e3
    for _ in range(warmup - 1):
        fn()
    times = []
    for _ in range(iters):
        if dev.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return times[len(times) // 2], first


CASES = [
    dict(name="dense", kw={}),
    dict(name="causal", kw=dict(causal=True)),
    dict(name="padding", kw={}, pad=True),
    dict(name="causal+padding", kw=dict(causal=True), pad=True),
    dict(name="window+padding", kw=dict(causal=True, window=37), pad=True),
    dict(name="longnet", kw=dict(segment_lengths=[64, 128, 256], dilation_rates=[1, 2, 4])),
    dict(name="longnet causal+pad", kw=dict(segment_lengths=[48, 100], dilation_rates=[1, 2], causal=True), pad=True),
    dict(name="packed documents causal+pad", kw=dict(causal=True), pad=True, docs=True),
    dict(name="packed documents window", kw=dict(causal=True, window=37), docs=True),
    dict(name="packed documents longnet causal+pad", kw=dict(segment_lengths=[16, 32], dilation_rates=[1, 2],
                                                             causal=True), pad=True, docs=True),
]


def correctness(dev, S, paths, dtypes, deadline):
    rows = []
    D, B = 64, 2
    for path in paths:
        for dtype, tol in dtypes:
            for c in CASES:
                for hq, hkv in ((8, 8), (8, 2)):
                    row = dict(case=c["name"], path=path or "table", dtype=str(dtype), heads=f"{hq}/{hkv}")
                    if elapsed() > deadline:
                        rows.append(dict(row, ok=None, skipped="over the correctness budget"))
                        continue
                    g = torch.Generator(device="cpu").manual_seed(0)
                    q, k, v, do = (torch.randn(B, h, S, D, generator=g) for h in (hq, hkv, hkv, hq))
                    kpm = None
                    if c.get("pad"):
                        kpm = torch.ones(B, S, dtype=torch.bool)
                        kpm[0, : S // 6] = False
                        kpm[1, S * 3 // 4 :] = False
                    docs = None
                    if c.get("docs"):
                        cuts = [[S // 5, S // 25, S * 2 // 5], [S // 2, 1, S // 10]]
                        docs = torch.stack([torch.repeat_interleave(torch.arange(4), torch.tensor(n + [S - sum(n)]))
                                            for n in cuts])
                    try:
                        if docs is not None:  # each document alone (a dilated pattern counts from its start)
                            kw = dict(c["kw"])
                            want = each_document_alone(q, k, v, do, docs, kw.pop("segment_lengths", None),
                                                       kw.pop("dilation_rates", None), key_padding_mask=kpm, **kw)
                        else:
                            qd, kd, vd = (t.double().requires_grad_() for t in (q, k, v))
                            ref = dense_reference(qd, kd, vd, key_padding_mask=kpm, **c["kw"])
                            ref.backward(do.double())
                            want = [ref, qd.grad, kd.grad, vd.grad]
                        qg, kg, vg = (t.to(dev, dtype).requires_grad_() for t in (q, k, v))
                        with kernels.force_path(path), served_paths() as served:
                            out = ds_ring.ring_dilated_attention(
                                qg, kg, vg, key_padding_mask=None if kpm is None else kpm.to(dev), local=True,
                                document_ids=None if docs is None else docs.to(dev), **c["kw"])
                            out.backward(do.to(dev, dtype))
                        errs = [rel(a.cpu(), b) for a, b in zip((out, qg.grad, kg.grad, vg.grad), want)]
                        rows.append(dict(row, errs=errs, ok=all(e < tol for e in errs), served=dict(served)))
                    except Exception:
                        rows.append(dict(row, ok=False, error=traceback.format_exc()[-1500:]))
                    print(rows[-1], flush=True)
    return rows


def kernel_timings(dev, dtype, sizes, deadline):
    """Dense and causal: ds_ring's block path vs SDPA flash; padded rows (the Flex path on CUDA) on the same shapes."""
    rows = []
    B, H, D = 1, 16, 128
    for S in sizes:
        for causal in (False, True):
            if elapsed() > deadline:
                rows.append(dict(S=S, causal=causal, skipped=f"{elapsed():.0f}s elapsed, past the budget"))
                continue
            q, k, v, do = (torch.randn(B, H, S, D, device=dev, dtype=dtype, requires_grad=i < 3) for i in range(4))
            kpm = torch.ones(B, S, dtype=torch.bool, device=dev)
            kpm[:, : S // 10] = False  # left padding

            def ours():
                ds_ring.ring_dilated_attention(q, k, v, causal=causal, local=True).backward(do)

            def sdpa():
                with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION):
                    F.scaled_dot_product_attention(q, k, v, is_causal=causal).backward(do)

            def ours_padded():
                ds_ring.ring_dilated_attention(q, k, v, causal=causal, key_padding_mask=kpm, local=True).backward(do)

            (t_sdpa, _), (t_ours, c_ours), (t_pad, c_pad) = timed(sdpa, dev), timed(ours, dev), timed(ours_padded, dev)
            flops = 4 * B * H * S * S * D * 3.5 / (2 if causal else 1)  # fwd 2 matmuls + bwd 5
            rows.append(dict(S=S, causal=causal, sdpa_ms=t_sdpa, ds_ring_ms=t_ours, ratio=t_ours / t_sdpa,
                             target_ratio=1.05, ds_ring_tflops=flops / t_ours / 1e9, ds_ring_padded_ms=t_pad,
                             padded_over_dense=t_pad / t_ours, first_call_ms=dict(dense=c_ours, padded=c_pad)))
            print(rows[-1], flush=True)
    return rows


def _documents(S, g):
    lengths = torch.randint(S // 32, 3 * S // 32, (64,), generator=g)
    lengths = lengths[: int((lengths.cumsum(0) <= S).sum())]
    lengths = torch.cat([lengths, torch.tensor([S - int(lengths.sum())])])
    return lengths[lengths > 0]


def packed_timings(dev, dtype, S):
    """A packed row of ~16 documents and a padded batch against their documents / rows alone through dense flash."""
    B, H, D = 1, 16, 128
    g = torch.Generator().manual_seed(0)
    lengths = _documents(S, g)
    ids = torch.repeat_interleave(torch.arange(len(lengths)), lengths)[None].to(dev)
    q, k, v, do = (torch.randn(B, H, S, D, device=dev, dtype=dtype, requires_grad=i < 3) for i in range(4))
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
    q2, k2, v2, do2 = (torch.randn(2, H, S, D, device=dev, dtype=dtype, requires_grad=i < 3) for i in range(4))

    def padded():
        ds_ring.ring_dilated_attention(q2, k2, v2, causal=True, key_padding_mask=kpm, local=True).backward(do2)

    def rows_alone():
        with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION):
            for b, m in ((0, n), (1, S // 2)):
                F.scaled_dot_product_attention(q2[b:b + 1, :, :m], k2[b:b + 1, :, :m], v2[b:b + 1, :, :m],
                                               is_causal=True).backward(do2[b:b + 1, :, :m])

    t, first = {}, {}
    for name, fn in (("packed", packed), ("separate", separate), ("padded", padded), ("rows_alone", rows_alone)):
        with served_paths() as served:
            t[name], first[name] = timed(fn, dev)
        first[name + "_paths"] = dict(served)
    return dict(S=S, documents=len(spans), **{f"{k}_ms": x for k, x in t.items()}, first_call_ms=first,
                packed_ratio=t["packed"] / t["separate"], padded_ratio=t["padded"] / t["rows_alone"],
                target_ratio=1.25)


def packed_batch_timings(dev, dtype, S, per_row=8):
    """A packed batch (2 rows of ``per_row`` documents each, causal) through the table's path (on CUDA: each chunk's
    diagonal block ONE Flex call with the document ids as a term, kernels.fused_documents) and through one piece
    per document (kernels.fuse_documents(False): flash per document), against its documents alone through dense
    flash (target <= 1.25x)."""
    B, H, D = 2, 16, 128
    g = torch.Generator().manual_seed(1)
    rows = []
    for _ in range(B):  # per_row documents of random lengths, multiples of 8 tokens
        cuts = torch.randperm(S // 8 - 1, generator=g)[: per_row - 1].sort().values + 1
        edges = torch.cat([torch.tensor([0]), cuts * 8, torch.tensor([S])])
        rows.append(edges.diff())
    ids = torch.stack([torch.repeat_interleave(torch.arange(per_row), n) for n in rows]).to(dev)
    spans = [(b, a, e) for b, n in enumerate(rows)
             for a, e in zip([0] + n.cumsum(0)[:-1].tolist(), n.cumsum(0).tolist())]
    q, k, v, do = (torch.randn(B, H, S, D, device=dev, dtype=dtype, requires_grad=i < 3) for i in range(4))

    def packed():
        ds_ring.ring_dilated_attention(q, k, v, causal=True, document_ids=ids, local=True).backward(do)

    def per_document():
        with kernels.fuse_documents(False):
            packed()

    def alone():
        with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION):
            for b, a, e in spans:
                F.scaled_dot_product_attention(q[b:b + 1, :, a:e], k[b:b + 1, :, a:e], v[b:b + 1, :, a:e],
                                               is_causal=True).backward(do[b:b + 1, :, a:e])

    t, first, paths = {}, {}, {}
    for name, fn in (("alone", alone), ("fused", packed), ("per_document", per_document)):
        with served_paths() as served:
            t[name], first[name] = timed(fn, dev)
        paths[name] = dict(served)
    return dict(S=S, batch=B, documents_per_row=per_row, lengths=[n.tolist() for n in rows],
                **{f"{k}_ms": x for k, x in t.items()}, first_call_ms=first, paths=paths,
                fused_ratio=t["fused"] / t["alone"], per_document_ratio=t["per_document"] / t["alone"],
                target_ratio=1.25)


def dilated_timings(dev, dtype, S, causals, deadline):
    rows = []
    B, H, D = 1, 16, 128
    q, k, v, do = (torch.randn(B, H, S, D, device=dev, dtype=dtype, requires_grad=i < 3) for i in range(4))
    patterns = [([S // 8], [1]), ([S // 4, S // 2, S], [1, 2, 4]), ([S // 16, S // 4, S], [1, 4, 16]), ([S // 2], [2]),
                ([S], [4]), ([S // 4], [2])]
    n = min(S, 2048)  # pair fraction from a scaled copy of the pattern (the definition, brute force)
    i = torch.arange(n)
    for causal in causals:
        dense, _ = timed(lambda: ds_ring.ring_dilated_attention(q, k, v, causal=causal, local=True).backward(do), dev)
        for segs, rates in patterns:
            if elapsed() > deadline:
                rows.append(dict(S=S, causal=causal, segments=segs, rates=rates,
                                 skipped=f"{elapsed():.0f}s elapsed, past the budget"))
                continue
            m = multiplicity(n, H, [s * n // S for s in segs], rates) > 0
            if causal:
                m = m & (i[None, :] <= i[:, None])
            frac = (m.sum() / (H * (n * (n + 1) // 2 if causal else n * n))).item()
            with served_paths() as served:
                t, first = timed(lambda: ds_ring.ring_dilated_attention(q, k, v, segs, rates, causal=causal,
                                                                          local=True).backward(do), dev)
            rows.append(dict(S=S, causal=causal, segments=segs, rates=rates, pair_fraction=frac, time_ratio=t / dense,
                             ratio_over_fraction=t / dense / frac, target=1.5, first_call_ms=first,
                             first_call_paths=dict(served)))
            print(rows[-1], flush=True)
    return rows


def no_sync_step(dev, dtype, S):
    """A patched model's training step (forward, backward, SGD step) on a padded batch must not read the device on
    the host: plans, BlockMasks and head indices are built in the warm-up step, then kept."""
    from transformers import AutoModelForCausalLM

    from ds_ring.tools.demo import tiny_llama_config

    torch.manual_seed(0)
    model = ds_ring.patch(AutoModelForCausalLM.from_config(tiny_llama_config()).to(dev, dtype))
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    ids = torch.randint(1, 100, (2, S), device=dev)
    mask = torch.ones(2, S, dtype=torch.long, device=dev)
    mask[1, : S // 4] = 0  # left padding: padded blocks (the Flex path on CUDA)

    def step():
        model(input_ids=ids, attention_mask=mask, labels=ids, use_cache=False).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    with served_paths() as served:
        step()  # warm-up
    sync(dev)
    if dev.type != "cuda":
        return dict(ok=None, note="no CUDA: the step ran, the sync check needs a GPU", paths=dict(served))
    try:
        torch.cuda.set_sync_debug_mode("error")
        step()
        return dict(ok=True, paths=dict(served))
    except Exception:
        return dict(ok=False, error=traceback.format_exc()[-2000:], paths=dict(served))
    finally:
        torch.cuda.set_sync_debug_mode(0)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="gpu_check.json")
    p.add_argument("--sizes", type=int, nargs="+", default=[8192, 16384], help="S of the dense timings")
    p.add_argument("--dilated-seq", type=int, default=16384, help="S of the dilated and packed timings")
    p.add_argument("--budget-s", type=float, default=None,
                   help="skip sections that would start after this (default 540 s; none in a dry run)")
    p.add_argument("--dry-run", action="store_true",
                   help="CPU, tiny sizes, the CPU-runnable paths (table, Flex eager): checks the script itself")
    a = p.parse_args()
    cuda = torch.cuda.is_available() and not a.dry_run
    if not cuda and not a.dry_run:
        p.error("no CUDA device: run on a GPU machine, or pass --dry-run to check the script on the CPU")
    dev = torch.device("cuda" if cuda else "cpu")
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = False
        paths, dtypes, S_corr = [None, "flex", "efficient"], [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)], 256
        sizes, seq, causals, dtype, step_len = a.sizes, a.dilated_seq, (False, True), torch.bfloat16, 1024
    else:  # every section, tiny: what can be checked without a GPU
        paths, dtypes, S_corr = [None, "flex"], [(torch.float32, 1e-5)], 48
        sizes, seq, causals, dtype, step_len = [128], 256, (True,), torch.float32, 64
        TIMING.update(iters=1, warmup=1)
    if a.budget_s is None:
        a.budget_s = 540.0 if cuda else float("inf")
    res = dict(torch=torch.__version__, device=torch.cuda.get_device_name() if cuda else "cpu (dry run)",
               budget_s=a.budget_s)
    # correctness first and within 45 % of the budget: the timings need the rest
    res["correctness"] = correctness(dev, S_corr, paths, dtypes, deadline=0.45 * a.budget_s)
    for key, fn in (("no_sync_step", lambda: no_sync_step(dev, dtype, step_len)),
                    ("packed", lambda: packed_timings(dev, dtype, seq)),
                    ("packed_batch", lambda: packed_batch_timings(dev, dtype, seq)),
                    ("kernel", lambda: kernel_timings(dev, dtype, sizes, a.budget_s)),
                    ("dilated", lambda: dilated_timings(dev, dtype, seq, causals, a.budget_s))):
        if elapsed() > a.budget_s:
            res[key] = f"skipped: {elapsed():.0f}s elapsed, budget {a.budget_s:.0f}s"
        else:
            try:
                res[key] = fn()
            except Exception:
                res[key] = traceback.format_exc()[-2000:]
        print(key, res[key], flush=True)
        res[f"{key}_done_at_s"] = elapsed()
    res["total_s"] = elapsed()
    Path(a.out).write_text(json.dumps(res, indent=1, default=str))
    bad = [r for r in res["correctness"] if r["ok"] is False]
    skipped = [r for r in res["correctness"] if r["ok"] is None]
    print(f"correctness: {len(res['correctness']) - len(bad) - len(skipped)} passed, {len(bad)} failed, "
          f"{len(skipped)} skipped; total {res['total_s']:.0f}s; wrote {a.out}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
