"""What every subcommand shares: one-line usage errors, argument types, the program name."""
from __future__ import annotations

import argparse
from typing import List

PROG = "sglang-elastic"


class UsageError(ValueError):
    """Bad command-line input found after parsing (reported like argparse's own errors)."""


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``PROG SUBCOMMAND: error: MESSAGE`` and exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


def positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return v


def nonneg_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}")
    return v


def rank_list(text: str) -> List[int]:
    if not text.strip():
        return []
    out = []
    for item in text.split(","):
        try:
            out.append(int(item.strip()))
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected a comma-separated list of rank numbers such as 3,7, got {text!r}") from None
    return sorted(set(out))



def one_line(exc: BaseException) -> str:
    """An exception as one line of text (its message, whitespace folded; its type when empty)."""
    text = " ".join(str(exc).split())
    return text or type(exc).__name__
