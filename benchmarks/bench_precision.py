"""Error against float64 of a patched tiny Llama and of transformers' sdpa, in each precision mode, P = 1 and 2.

The measurement of tests/test_precision.py (same model, padded batch, modes and error definition: relative
Frobenius error of the logits on real tokens and of all parameter gradients together), over several seeds, as a
table: the numbers behind the README's precision section.

    python benchmarks/bench_precision.py --seeds 5
"""

from __future__ import annotations

import sys

from _common import ROOT, base_parser, out_paths, print_table, quick_sizes, run_ranks, write_json

sys.path.insert(0, str(ROOT / "tests"))
from test_precision import MODES, _precision_worker  # noqa: E402


def main() -> None:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=5, help="seeds (fresh model weights and batch) per world size")
    args = p.parse_args()
    quick_sizes(args)
    rows, raw = [], []
    worlds = (1, 2)
    for world in worlds:
        for seed in range(args.seeds if not args.quick else 1):
            res = run_ranks(_precision_worker, world, seed, threads=args.threads)[0]
            for mode in MODES:
                r = res[mode]
                raw.append({"world": world, "seed": seed, "mode": mode, **r})
    for world in worlds:
        for mode in MODES:
            sel = [x for x in raw if x["world"] == world and x["mode"] == mode]
            row = [world, mode]
            for what in ("logits", "grads"):
                ratios = [x["ring"][what] / x["sdpa"][what] for x in sel]
                row += [sum(x["sdpa"][what] for x in sel) / len(sel), sum(x["ring"][what] for x in sel) / len(sel),
                        max(ratios)]
            rows.append(row)
    table = print_table(
        f"error vs float64 (mean over {len(raw) // (len(worlds) * len(MODES))} seeds; ratio: worst seed)",
        ["P", "mode", "logits sdpa", "logits ds_ring", "ratio", "grads sdpa", "grads ds_ring", "ratio"], rows)
    _, json_path = out_paths(args, "bench_precision")
    write_json(json_path, {"runs": raw, "table": table})


if __name__ == "__main__":
    main()
