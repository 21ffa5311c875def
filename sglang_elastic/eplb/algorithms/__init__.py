"""Placement algorithms by name, and :func:`rebalance`, the one entry point that validates inputs.

An algorithm is a function over numpy arrays (see :class:`~.registry.AlgorithmFn`); it never sees bad
input because :func:`rebalance` checks everything first (see :mod:`.inputs`).
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import numpy as np
import torch

from ..placement import Placement, PlacementError
from . import deepseek, elasticity_aware, repair_jit  # noqa: F401  (register the built-in algorithms)
from .inputs import check_current, live_mask_from, normalize_load
from .registry import ALGORITHMS, AlgorithmFn, register_algorithm

__all__ = ["ALGORITHMS", "AlgorithmFn", "rebalance", "register_algorithm", "normalize_load"]


def _check_sizes(num_ranks: int, slots_per_rank: int, ranks_per_node: Optional[int]) -> None:
    for name, v in (("num_ranks", num_ranks), ("slots_per_rank", slots_per_rank)):
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v <= 0:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    if ranks_per_node is not None and (not isinstance(ranks_per_node, (int, np.integer)) or isinstance(
            ranks_per_node, bool) or ranks_per_node <= 0 or num_ranks % ranks_per_node):
        raise ValueError(f"ranks_per_node ({ranks_per_node!r}) must be a positive divisor of num_ranks ({num_ranks})")


def _check_capacity(n_live: int, slots_per_rank: int, num_experts: int) -> None:
    if n_live * slots_per_rank >= num_experts:
        return
    need_ranks = -(-num_experts // slots_per_rank)
    hint = f" or {-(-num_experts // n_live)} slots per rank" if n_live else ""
    raise ValueError(
        f"{n_live} live ranks x {slots_per_rank} slots = {n_live * slots_per_rank} slots cannot hold "
        f"{num_experts} logical experts: need at least {need_ranks} live ranks{hint}"
    )


def rebalance(
    load: Union[torch.Tensor, np.ndarray],
    num_ranks: int,
    slots_per_rank: int,
    *,
    live_ranks: Optional[Union[torch.Tensor, np.ndarray, Sequence]] = None,
    ranks_per_node: Optional[int] = None,
    current: Optional[Union[Placement, torch.Tensor, np.ndarray]] = None,
    algorithm: str = "elasticity_aware",
    **options,
) -> Placement:
    """Compute a placement of ``E`` logical experts over the live ranks' ``slots_per_rank`` slots.

    Args:
        load: tokens per expert, ``[L, E]`` or ``[steps, L, E]`` (summed over steps); int or float.
        num_ranks: EP size, dead ranks included.
        slots_per_rank: physical expert slots per rank and layer.
        live_ranks: a bool mask ``[num_ranks]`` or a list of live rank ids (integers are always ids);
            ``None`` means all live.
        ranks_per_node: ranks per node, for node-aware placement (must divide ``num_ranks``).
        current: the placement in force now (``Placement`` or ``phy2log`` ``[L, P]``), for movement-aware
            algorithms; its dead slots may hold ``-1``.
        algorithm: a name in :data:`ALGORITHMS` (``elasticity_aware``, ``deepseek``, ...).
        **options: algorithm options (``elasticity_aware``: ``min_balance`` or ``balance_tolerance``,
            ``max_swaps``; ``deepseek``: ``num_groups``).

    Returns:
        A validated :class:`Placement` with ``-1`` on every slot of a dead rank.

    Raises:
        TypeError: a missing or non-numeric load, live ranks that are neither bools nor integers,
            unknown options.
        ValueError: inconsistent shapes, too few live slots (the message says how many ranks or slots
            per rank are needed), unknown algorithm, bad option values.
    """
    if algorithm not in ALGORITHMS:
        raise ValueError(f"unknown EPLB algorithm {algorithm!r}; choose one of {sorted(ALGORITHMS)}")
    w = normalize_load(load)
    L, E = w.shape
    _check_sizes(num_ranks, slots_per_rank, ranks_per_node)
    live = live_mask_from(live_ranks, num_ranks)
    _check_capacity(int(live.sum()), slots_per_rank, E)
    cur = None if current is None else check_current(current, L, num_ranks, slots_per_rank, E)
    fn = ALGORITHMS[algorithm]
    phy2log = fn(w, num_ranks, slots_per_rank, live, ranks_per_node, cur, **options)
    allow_dup = getattr(fn, "allows_duplicates", False)
    try:
        placement = Placement(torch.from_numpy(np.ascontiguousarray(phy2log)), num_ranks, E)
        if repair_jit.valid(placement.phy2log.numpy(), num_ranks, E, live, allow_dup):
            return placement  # the compiled check passed: validate would too (it finds the message)
        return placement.validate(live, allow_duplicates=allow_dup)
    except PlacementError as exc:  # an algorithm bug, not bad input: say so
        raise RuntimeError(f"EPLB algorithm {algorithm!r} produced an invalid placement: {exc}") from exc
