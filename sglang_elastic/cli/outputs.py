"""Output files of a subcommand: checked before any work, written atomically, all or none.

A run names its outputs (``--output``, ``--json``, ``--plot``...) as :class:`Output`; :func:`check`
refuses bad ones up front (two outputs on one path, a missing or read-only folder, a folder named as
a file), so nothing is computed for a run that could not save its result. :class:`AtomicWrites`
writes each to a temporary file beside its target and renames them all at the end: a failing
output (a plot, a full disk) leaves no file behind, not even the outputs written before it.
"""
from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from .common import UsageError, one_line

__all__ = ["Output", "check", "AtomicWrites", "STDOUT", "strict_json"]

#: The path meaning standard output.
STDOUT = "-"


@dataclass(frozen=True)
class Output:
    """One output of a run. ``path`` is what the user gave; ``real`` the file actually written
    (``--plot out/p`` writes ``out/p.png``); ``STDOUT`` allowed only where ``stdout_ok``."""

    flag: str
    path: str
    real: str
    stdout_ok: bool = False

    @property
    def to_stdout(self) -> bool:
        return self.stdout_ok and self.path == STDOUT


def check(outputs: Sequence[Output]) -> None:
    """Refuse outputs that cannot be written (``UsageError`` naming the flag and path)."""
    seen: Dict[str, Output] = {}
    for o in outputs:
        if o.to_stdout:
            continue
        p = Path(o.real)
        if p.is_dir():
            raise UsageError(f"{o.flag} {o.path}: is a folder; give a file name")
        parent = p.parent if str(p.parent) else Path(".")
        if not parent.is_dir():
            raise UsageError(f"{o.flag} {o.path}: folder {str(parent)!r} does not exist")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise UsageError(f"{o.flag} {o.path}: folder {str(parent)!r} is not writable")
        if p.exists() and not os.access(p, os.W_OK):
            raise UsageError(f"{o.flag} {o.path}: file is not writable")
        key = os.path.realpath(p)
        if key in seen:
            raise UsageError(f"{seen[key].flag} and {o.flag} both write {o.real}; give each output its own file")
        seen[key] = o


class AtomicWrites:
    """Collects outputs written to temporary files; :meth:`commit` renames them all into place.

    Use as a context manager: leaving it by an exception (or without ``commit``) deletes every
    temporary file, so no output appears unless all were written.
    """

    def __init__(self) -> None:
        self._done: List[Tuple[str, str]] = []  # (temporary, final)

    def write(self, out: Output, writer: Callable[[str], None]) -> None:
        """Call ``writer(temp_path)`` (the temp path keeps the target's suffix, so format-by-suffix
        writers work); an ``OSError`` becomes a ``UsageError`` naming the output."""
        final = Path(out.real)
        tmp = str(final.with_name(f".{final.name}.{os.getpid()}.tmp{final.suffix}"))
        self._done.append((tmp, str(final)))
        try:
            writer(tmp)
        except OSError as exc:
            raise UsageError(f"{out.flag} {out.path}: {one_line(exc)}") from None

    def commit(self) -> None:
        """Rename every temporary file onto its target (``os.replace``: atomic per file)."""
        for tmp, final in self._done:
            os.replace(tmp, final)
        self._done = []

    def discard(self) -> None:
        for tmp, _ in self._done:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
        self._done = []

    def __enter__(self) -> "AtomicWrites":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.discard()


def _non_finite(obj: Any, where: str = "") -> Optional[str]:
    """The first key path in ``obj`` holding NaN or an infinity, else None."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return where or "(top level)"
    if isinstance(obj, dict):
        for k, v in obj.items():
            hit = _non_finite(v, f"{where}.{k}" if where else str(k))
            if hit:
                return hit
    if isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            hit = _non_finite(v, f"{where}[{i}]")
            if hit:
                return hit
    return None


def strict_json(obj: Any) -> str:
    """``obj`` as standard JSON (indented); ``ValueError`` naming the field that holds NaN/Infinity
    (Python's ``json`` would write them, and other JSON readers reject the file)."""
    bad = _non_finite(obj)
    if bad:
        raise ValueError(f"the report's {bad} is not a finite number; refusing to write invalid JSON")
    return json.dumps(obj, indent=2, allow_nan=False, default=_plain) + "\n"


def _plain(x: Any) -> Any:
    """numpy scalars and arrays as plain Python values."""
    if hasattr(x, "tolist"):
        return x.tolist()
    raise TypeError(f"{type(x).__name__} is not JSON serializable")


def print_stdout(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()
