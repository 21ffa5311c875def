"""Reading expert-load recordings (tokens per layer and logical expert) from files.

Formats, chosen by suffix:

- ``.pt``: SGLang's expert-distribution recording (``_ExpertDistributionRecorderReal`` in ``stat``
  mode dumps ``{"rank", "logical_count", "average_utilization_rate_over_window"}``, with
  ``logical_count`` ``[steps, layers, experts]``); any dict with a ``logical_count`` entry
  (``[L, E]`` or ``[steps, L, E]``), or a bare tensor, is accepted.
- ``.npy``: a numpy matrix ``[L, E]`` or ``[steps, L, E]``.
- ``.json``: a list of lists (``[L][E]`` or ``[steps][L][E]``), or a dict with ``logical_count``.

``[steps, L, E]`` is summed over steps. Every problem is a ``ValueError`` with a one-line message
naming the file.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch

__all__ = ["LOAD_SUFFIXES", "load_expert_load"]

LOAD_SUFFIXES = (".pt", ".npy", ".json")


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _read(path: Path) -> Any:
    suffix = path.suffix.lower()
    if suffix not in LOAD_SUFFIXES:
        raise ValueError(f"{path.name}: unknown load file type {path.suffix or '(no suffix)'!r}; "
                         f"use one of {', '.join(LOAD_SUFFIXES)}")
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    try:
        if suffix == ".pt":
            return torch.load(str(path), weights_only=True, map_location="cpu")
        if suffix == ".npy":
            return np.load(str(path), allow_pickle=False)
        return json.loads(path.read_text())
    except Exception as exc:  # noqa: BLE001 - a corrupt file fails in many ways (struct.error, UnpicklingError, ...)
        raise ValueError(f"{path.name}: cannot read as {suffix} ({_one_line(exc)})") from None


def load_expert_load(path: Union[str, Path]) -> np.ndarray:
    """float64 ``[layers, experts]`` load (tokens per logical expert) read from ``path``.

    Raises:
        ValueError: unknown suffix, unreadable file, a dict without ``logical_count``, a value that is
            not a rectangular numeric array of 2 or 3 dimensions, or negative / NaN / infinite counts.
    """
    path = Path(path)
    data = _read(path)
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
