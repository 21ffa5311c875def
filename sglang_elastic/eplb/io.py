"""Reading data files safely: expert-load recordings (tokens per layer and logical expert) and more.

Load formats, chosen by suffix:

- ``.pt``: SGLang's expert-distribution recording (``_ExpertDistributionRecorderReal`` in ``stat``
  mode dumps ``{"rank", "logical_count", "average_utilization_rate_over_window"}``, with
  ``logical_count`` ``[steps, layers, experts]``); any dict with a ``logical_count`` entry
  (``[L, E]`` or ``[steps, L, E]``), or a bare tensor, is accepted.
- ``.npy``: a numpy matrix ``[L, E]`` or ``[steps, L, E]``.
- ``.json``: a list of lists (``[L][E]`` or ``[steps][L][E]``), or a dict with ``logical_count``.

``[steps, L, E]`` is summed over steps. Every problem is a ``ValueError`` with a one-line message
naming the file. :func:`read_data_file` is the safe reader under it (also for placements and YAML):
no pickle, ever, and never the advice to enable it that torch's and numpy's own messages give.
"""
from __future__ import annotations

import json
import pickle
import struct
import zipfile
from pathlib import Path
from typing import Any, Sequence, Union

import numpy as np
import torch

__all__ = ["LOAD_SUFFIXES", "DATA_SUFFIXES", "load_expert_load", "read_data_file"]

LOAD_SUFFIXES = (".pt", ".npy", ".json")
DATA_SUFFIXES = (".pt", ".npy", ".json", ".yaml", ".yml")

# Python objects in a .pt/.npy would need pickle to load, which can run code: they are never loaded.
_UNSAFE = "it holds Python objects beyond tensors, numbers, lists and dicts; loading those is unsafe, so they are not loaded"


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def read_data_file(path: Union[str, Path], suffixes: Sequence[str] = DATA_SUFFIXES, what: str = "data") -> Any:
    """The object stored in ``path``, read safely by its suffix (``.pt``, ``.npy``, ``.json``, ``.yaml``).

    ``.pt`` is read with ``weights_only=True``, ``.npy`` without pickle, YAML with ``safe_load``.
    Raises ``ValueError`` with one line naming the file: unknown suffix, no such file, a folder,
    an empty file, binary data in a text format, corrupt data, or Python objects a safe load refuses.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if path.is_dir():
        raise ValueError(f"{path}: is a folder, not a file")
    if suffix not in suffixes:
        raise ValueError(f"{path}: unknown {what} file type {path.suffix or '(no suffix)'!r}; "
                         f"use one of {', '.join(suffixes)}")
    if not path.exists():
        raise ValueError(f"{path}: no such file")
    try:
        if path.stat().st_size == 0:
            raise ValueError(f"{path}: cannot read as {suffix} (the file is empty, 0 bytes)")
        if suffix == ".pt":
            return _read_pt(path)
        if suffix == ".npy":
            return _read_npy(path)
        return _read_text(path, suffix)
    except OSError as exc:
        raise ValueError(f"{path}: cannot read ({_one_line(exc)})") from None


def _read_pt(path: Path) -> Any:
    try:
        return torch.load(str(path), weights_only=True, map_location="cpu")
    except pickle.UnpicklingError:
        why = _UNSAFE if zipfile.is_zipfile(path) else "not a PyTorch file: torch.save's format expected"
    except (RuntimeError, EOFError, ValueError, TypeError, KeyError, IndexError, AttributeError,
            UnicodeDecodeError, struct.error):  # a corrupt archive fails in any of these ways
        why = "corrupt or truncated PyTorch file"
    raise ValueError(f"{path}: cannot read as .pt ({why})")


def _read_npy(path: Path) -> Any:
    try:
        return np.load(str(path), allow_pickle=False)
    except ValueError as exc:
        text = str(exc)
        why = (_UNSAFE if "Object arrays" in text else
               "not a .npy file" if "pickled" in text else "corrupt or truncated .npy file")
    except (EOFError, TypeError, UnicodeDecodeError):
        why = "corrupt or truncated .npy file"
    raise ValueError(f"{path}: cannot read as .npy ({why})")


def _read_text(path: Path, suffix: str) -> Any:
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: cannot read as {suffix} (binary data at byte {exc.start}, not UTF-8 text)") from None
    if "\x00" in text:
        raise ValueError(f"{path}: cannot read as {suffix} (binary data at byte {raw.index(0)}, not text)")
    if suffix == ".json":
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: cannot read as .json ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: cannot read as {suffix} ({_one_line(exc)})") from None


def load_expert_load(path: Union[str, Path]) -> np.ndarray:
    """float64 ``[layers, experts]`` load (tokens per logical expert) read from ``path``.

    Raises:
        ValueError: unknown suffix, unreadable file, a dict without ``logical_count``, a value that is
            not a rectangular numeric array of 2 or 3 dimensions, or negative / NaN / infinite counts.
    """
    path = Path(path)
    data = read_data_file(path, LOAD_SUFFIXES, what="load")
    if isinstance(data, dict):
        if "logical_count" not in data:
            raise ValueError(f"{path.name}: expected a 'logical_count' entry, found keys {sorted(map(str, data))}")
        data = data["logical_count"]
    try:
        if isinstance(data, torch.Tensor):
            if data.is_complex() or data.dtype == torch.bool:
                raise TypeError(f"dtype {data.dtype}")
            w = data.detach().cpu().double().numpy()
        else:
            arr = np.asarray(data)
            if arr.dtype == object or not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
                raise TypeError(f"dtype {arr.dtype}")
            w = arr.astype(np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{path.name}: load is not a rectangular numeric array ({_one_line(exc)})") from None
    if w.ndim not in (2, 3):
        raise ValueError(f"{path.name}: load must be [layers, experts] or [steps, layers, experts], "
                         f"got shape {tuple(w.shape)}")
    if 0 in w.shape:
        raise ValueError(f"{path.name}: load is empty (shape {tuple(w.shape)})")
    if not np.isfinite(w).all():
        raise ValueError(f"{path.name}: load holds NaN or infinite values")
    if (w < 0).any():
        raise ValueError(f"{path.name}: load holds negative token counts")
    return w.sum(0) if w.ndim == 3 else w
