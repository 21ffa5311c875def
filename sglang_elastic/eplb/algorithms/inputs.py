"""Input checks for :func:`~sglang_elastic.eplb.rebalance`: load, live ranks, current placement.

Each function turns one caller-facing argument into the plain numpy array the algorithms expect, or
raises ``TypeError`` (wrong kind of value) / ``ValueError`` (right kind, bad content) with a
one-line message naming the argument.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import numpy as np
import torch

from ..placement import Placement

__all__ = ["normalize_load", "scale_to_unit", "live_mask_from", "check_current"]

ArrayLike = Union[torch.Tensor, np.ndarray, Sequence]


def _as_numpy(value: ArrayLike, name: str) -> np.ndarray:
    """``value`` as a numpy array without copying tensors' dtype away (to judge it)."""
    if value is None:
        raise TypeError(f"{name} is required, got None")
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy() if value.dtype != torch.bfloat16 else value.detach().cpu().double().numpy()
    try:
        return np.asarray(value)
    except (ValueError, TypeError) as exc:  # ragged nested lists
        raise TypeError(f"{name} must be a rectangular numeric array ({str(exc).splitlines()[0]})") from None


def scale_to_unit(w: np.ndarray) -> np.ndarray:
    """``w`` times the power of two that brings its largest entry into ``[0.5, 1)`` (all zero: unchanged).

    A power of two is exact in floating point, so ratios, ties and orderings are those of the caller's
    numbers while sums of huge values (1e308) can no longer overflow.

    Parameters:
        w: float64 ``[...]``, finite and non-negative.

    Returns:
        float64 array of ``w``'s shape.
    """
    top = float(w.max()) if w.size else 0.0
    if top <= 0.0:
        return w
    k = int(np.frexp(top)[1])
    if -1000 < k < 1000:  # 2 ** -k is a normal float: the product is ldexp's, ~20x cheaper
        return w * (2.0 ** -k)
    return np.ldexp(w, -k)


def normalize_load(load: ArrayLike) -> np.ndarray:
    """Load as float64 ``[L, E]`` scaled by a power of two (max in ``[0.5, 1)``); ``[steps, L, E]`` is summed.

    Raises:
        TypeError: ``None``, a bool, complex or non-numeric load.
        ValueError: wrong number of dimensions, an empty axis, NaN, infinite or negative values.
    """
    arr = _as_numpy(load, "load")
    if arr.dtype == bool or not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise TypeError(f"load must hold real token counts (int or float), got dtype {arr.dtype}")
    if arr.ndim not in (2, 3) or 0 in arr.shape:
        raise ValueError(f"load must be [layers, experts] or [steps, layers, experts], got shape {tuple(arr.shape)}")
    w = arr.astype(np.float64)
    if not np.isfinite(w).all():
        raise ValueError("load holds NaN or infinite values")
    if (w < 0).any():
        raise ValueError("load holds negative token counts")
    w = scale_to_unit(w)  # before summing steps: 1e308 + 1e308 must not overflow
    return w.sum(0) if w.ndim == 3 else w


def live_mask_from(live_ranks: Optional[ArrayLike], num_ranks: int) -> np.ndarray:
    """bool ``[num_ranks]`` from ``live_ranks``: a bool mask (one entry per rank) or integer rank ids.

    Integers are always rank ids (``[0, 1]`` on 2 ranks means both live), bools always a mask, so
    no input is read two ways. ``None`` means all ranks live.

    Raises:
        TypeError: floats or other non-integer, non-bool values.
        ValueError: a mask of the wrong length, ids out of range or listed twice.
    """
    if live_ranks is None:
        return np.ones(num_ranks, dtype=bool)
    arr = _as_numpy(live_ranks, "live_ranks")
    if arr.ndim != 1:
        raise ValueError(f"live_ranks must be 1-D (a bool mask or a list of rank ids), got shape {tuple(arr.shape)}")
    if arr.dtype == bool:
        if arr.shape[0] != num_ranks:
            raise ValueError(f"live_ranks as a bool mask must have one entry per rank ({num_ranks}), got {arr.shape[0]}")
        return arr.copy()
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"live_ranks must be a bool mask or integer rank ids, got dtype {arr.dtype}")
    ids = arr.astype(np.int64)
    bad = ids[(ids < 0) | (ids >= num_ranks)]
    if bad.size:
        raise ValueError(f"live_ranks holds rank id {int(bad[0])} outside [0, {num_ranks}) "
                         "(integers are rank ids; pass bools for a mask)")
    uniq, cnt = np.unique(ids, return_counts=True)
    if (cnt > 1).any():
        raise ValueError(f"live_ranks lists rank {int(uniq[cnt > 1][0])} twice "
                         "(integers are rank ids; pass bools for a mask)")
    mask = np.zeros(num_ranks, dtype=bool)
    mask[ids] = True
    return mask


def check_current(current: Union[Placement, ArrayLike], num_layers: int, num_ranks: int, slots_per_rank: int,
                  num_experts: int) -> np.ndarray:
    """int64 ``[L, num_ranks * slots_per_rank]`` from a :class:`Placement` or a ``phy2log`` array.

    Raises:
        ValueError: wrong rank count or shape, non-integer ids, ids outside ``[-1, E)``.
    """
    if isinstance(current, Placement):
        if current.num_ranks != num_ranks:
            raise ValueError(f"current placement is for {current.num_ranks} ranks, not {num_ranks}")
        cur = current.phy2log.numpy()
    else:
        cur = _as_numpy(current, "current")
    P = num_ranks * slots_per_rank
    if cur.shape != (num_layers, P):
        raise ValueError(f"current placement has shape {tuple(cur.shape)}, expected [layers, num_ranks * "
                         f"slots_per_rank] = [{num_layers}, {P}]")
    if cur.dtype == bool or not np.issubdtype(cur.dtype, np.integer):
        raise ValueError(f"current placement must hold integer expert ids, got {cur.dtype}")
    if cur.size and (cur.min() < -1 or cur.max() >= num_experts):
        raise ValueError(f"current placement holds expert ids outside [-1, {num_experts})")
    return cur.astype(np.int64)
