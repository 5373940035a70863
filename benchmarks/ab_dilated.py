"""A/B of the dilated op against another revision's, in one process: each pattern runs the other revision's op and
this one's back to back (order alternating every round), so the load of a shared box hits both alike.

The other revision's ``ds_ring/op`` folder is imported as a package of its own (the op layer imports nothing above
it), e.g. for the revision before the causal cut:

    git archive 1f3dccc ds_ring/op | tar -x -C ../before
    python benchmarks/ab_dilated.py --old ../before/ds_ring/op --seq-lens 8192 --repeat 7

Prints, per pattern, this revision's time over the other's (median of the per-round pairs; fastest sample over
fastest sample), and each revision's fastest pattern sample over its fastest dense sample, over f (bench_dilated's
attended-pair fraction). Both ops are first checked to give the same out and gradients.
"""

from __future__ import annotations

import importlib
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

import _common as C
import ds_ring
from bench_dilated import count_pairs, patterns


def _load_old_op(path: Path):
    """The op folder at ``path`` as the package ``ab_old_op`` (copied, so its relative imports resolve)."""
    tmp = Path(tempfile.mkdtemp())
    shutil.copytree(path, tmp / "ab_old_op")
    sys.path.insert(0, str(tmp))
    return importlib.import_module("ab_old_op.attention")


def main():
    p = C.base_parser(__doc__.split("\n\n")[0])
    p.add_argument("--old", type=Path, required=True, help="the other revision's ds_ring/op folder")
    p.add_argument("--seq-lens", type=int, nargs="+", default=[8192])
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--causal", choices=["yes", "no"], default="yes")
    p.set_defaults(repeat=7)
    args = p.parse_args()
    C.quick_sizes(args, seq_lens=[256])
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    old = _load_old_op(args.old).ring_dilated_attention
    causal, H, D = args.causal == "yes", args.heads, args.head_dim
    rows, table = [], []
    for S in args.seq_lens:
        q, k, v = (torch.randn(1, H, S, D, requires_grad=True) for _ in range(3))
        g = torch.randn(1, H, S, D)

        def make(fn, segs, rates):
            def run():
                o = fn(q, k, v, segs, rates, causal=causal, local=True)
                return torch.autograd.grad(o, (q, k, v), g)
            return run

        pats = patterns(S)
        for name, segs, rates in pats:  # the same results, or the comparison means nothing
            a, b = make(old, segs, rates)(), make(ds_ring.ring_dilated_attention, segs, rates)()
            err = max(((x - y).norm() / y.norm()).item() for x, y in zip(a, b))
            assert err < 1e-5, f"{name}: the two revisions differ by {err:.2e}"
        samples = {name: [] for name, _, _ in pats}
        for rep in range(args.warmup + args.repeat):
            for name, segs, rates in pats:
                pair = {"old": make(old, segs, rates), "new": make(ds_ring.ring_dilated_attention, segs, rates)}
                t = {}
                for lab in (("old", "new") if rep % 2 == 0 else ("new", "old")):
                    t0 = time.perf_counter()
                    pair[lab]()
                    t[lab] = time.perf_counter() - t0
                if rep >= args.warmup:
                    samples[name].append((t["old"], t["new"]))
        dense = samples["dense"]
        for name, segs, rates in pats:
            s = samples[name]
            f = count_pairs(S, H, segs, rates, causal)[0] / count_pairs(S, H, None, None, causal)[2]
            old_f = min(a for a, _ in s) / min(a for a, _ in dense) / f
            new_f = min(b for _, b in s) / min(b for _, b in dense) / f
            r = dict(S=S, causal=causal, pattern=name, f=f, new_over_old=statistics.median(b / a for a, b in s),
                     min_new_over_min_old=min(b for _, b in s) / min(a for a, _ in s), old_over_f=old_f,
                     new_over_f=new_f, raw=s)
            rows.append(r)
            table.append([S, name, f, r["new_over_old"], r["min_new_over_min_old"], old_f, new_f])
    md = C.print_table(f"This revision vs {args.old}, fwd+bwd, local=True, causal={causal}, B=1, H={H}, D={D}, fp32, "
                       f"torch.set_num_threads({args.threads}); {args.repeat} rounds, pairs back to back",
                       ["S", "pattern", "pairs f", "new / old (median of pairs)", "min new / min old",
                        "old: min / min dense / f", "new: min / min dense / f"], table)
    C.finish(args, "ab_dilated", dict(old=str(args.old), threads=args.threads, H=H, D=D, rows=rows,
                                      table_markdown=md))


if __name__ == "__main__":
    main()
