"""The ``ds-ring`` command. Subcommands: ``demo`` (the main job) and ``bench`` (quick benchmarks)."""

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

    from . import bench

    # listed here for --help; main() hands its arguments to ds_ring.bench's own parser
    p = sub.add_parser("bench", help="quick run of every benchmark under benchmarks/, tables printed "
                       "(`ds-ring bench --help` for options)", add_help=False)
    p.set_defaults(func=lambda a: bench.main([]))
    return parser


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
