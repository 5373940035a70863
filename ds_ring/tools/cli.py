"""The ``ds-ring`` command. Subcommands: ``demo`` (the main job), ``plan`` (memory planner) and ``bench`` (quick
benchmarks)."""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ds-ring", description="ds_ring: ring and LongNet dilated attention "
                                     "over sequence-parallel ranks, with DeepSpeed ZeRO")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    from ..op.layouts import LAYOUTS
    from ..planning.cost_model import CLUSTERS
    from . import demo

    p = sub.add_parser("demo", help="train a small Llama on 2 local CPU ranks with ZeRO-3 and ring attention",
                       description=demo.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    demo.add_arguments(p)
    p.set_defaults(func=_run_demo)

    p = sub.add_parser("plan", help="per-rank memory of one training step, broken down, and the longest sequence "
                       "that fits", description=_PLAN_DOC, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="the model's config.json, or a directory holding one")
    p.add_argument("--ranks", type=int, default=1, help="ranks per sequence-parallel ring (sp_size)")
    p.add_argument("--dp", type=int, default=1, help="data-parallel rings (ZeRO partitions over ranks x dp)")
    p.add_argument("--memory", default=None, help="device memory per rank, e.g. 80GB (10^9 bytes) or 80GiB; "
                   "without --seq-len the longest sequence that fits is planned")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (over the ring)")
    p.add_argument("--deepspeed", default=None, help="a DeepSpeed config: ZeRO stage, offload, bf16, bucket sizes")
    p.add_argument("--zero", type=int, choices=[0, 1, 2, 3], default=None, help="ZeRO stage (default: --deepspeed's, "
                   "else 3)")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default=None, help="default: --deepspeed's, else bf16")
    p.add_argument("--batch-size", type=int, default=1, help="sequences per ring per micro-step")
    p.add_argument("--layout", choices=sorted(LAYOUTS), default="zigzag")
    p.add_argument("--options", default="long", help="memory options: 'long' (all), 'off', or a comma list of "
                   "checkpointing,chunked_loss,tiled_mlp,offload_checkpoints,lean_norms (as ds_ring.optimize_memory)")
    p.add_argument("--kernels", choices=["cpu", "cuda"], default="cpu", help="attention kernel constants: 'cpu' "
                   "(measured on CPU) or 'cuda' (flash / FlexAttention, counted, UNVERIFIED on a GPU); the plan's "
                   "notes say which were used")
    c = p.add_argument_group("communication (with --ranks > 1): bytes and attention time per (Ulysses x ring) "
                             "factorization, from ds_ring.planning.cost_model")
    c.add_argument("--cluster", choices=sorted(CLUSTERS), default="h100", help="preset for the values below")
    c.add_argument("--ranks-per-node", type=int, default=None, help="GPUs per node (default: the preset's)")
    c.add_argument("--intra-bw", type=float, default=None, help="GB/s per rank and direction inside a node")
    c.add_argument("--inter-bw", type=float, default=None, help="GB/s per rank and direction across nodes")
    c.add_argument("--flops", type=float, default=None, help="achieved attention-kernel TFLOP/s (measure one flash "
                   "call on a full block)")
    c.add_argument("--memory-bw", type=float, default=None, help="device memory TB/s")
    p.set_defaults(func=_run_plan)

    # listed here for --help only: main() hands `bench ...` to ds_ring.tools.bench's own parser before this one runs
    sub.add_parser("bench", help="quick run of every benchmark under benchmarks/, tables printed "
                   "(`ds-ring bench --help` for options)", add_help=False)
    return parser


_PLAN_DOC = """Per-rank memory of one training step under ds_ring (ZeRO partitions, checkpoints, attention with its
ring buffers, MLP, logits/loss) from a model's config, and the longest sequence that fits a device.

  ds-ring plan --model path/to/config.json --ranks 8 --memory 80GB
  ds-ring plan --model path/to/model_dir --ranks 8 --seq-len 1048576 --deepspeed ds_config/zero3_offload.json
  ds-ring plan --model path/to/config.json --ranks 32 --seq-len 262144 --cluster h100 --ranks-per-node 8

With --ranks > 1 it also prints, per (Ulysses x ring) factorization, the bytes per rank per attention layer over
each link and the predicted attention time (ds_ring.planning.cost_model), and recommends one.
"""


def _run_plan(args: argparse.Namespace) -> int:
    from ..planning.step_planner import plan
    from ..training.memory_switch import PARTS, parse_memory_options

    if args.seq_len is None and args.memory is None:
        print("ds-ring plan: give --memory (to find the longest sequence), --seq-len, or both", file=sys.stderr)
        return 2
    try:
        opts = parse_memory_options(args.options) or dict.fromkeys(PARTS, False)
        result = plan(args.model, args.seq_len, sp_size=args.ranks, dp_size=args.dp, zero_stage=args.zero,
                      device_memory=args.memory, dtype=args.dtype, batch_size=args.batch_size,
                      checkpointing=opts["checkpointing"], chunked_loss=opts["chunked_loss"],
                      tiled_mlp=opts["tiled_mlp"], offload_checkpoints=bool(opts["offload_checkpoints"]),
                      lean_norms=opts["lean_norms"],
                      ds_config=args.deepspeed, layout=args.layout, kernels=args.kernels)
    except (ValueError, FileNotFoundError) as e:
        print(f"ds-ring plan: {e}", file=sys.stderr)
        return 2
    print(result.table())
    if args.ranks > 1:
        try:
            print()
            print(_communication(args, result))
        except ValueError as e:  # e.g. a length the 2D layouts cannot shard: the memory plan above still stands
            print(f"communication: not planned: {e}")
    return 0


def _communication(args: argparse.Namespace, result) -> str:
    """The cost model's table for the plan's model and sequence on the chosen cluster."""
    from dataclasses import replace

    from ..planning.cost_model import CLUSTERS, AttentionShape, recommend, table

    over = {k: v * scale for k, v, scale in (("ranks_per_node", args.ranks_per_node, 1),
                                              ("intra_node_bw", args.intra_bw, 1e9),
                                              ("inter_node_bw", args.inter_bw, 1e9), ("flops", args.flops, 1e12),
                                              ("memory_bw", args.memory_bw, 1e12)) if v is not None}
    cluster = replace(CLUSTERS[args.cluster], **over)
    s = result.shape
    shape = AttentionShape(s.heads, s.kv_heads, s.head_dim, result.dtype_bytes)
    preds = recommend(shape, result.seq_len, args.ranks, cluster, batch=args.batch_size, layout=args.layout)
    if not preds:
        raise ValueError(f"no factorization of {args.ranks} ranks fits {cluster.ranks_per_node} ranks per node")
    return table(preds, result.seq_len, args.ranks, cluster)


def _run_demo(args: argparse.Namespace) -> int:
    from . import demo

    demo.run(args)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:
        from . import bench

        return bench.main(argv[1:])
    args = build_parser().parse_args(argv)
    return args.func(args) or 0


if __name__ == "__main__":
    sys.exit(main())
