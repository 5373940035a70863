"""The ``ds-ring`` command. Subcommands: ``demo`` (the main job), ``plan`` (memory planner) and ``bench`` (quick
benchmarks)."""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ds-ring", description="ds_ring: ring and LongNet dilated attention "
                                     "over sequence-parallel ranks, with DeepSpeed ZeRO")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
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
    p.add_argument("--layout", choices=["zigzag", "contiguous"], default="zigzag")
    p.add_argument("--options", default="long", help="memory options: 'long' (all), 'off', or a comma list of "
                   "checkpointing,chunked_loss,tiled_mlp,offload (as ds_ring.optimize_memory)")
    p.set_defaults(func=_run_plan)

    from . import bench

    # listed here for --help; main() hands its arguments to ds_ring.bench's own parser
    p = sub.add_parser("bench", help="quick run of every benchmark under benchmarks/, tables printed "
                       "(`ds-ring bench --help` for options)", add_help=False)
    p.set_defaults(func=lambda a: bench.main([]))
    return parser


_PLAN_DOC = """Per-rank memory of one training step under ds_ring (ZeRO partitions, checkpoints, attention with its
ring buffers, MLP, logits/loss) from a model's config, and the longest sequence that fits a device.

  ds-ring plan --model path/to/config.json --ranks 8 --memory 80GB
  ds-ring plan --model path/to/model_dir --ranks 8 --seq-len 1048576 --deepspeed ds_config/zero3_offload.json
"""


def _run_plan(args: argparse.Namespace) -> int:
    from .memory_options import parse_memory_options
    from .planner import plan

    if args.seq_len is None and args.memory is None:
        print("ds-ring plan: give --memory (to find the longest sequence), --seq-len, or both", file=sys.stderr)
        return 2
    try:
        opts = parse_memory_options(args.options) or dict.fromkeys(("checkpointing", "chunked_loss", "tiled_mlp",
                                                                    "offload"), False)
        result = plan(args.model, args.seq_len, sp_size=args.ranks, dp_size=args.dp, zero_stage=args.zero,
                      device_memory=args.memory, dtype=args.dtype, batch_size=args.batch_size,
                      checkpointing=opts["checkpointing"], chunked_loss=opts["chunked_loss"],
                      tiled_mlp=opts["tiled_mlp"], offload_checkpoints=bool(opts["offload"]),
                      ds_config=args.deepspeed, layout=args.layout)
    except (ValueError, FileNotFoundError) as e:
        print(f"ds-ring plan: {e}", file=sys.stderr)
        return 2
    print(result.table())
    return 0


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
