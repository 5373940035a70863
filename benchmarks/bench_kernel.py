"""Block kernel forward+backward: ds_ring's local dense path vs torch's scaled_dot_product_attention.

ds_ring side: ``ring_dilated_attention(q, k, v, causal=..., local=True)`` with the dense pattern, i.e. the whole
per-rank path of one ring step (plan lookup, block kernel with log-sum-exp, online-softmax merge into fp32
accumulators, custom autograd backward). SDPA side: ``torch.nn.functional.scaled_dot_product_attention`` on the same
tensors. Both run forward then ``torch.autograd.grad`` w.r.t. q, k, v with the same upstream gradient.

FLOP/s are model FLOPs: forward 4*B*H*S^2*D, backward 2.5x forward (5 matmuls incl. the recompute of QK^T), halved
for causal; the reference is a 2048^3 matmul timed in the same interleaved rounds (same threads, same load).

    python benchmarks/bench_kernel.py                     # S in {2k,4k,8k}, D in {64,128}, causal and not
    python benchmarks/bench_kernel.py --seq-lens 16384    # optional larger size
    python benchmarks/bench_kernel.py --quick             # seconds
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F

import _common as C
import ds_ring

TARGET = 1.25  # ds_ring fwd+bwd time / SDPA fwd+bwd time, issue #2 / #5


def model_flops(B, H, S, D, causal, backward=True):
    f = 4 * B * H * S * S * D * (3.5 if backward else 1.0)
    return f / 2 if causal else f


def plot(rows, head_dims, causals, seq_lens, n, png):
    plt = C.pyplot()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    for D, causal in itertools.product(head_dims, causals):
        sel = [r for r in rows if r["D"] == D and r["causal"] == causal]
        lab = f"D={D}{' causal' if causal else ''}"
        a1.plot([r["S"] for r in sel], [r["ratio"] for r in sel], "o-", label=lab)
        a2.plot([r["S"] for r in sel], [r["ds_ring_frac_of_matmul"] for r in sel], "o-", label="ds_ring " + lab)
        a2.plot([r["S"] for r in sel], [r["sdpa_frac_of_matmul"] for r in sel], "x--", alpha=0.6,
                label="SDPA " + lab)
    a1.axhline(TARGET, color="red", ls=":", label="target 1.25")
    a1.axhline(1.0, color="gray", lw=0.5)
    a1.set(xscale="log", xlabel="sequence length S", ylabel="time ds_ring / time SDPA (fwd+bwd)",
           title="Block kernel vs SDPA (lower is better)")
    a1.set_ylim(0, max(1.5, max(r["ratio"] for r in rows) * 1.1))
    a2.set(xscale="log", xlabel="sequence length S", ylabel="achieved / measured matmul FLOP/s",
           title=f"Achieved FLOP/s vs a {n}^3 matmul timed alongside")
    for a in (a1, a2):
        a.legend(fontsize=7)
        a.minorticks_off()
        a.set_xticks(seq_lens, [str(s) for s in seq_lens])
    C.save_fig(fig, png)


def replot(path):
    import json
    from pathlib import Path

    d = json.loads(Path(path).read_text())
    rows = d["rows"]
    uniq = lambda key: sorted({r[key] for r in rows})  # noqa: E731
    plot(rows, uniq("D"), uniq("causal"), uniq("S"), 2048, C.DOCS / (Path(path).stem + ".png"))


def main():
    p = C.base_parser(__doc__.split("\n\n")[0])
    p.add_argument("--seq-lens", type=int, nargs="+", default=[2048, 4096, 8192])
    p.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    p.add_argument("--causal", choices=["both", "yes", "no"], default="both")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--forward-only-too", action="store_true", help="also time the forward alone")
    p.add_argument("--replot", metavar="JSON", help="only redraw the PNG (into docs/) from a JSON this script wrote")
    args = p.parse_args()
    if args.replot:
        return replot(args.replot)
    C.quick_sizes(args, seq_lens=[128], head_dims=[16])
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dtype = C.dtype_of(args.dtype)
    causals = {"both": [False, True], "yes": [True], "no": [False]}[args.causal]
    n = 256 if args.quick else 2048  # the matmul reference, timed in the same rounds
    ma, mb, mc = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype), torch.empty(n, n, dtype=dtype)
    mm_flops = 2 * n**3

    def mm_fn():
        return torch.mm(ma, mb, out=mc)

    print(f"threads={args.threads} dtype={args.dtype} B={args.batch} H={args.heads}")

    rows = []
    for S, D, causal in itertools.product(args.seq_lens, args.head_dims, causals):
        B, H = args.batch, args.heads
        q, k, v = (torch.randn(B, H, S, D, dtype=dtype, requires_grad=True) for _ in range(3))
        g = torch.randn(B, H, S, D, dtype=dtype)

        def sdpa():
            o = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
            return torch.autograd.grad(o, (q, k, v), g)

        def ring():
            o = ds_ring.ring_dilated_attention(q, k, v, causal=causal, local=True)
            return torch.autograd.grad(o, (q, k, v), g)

        fns = {"sdpa": sdpa, "ds_ring": ring}
        if args.forward_only_too:
            def sdpa_fwd():
                with torch.no_grad():
                    return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

            def ring_fwd():
                with torch.no_grad():
                    return ds_ring.ring_dilated_attention(q, k, v, causal=causal, local=True)

            fns["sdpa_fwd"], fns["ds_ring_fwd"] = sdpa_fwd, ring_fwd
        fns["matmul"] = mm_fn  # the FLOP/s reference, timed interleaved with the candidates (same load)
        res = C.bench_interleaved(fns, args.warmup, args.repeat)
        t_s, t_r = res["sdpa"]["median"], res["ds_ring"]["median"]
        mm = mm_flops / res["matmul"]["median"]
        fl = model_flops(B, H, S, D, causal)
        row = dict(S=S, D=D, causal=causal, B=B, H=H, matmul_flops=mm, sdpa_s=t_s, ds_ring_s=t_r, ratio=t_r / t_s,
                   sdpa_gflops=fl / t_s / 1e9, ds_ring_gflops=fl / t_r / 1e9,
                   ds_ring_frac_of_matmul=fl / t_r / mm, sdpa_frac_of_matmul=fl / t_s / mm, raw=res)
        if args.forward_only_too:
            row["fwd_ratio"] = res["ds_ring_fwd"]["median"] / res["sdpa_fwd"]["median"]
        rows.append(row)
        print(f"S={S:6d} D={D:4d} causal={causal!s:5}: sdpa {t_s * 1e3:9.1f} ms  ds_ring {t_r * 1e3:9.1f} ms  "
              f"ratio {t_r / t_s:.3f}  ({fl / t_r / 1e9:.1f} GFLOP/s = {fl / t_r / mm:.0%} of matmul "
              f"{mm / 1e9:.0f} GFLOP/s)", flush=True)

    headers = ["S", "D", "causal", "SDPA fwd+bwd (ms)", "ds_ring fwd+bwd (ms)", "ratio ds_ring/SDPA",
               "ds_ring GFLOP/s", "matmul GFLOP/s", "ds_ring % of matmul", "SDPA % of matmul", "target <= 1.25"]
    table = [[r["S"], r["D"], "yes" if r["causal"] else "no", r["sdpa_s"] * 1e3, r["ds_ring_s"] * 1e3, r["ratio"],
              r["ds_ring_gflops"], r["matmul_flops"] / 1e9, f"{r['ds_ring_frac_of_matmul']:.0%}",
              f"{r['sdpa_frac_of_matmul']:.0%}",
              "met" if r["ratio"] <= TARGET else "MISSED"] for r in rows]
    if args.forward_only_too:
        headers.append("fwd-only ratio")
        for t, r in zip(table, rows):
            t.append(r["fwd_ratio"])
    md = C.print_table(f"Block kernel fwd+bwd, B={args.batch}, H={args.heads}, {args.dtype}, torch.set_num_threads("
          f"{args.threads}); median of {args.repeat} interleaved runs (matmul {n}^3 timed in the same rounds)", headers, table)

    C.finish(args, "bench_kernel", dict(threads=args.threads, dtype=args.dtype, target=TARGET, rows=rows,
                                        table_markdown=md),
             lambda png: plot(rows, args.head_dims, causals, args.seq_lens, n, png))


if __name__ == "__main__":
    main()
