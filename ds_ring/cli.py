"""The ``ds-ring`` command. Subcommands: ``demo``."""

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
    p.set_defaults(func=demo.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.func(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
