"""Command line: ``sglang-elastic plan`` and ``sglang-elastic rehearse``.

Every bad input ends in one line on stderr, ``sglang-elastic SUBCOMMAND: error: ...``, and exit
status 2. Adding a subcommand: a module here with ``add_parser(subparsers)`` that registers its
options and ``set_defaults(func=<run(args) -> exit status>, parser=<its parser>)``.
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from .. import __version__
from . import plan, rehearse
from .common import PROG, UsageError, _Parser, one_line
from .plan import BUILTIN_EXAMPLE, DEEPSEEK_V3_EXPERT_BYTES

__all__ = ["main", "build_parser", "UsageError", "DEEPSEEK_V3_EXPERT_BYTES", "BUILTIN_EXAMPLE"]


def build_parser() -> argparse.ArgumentParser:
    """The ``sglang-elastic`` parser with its subcommands."""
    parser = _Parser(prog=PROG, description="Elastic, fault-tolerant expert parallelism for SGLang MoE serving.")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    plan.add_parser(sub)
    rehearse.add_parser(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the ``sglang-elastic`` command line; returns the exit status (0 ok, 2 bad input)."""
    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
        if extra:  # report them as the subcommand's error, not the top-level parser's
            args.parser.error(f"unrecognized arguments: {' '.join(extra)}")
    except SystemExit as exc:  # argparse: --help (0) or a usage error (2), already printed
        return int(exc.code) if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    try:
        return args.func(args)
    except (ValueError, OSError) as exc:  # PlacementError and UsageError are ValueErrors
        print(f"{PROG} {args.command}: error: {one_line(exc)}", file=sys.stderr)
        return 2
    except MemoryError:  # past the up-front size checks: still one line, no traceback
        print(f"{PROG} {args.command}: error: out of memory; try a smaller problem", file=sys.stderr)
        return 1

