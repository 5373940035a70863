"""Why small causal blocks are slow on CPU: ATen's CPU flash kernel, causal vs non-causal, on G batched blocks of m
rows (G*m = --total), and the same causal work cut two ways: two causal halves (one batched call) plus the dense
off-diagonal quarter (one unmasked call), merge cost not included; and ``--tiles`` row tiles, each ONE call over the
keys up to its own end with an additive mask on its diagonal tile (the kernel's attn_mask), so no merge is needed.
Also the causal block with an additive mask (log 2 on every other row and column: the weight a pair computed once
would carry for LongNet's pairs shared by two (w, r) pairs): what such a mask costs the kernel. Forward + backward
of the raw ops.

    python benchmarks/bench_causal_blocks.py          # m in {256, 512, 1024, 2048}, G*m = 8192, H=4, D=64, 4 tiles
"""

from __future__ import annotations

import math

import torch

import _common as C

op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
bop = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


def fb(q, k, v, causal, mask=None):
    o, lse = op(q, k, v, 0.0, causal, attn_mask=mask, scale=q.shape[-1] ** -0.5)
    return bop(o, q, k, v, o, lse, 0.0, causal, attn_mask=mask, scale=q.shape[-1] ** -0.5)


def tiles_of(q, k, v, masks):
    """Row tile a of a causal block: its t queries against keys [0, (a+1) t) and its mask (the last t causal, lower
    right), as (q, k, v, mask) per tile."""
    t = q.shape[-2] // len(masks)
    return [(q[..., a * t:(a + 1) * t, :], k[..., :(a + 1) * t, :], v[..., :(a + 1) * t, :], mask)
            for a, mask in enumerate(masks)]


def row_tiles(q, k, v, masks):
    for qa, ka, va, mask in tiles_of(q, k, v, masks):
        fb(qa, ka, va, False, mask)


def check_row_tiles(q, k, v, masks):
    """The row tiles' outputs are the causal block's (so the timing compares the same result)."""
    scale = q.shape[-1] ** -0.5
    want = op(q, k, v, 0.0, True, scale=scale)[0]
    got = torch.cat([op(qa, ka, va, 0.0, False, attn_mask=mask, scale=scale)[0]
                     for qa, ka, va, mask in tiles_of(q, k, v, masks)], dim=-2)
    err = ((got - want).norm() / want.norm()).item()
    assert err < 1e-5, f"row tiles differ from the causal block: {err:.1e}"


def check_masked_causal(q, k, v, mask):
    """A causal call with an additive mask is softmax(q k^T * scale + mask, causal) v (float64 reference)."""
    scale = q.shape[-1] ** -0.5
    got = op(q, k, v, 0.0, True, attn_mask=mask, scale=scale)[0]
    m = q.shape[-2]
    scores = q.double() @ k.double().transpose(-1, -2) * scale + mask.double()
    scores = scores.masked_fill(torch.ones(m, m, dtype=torch.bool).triu(1), float("-inf"))
    want = torch.softmax(scores, dim=-1) @ v.double()
    err = ((got.double() - want).norm() / want.norm()).item()
    assert err < 1e-5, f"causal call with an additive mask differs from its definition: {err:.1e}"


def lower_right_masks(m, tiles):
    t = m // tiles
    diagonal = torch.full((t, t), float("-inf")).triu(1)
    return [torch.cat([torch.zeros(t, a * t), diagonal], dim=1) for a in range(tiles)]


def main():
    p = C.base_parser(__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, nargs="+", default=[256, 512, 1024, 2048])
    p.add_argument("--total", type=int, default=8192)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--tiles", type=int, default=4, help="row tiles of the masked candidate")
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
        masks = lower_right_masks(m, args.tiles)
        check_row_tiles(q, k, v, masks)
        every_other = torch.arange(m) % 2 == 0
        shared = (every_other[:, None] & every_other[None, :]).float() * math.log(2.0)
        check_masked_causal(q, k, v, shared)
        res = C.bench_interleaved({
            "full": lambda: fb(q, k, v, False),
            "causal": lambda: fb(q, k, v, True),
            "split": lambda: (fb(qa, qa, qa, True), fb(qb, qb, qb, False)),
            "tiles": lambda: row_tiles(q, k, v, masks),
            "causal+mask": lambda: fb(q, k, v, True, shared),
        }, args.warmup, args.repeat)
        full = res["full"]["median"]
        r = dict(m=m, G=G, causal_ratio=res["causal"]["median"] / full, split_ratio=res["split"]["median"] / full,
                 tiles_ratio=res["tiles"]["median"] / full, tiles=args.tiles,
                 masked_causal_ratio=res["causal+mask"]["median"] / full, raw=res)
        rows.append(r)
        table.append([m, G, r["causal_ratio"], r["split_ratio"], r["tiles_ratio"], (args.tiles + 1) / (2 * args.tiles),
                      r["masked_causal_ratio"], 0.5])
    md = C.markdown_table(["m (rows per causal block)", "G blocks", "causal / non-causal time",
                           "(2 causal halves + dense off-diagonal quarter) / non-causal",
                           f"{args.tiles} masked row tiles / non-causal", "row tiles' share of the square",
                           "causal + additive mask / non-causal", "ideal"],
                          table)
    print(f"ATen CPU flash fwd+bwd, H={H}, D={D}, fp32, torch.set_num_threads({args.threads}); median of "
          f"{args.repeat} interleaved runs")
    print(md)
    C.finish(args, "bench_causal_blocks", dict(rows=rows, table_markdown=md))


if __name__ == "__main__":
    main()
