"""Why small causal blocks are slow on CPU: ATen's CPU flash kernel, causal vs non-causal, on G batched blocks of m
rows (G*m = --total), and the same causal work cut into two causal halves (one batched call) plus the dense
off-diagonal quarter (one unmasked call). Forward + backward of the raw ops; merge cost not included.

    python benchmarks/bench_causal_blocks.py          # m in {256, 512, 1024, 2048}, G*m = 8192, H=4, D=64
"""

from __future__ import annotations

import torch

import _common as C

op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
bop = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


def fb(q, k, v, causal):
    o, lse = op(q, k, v, 0.0, causal, scale=q.shape[-1] ** -0.5)
    return bop(o, q, k, v, o, lse, 0.0, causal, scale=q.shape[-1] ** -0.5)


def main():
    p = C.base_parser(__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, nargs="+", default=[256, 512, 1024, 2048])
    p.add_argument("--total", type=int, default=8192)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=64)
    p.set_defaults(repeat=7)
    args = p.parse_args()
    C.quick_sizes(args, rows=[64, 128], total=256)
    torch.set_num_threads(args.threads)
    H, D = args.heads, args.head_dim
    rows, table = [], []
    for m in args.rows:
        G = max(1, args.total // m)
        q, k, v = (torch.randn(G, H, m, D) for _ in range(3))
        qa, qb = torch.randn(2 * G, H, m // 2, D), torch.randn(G, H, m // 2, D)
        res = C.bench_interleaved({
            "full": lambda: fb(q, k, v, False),
            "causal": lambda: fb(q, k, v, True),
            "split": lambda: (fb(qa, qa, qa, True), fb(qb, qb, qb, False)),
        }, args.warmup, args.repeat)
        full = res["full"]["median"]
        r = dict(m=m, G=G, causal_ratio=res["causal"]["median"] / full, split_ratio=res["split"]["median"] / full,
                 raw=res)
        rows.append(r)
        table.append([m, G, r["causal_ratio"], r["split_ratio"], 0.5])
    md = C.markdown_table(["m (rows per causal block)", "G blocks", "causal / non-causal time",
                           "(2 causal halves + dense off-diagonal quarter) / non-causal", "ideal"], table)
    print(f"ATen CPU flash fwd+bwd, H={H}, D={D}, fp32, torch.set_num_threads({args.threads}); median of "
          f"{args.repeat} interleaved runs")
    print(md)
    C.finish(args, "bench_causal_blocks", dict(rows=rows, table_markdown=md))


if __name__ == "__main__":
    main()
