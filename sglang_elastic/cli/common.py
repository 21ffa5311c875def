"""What every subcommand shares: one-line usage errors, argument types, the program name."""
from __future__ import annotations

import argparse
from typing import Any, Callable, List

PROG = "sglang-elastic"


class UsageError(ValueError):
    """Bad command-line input found after parsing (reported like argparse's own errors)."""


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``PROG SUBCOMMAND: error: MESSAGE`` and exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


def number_in(text: str, kind: type, ok: Callable[[Any], bool], what: str, in_range: str = "") -> Any:
    """Parse ``text`` as ``kind`` (int or float) accepted by ``ok``; otherwise one argparse error:
    ``expected <what>`` when it does not parse, ``expected <in_range or what>`` when ``ok`` refuses it."""
    try:
        v = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if not ok(v):  # ``ok`` is written so that nan fails it
        raise argparse.ArgumentTypeError(f"expected {in_range or what}, got {text!r}")
    return v


def positive_int(text: str) -> int:
    """argparse type: an integer > 0."""
    return number_in(text, int, lambda v: v > 0, "a positive integer")


def nonneg_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    return number_in(text, int, lambda v: v >= 0, "a non-negative integer")


def rank_list(text: str) -> List[int]:
    """argparse type: comma-separated rank ids, sorted, duplicates dropped."""
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
