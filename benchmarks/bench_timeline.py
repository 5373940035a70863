"""Memory timeline of one ZeRO-3 training step, per rank: ds_ring with its memory switch against DeepSpeed ALST.

The same model, weights and batch as ``bench_longest.py`` (P=2 spawned ranks over gloo, fp32, ds_config/zero3.json;
the candidates are built by its ``build_candidate``): after warm-up steps (optimizer states created, ZeRO-3's trace
recorded), one step runs under the torch profiler with ``profile_memory=True``. Every allocation and free of the
CPU allocator comes back in time order, together with markers that module hooks drop at each moment of the step:

* forward: the embedding, each decoder layer's input norm, attention, post-attention norm and MLP, the final norm,
  the loss (the LM head's forward);
* backward: the gradient reaching each of those modules' outputs (the start of its backward), and with activation
  checkpointing each layer's recompute (a forward hook firing during backward);
* the optimizer step (``engine.step``).

Between two markers is a "moment"; for each the table gives the bytes live at its start and the peak inside it,
above the level before the step (what ``ds_ring.measure_peak_bytes`` reports for the whole step; ZeRO-3 shards and
Adam states held between steps are excluded). The plot shows live bytes over the step (time normalised, since the
two candidates take different times), with the moments named; the table is the one to compare: same moments,
side by side.

    python benchmarks/bench_timeline.py --seq-len 16384                 # ds_ring long and ALST, P=2
    python benchmarks/bench_timeline.py --seq-len 16384 --candidates "ds_ring long"
    python benchmarks/bench_timeline.py --quick                         # a tiny model: a smoke run
"""

from __future__ import annotations

import gc
import time

import torch

import _common as C
import bench_longest as BL
from bench_ulysses import _batch

MARK = "tl:"  # prefix of the profiler ranges that mark the moments


class Marks:
    """Module hooks that drop a zero-length profiler range at every moment of a step (forward, recompute, backward).

    Why profiler ranges: the allocator's events and the ranges come from the same profiler, on one clock, so a
    moment's allocations are exactly the events between its marker and the next.
    """

    def __init__(self):
        self.in_backward = False
        self.handles = []
        self.enabled = False
        self.last = None

    def mark(self, name):
        if not self.enabled or name == self.last:  # ALST's loss calls the LM head once per chunk: one moment
            return
        self.last = name
        with torch.profiler.record_function(MARK + name):
            pass

    def _grad_hook(self, name):
        def hook(grad):
            self.mark(name)
        return hook

    def watch(self, module, name):
        """Marks at ``module``'s forward (or recompute, during backward) and when its output's gradient arrives."""

        def pre(mod, args, kwargs):
            self.mark(f"{name} {'recompute' if self.in_backward else 'forward'}")

        def post(mod, args, kwargs, out):
            t = out[0] if isinstance(out, (tuple, list)) else getattr(out, "last_hidden_state", out)
            if self.enabled and not self.in_backward and isinstance(t, torch.Tensor) and t.requires_grad:
                t.register_hook(self._grad_hook(f"{name} backward"))

        self.handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
        self.handles.append(module.register_forward_hook(post, with_kwargs=True))

    def install(self, model):
        base = model.model
        self.watch(base.embed_tokens, "embedding")
        for k, layer in enumerate(base.layers):
            for sub in ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp"):
                short = {"input_layernorm": "norm1", "self_attn": "attention", "post_attention_layernorm": "norm2",
                         "mlp": "MLP"}[sub]
                self.watch(getattr(layer, sub), f"L{k} {short}")
        self.watch(base.norm, "final norm")

        def head_pre(mod, args, kwargs):
            if not self.in_backward:
                self.mark("loss (LM head)")
        self.handles.append(model.lm_head.register_forward_pre_hook(head_pre, with_kwargs=True))

    def wrap_engine(self, engine):
        backward, step = engine.backward, engine.step

        def wrapped_backward(loss, *a, **kw):
            self.mark("backward start")
            self.in_backward = True
            try:
                return backward(loss, *a, **kw)
            finally:
                self.in_backward = False
                self.mark("backward end")

        def wrapped_step(*a, **kw):
            self.mark("optimizer step")
            out = step(*a, **kw)
            self.mark("step end")
            return out

        engine.backward, engine.step = wrapped_backward, wrapped_step


def timeline(events_and_marks):
    """(moments, live): moments = [(name, t0_ns, live at start, peak inside)], live = [(t_ns, bytes)], from the
    profiler's memory events and markers (bytes above the level before the step)."""
    mem, marks = events_and_marks
    live, curve = 0, []
    for t, nbytes in mem:
        live += nbytes
        curve.append((t, live))
    moments = []
    j = 0
    level = 0
    start = mem[0][0] if mem else 0
    bounds = [("step start", start)] + marks
    for k, (name, t0) in enumerate(bounds):
        t1 = bounds[k + 1][1] if k + 1 < len(bounds) else float("inf")
        at_start = level
        peak = level
        while j < len(curve) and curve[j][0] < t1:
            level = curve[j][1]
            peak = max(peak, level)
            j += 1
        moments.append((name, t0, at_start, peak))
    return moments, curve


def profile_step(step, context, batch):
    """Run one step under the profiler; return (memory events [(t_ns, nbytes)], markers [(name, t_ns)])."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        with context():
            step(batch)
    mem, marks = [], []
    for e in prof.profiler.kineto_results.events():
        if e.name() == "[memory]" and e.device_type().name == "CPU":
            mem.append((e.start_ns(), e.nbytes()))
        elif e.name().startswith(MARK):
            marks.append((e.name()[len(MARK):], e.start_ns()))
    return sorted(mem), sorted(marks, key=lambda m: m[1])


def timeline_worker(rank, world, payload):
    """One candidate: warm-up steps, then one profiled step at S; returns this rank's moments and live curve."""
    import torch.distributed as dist

    cfg, name, S = payload
    cfg = dict(cfg, device="cpu")
    base = BL._setup(cfg)
    engine, step, context = BL.build_candidate(name, base, cfg, world)
    del base
    marks = Marks()
    marks.install(engine.module)
    marks.wrap_engine(engine)
    for w in cfg["warmup_seq_lens"]:
        with context():
            step(_batch(w, cfg["vocab"], 10**6 + w))
    batch = _batch(S, cfg["vocab"], 0)
    gc.collect()
    dist.barrier()
    marks.enabled = True
    t0 = time.perf_counter()
    mem, mk = profile_step(step, context, batch)
    wall = time.perf_counter() - t0
    marks.enabled = False
    moments, curve = timeline((mem, mk))
    t_first, t_last = curve[0][0], curve[-1][0]
    # a few thousand points are enough for the plot: the envelope of each bin
    bins = 2000
    plot_pts = {}
    for t, b in curve:
        k = int((t - t_first) / max(1, t_last - t_first) * bins)
        plot_pts[k] = max(plot_pts.get(k, 0), b)
    engine.destroy()
    dist.barrier()
    return {"rank": rank, "moments": [(n, t - t_first, a, p) for n, t, a, p in moments],
            "curve": sorted(plot_pts.items()), "span_ns": t_last - t_first, "wall": wall,
            "peak": max(b for _, b in curve)}


def merge_moments(per_rank):
    """One row per moment: the worse rank's bytes at its start and its peak (ranks run the same moments)."""
    rows = {}
    order = []
    for r in per_rank:
        seen = {}
        for name, _, at, peak in r["moments"]:
            seen[name] = seen.get(name, 0) + 1
            key = name if seen[name] == 1 else f"{name} #{seen[name]}"
            if key not in rows:
                rows[key] = [at, peak]
                order.append(key)
            else:
                rows[key] = [max(rows[key][0], at), max(rows[key][1], peak)]
    return [(k, *rows[k]) for k in order]


def plot(result, png):
    plt = C.pyplot()
    names = list(result["runs"])
    fig, axes = plt.subplots(len(names), 1, figsize=(11, 3.6 * len(names)), sharey=True, squeeze=False)
    for ax, name in zip(axes[:, 0], names):
        for r in result["runs"][name]:
            xs = [k / 2000 for k, _ in r["curve"]]
            ax.plot(xs, [b / 2**20 for _, b in r["curve"]], lw=0.8, label=f"rank {r['rank']} (peak "
                    f"{r['peak'] / 2**20:,.0f} MiB)")
        r0 = result["runs"][name][0]
        span = max(1, r0["span_ns"])
        prev = None
        for n, t, _, peak in r0["moments"]:
            phase = n.split()[-1] if n.split()[-1] in ("forward", "recompute", "backward") else n
            if n.endswith("forward") and ("norm1" in n or n.startswith("embedding")) or n in (
                    "loss (LM head)", "backward start", "optimizer step", "final norm forward") \
                    or (n.endswith("recompute") and "norm1" in n) or (n.endswith("backward") and "MLP" in n):
                ax.axvline(t / span, color="gray", lw=0.4)
                label = n.replace(" forward", " fwd").replace(" recompute", " recomp").replace(" backward", " bwd")
                ax.text(t / span, ax.get_ylim()[1] if prev else 0, label, rotation=90, fontsize=6, va="bottom")
                prev = phase
        ax.set(ylabel="MiB live above the step's start", title=f"{name}: S={result['seq_len']:,}, P={result['world']}")
        ax.legend(fontsize=7, loc="upper left")
    axes[-1, 0].set_xlabel("time through one step (normalised)")
    C.save_fig(fig, png)


def report(runs, cfg, world, S, args):
    """The side-by-side table, the JSON and the plot of ``runs`` ({candidate: [per-rank result]})."""
    merged = {n: merge_moments(r) for n, r in runs.items()}
    keys = list(dict.fromkeys(k for n in merged for k, *_ in merged[n]))
    by = {n: {k: (a, pk) for k, a, pk in m} for n, m in merged.items()}
    rows = []
    for k in keys:
        row = [k]
        for n in runs:
            a, pk = by[n].get(k, (None, None))
            row += ["-" if a is None else a / 2**20, "-" if pk is None else pk / 2**20]
        rows.append(row)
    peaks = {n: max(r["peak"] for r in rs) for n, rs in runs.items()}
    rows.append(["step peak"] + sum([["", peaks[n] / 2**20] for n in runs], []))
    md = C.print_table(f"One step at S={S:,}, P={world}, per rank (the worse rank): MiB live at the start of each "
                       "moment and the peak inside it, above the level before the step",
                       ["moment"] + sum([[f"{n}: at start", f"{n}: peak"] for n in runs], []), rows)
    if len(runs) == 2:
        a, b = list(runs)
        print(f"\nstep peak {a} / {b}: {peaks[a] / peaks[b]:.3f}")
    png, js = C.out_paths(args, "bench_timeline" + args.suffix)
    result = dict(cfg=cfg, world=world, seq_len=S, runs=runs, peaks=peaks, table=md, merged_from=args.merge)
    C.write_json(js, result)
    if not args.no_plot:
        plot(result, png)


def main():
    p = C.base_parser(__doc__.split("\n\n")[0])
    p.add_argument("--seq-len", type=int, default=16384)
    p.add_argument("--candidates", nargs="+", default=["ds_ring long", "ALST"], choices=BL.NAMES)
    BL.add_model_shape_args(p)
    p.add_argument("--suffix", default="")
    p.add_argument("--merge", nargs="+", default=None, metavar="[LABEL=]JSON[#CANDIDATE]",
                   help="no new runs: one table and plot from earlier runs' JSON files (same length; #CANDIDATE takes "
                   "one of a file's candidates, LABEL renames a file's single (or chosen) candidate, e.g. to compare "
                   "before and after a change)")
    args = p.parse_args()
    if args.merge:
        import json

        runs = {}
        for item in args.merge:
            label, _, path = item.rpartition("=")
            path, _, chosen = path.partition("#")
            data = json.loads(open(path).read())
            if chosen:
                if chosen not in data["runs"]:
                    p.error(f"--merge {item}: {path} has no candidate {chosen!r}, only {list(data['runs'])}")
                data["runs"] = {chosen: data["runs"][chosen]}
            if label and len(data["runs"]) != 1:
                p.error(f"--merge {item}: LABEL needs a file with one candidate (or #CANDIDATE), it has "
                        f"{list(data['runs'])}")
            for name, r in data["runs"].items():
                runs[label or name] = r
            cfg, world, S = data["cfg"], data["world"], data["seq_len"]
        report(runs, cfg, world, S, args)
        return 0
    world = 2
    cfg = dict(vocab=args.vocab, hidden=args.hidden, intermediate=args.intermediate, layers=args.layers,
               heads=args.heads, kv_heads=args.kv_heads, head_dim=args.head_dim, tied=False, dtype="float32",
               ds_config="zero3.json", warmup_seq_lens=[256, 512])
    S = args.seq_len
    if C.quick_sizes(args):
        cfg.update(vocab=4096, hidden=128, intermediate=352)
        S = 1024
    print(f"Llama-shaped model: hidden {cfg['hidden']}, intermediate {cfg['intermediate']}, {cfg['layers']} layers, "
          f"{cfg['heads']} heads / {cfg['kv_heads']} KV heads of {cfg['head_dim']}, vocabulary {cfg['vocab']}; fp32; "
          f"ZeRO-3; P={world}; S={S:,}", flush=True)
    runs = {}
    for name in args.candidates:
        runs[name] = C.run_ranks(timeline_worker, world, (cfg, name, S), threads=args.threads,
                                 timeout_s=BL.RUN_TIMEOUT_S)
        print(f"  {name}: step peak {max(r['peak'] for r in runs[name]) / 2**20:,.0f} MiB (worse rank)", flush=True)
    report(runs, cfg, world, S, args)
    return 0


if __name__ == "__main__":
    main()
