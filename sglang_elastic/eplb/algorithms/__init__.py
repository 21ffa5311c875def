"""Placement algorithms by name, and :func:`rebalance`, the one entry point that validates inputs.

An algorithm is a function over numpy arrays (see :class:`AlgorithmFn`); it never sees bad input
because :func:`rebalance` checks everything first and raises ``ValueError`` with a clear message.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional, Protocol, Sequence, Union

import numpy as np
import torch

from ..placement import Placement, PlacementError, as_live_mask

__all__ = ["ALGORITHMS", "AlgorithmFn", "rebalance", "register_algorithm", "normalize_load"]


class AlgorithmFn(Protocol):
    def __call__(
        self,
        weight: np.ndarray,  # float64 [L, E], non-negative
        num_ranks: int,
        slots_per_rank: int,
        live: np.ndarray,  # bool [num_ranks], at least ceil(E / slots_per_rank) True
        ranks_per_node: Optional[int],
        current: Optional[np.ndarray],  # int64 [L, num_ranks * slots_per_rank] or None
        **options,
    ) -> np.ndarray:  # int64 [L, num_ranks * slots_per_rank], -1 exactly on dead ranks
        ...


ALGORITHMS: Dict[str, AlgorithmFn] = {}


def register_algorithm(name: str, *, allows_duplicates: bool = False) -> Callable[[AlgorithmFn], AlgorithmFn]:
    """Decorator registering a placement algorithm under ``name``.

    ``allows_duplicates`` marks algorithms (upstream-compatible ones) that may put two replicas of an
    expert on one rank; their output is validated without that check.
    """

    def deco(fn: AlgorithmFn) -> AlgorithmFn:
        fn.allows_duplicates = allows_duplicates  # type: ignore[attr-defined]
        ALGORITHMS[name] = fn
        return fn

    return deco


def normalize_load(load: Union[torch.Tensor, np.ndarray, Sequence]) -> np.ndarray:
    """Load as float64 ``[L, E]``: ``[steps, L, E]`` is summed over steps. Raises ``ValueError`` on bad values."""
    w = load.detach().cpu().double().numpy() if isinstance(load, torch.Tensor) else np.asarray(load, dtype=np.float64)
    if w.ndim == 3:
        w = w.sum(0)
    if w.ndim != 2 or w.shape[0] == 0 or w.shape[1] == 0:
        raise ValueError(f"load must be [layers, experts] or [steps, layers, experts], got shape {tuple(w.shape)}")
    if not np.isfinite(w).all():
        raise ValueError("load holds NaN or infinite values")
    if (w < 0).any():
        raise ValueError("load holds negative token counts")
    return w


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
        load: tokens per expert, ``[L, E]`` or ``[steps, L, E]`` (summed over steps).
        num_ranks: EP size, dead ranks included.
        slots_per_rank: physical expert slots per rank and layer.
        live_ranks: bool/int mask ``[num_ranks]``; ``None`` means all live.
        ranks_per_node: ranks per node, for node-aware placement (must divide ``num_ranks``).
        current: the placement in force now (``Placement`` or ``phy2log`` ``[L, P]``), for movement-aware
            algorithms; its dead slots may hold ``-1``.
        algorithm: a name in :data:`ALGORITHMS` (``elasticity_aware``, ``deepseek``, ...).
        **options: algorithm options (``elasticity_aware``: ``balance_tolerance``).

    Returns:
        A validated :class:`Placement` with ``-1`` on every slot of a dead rank.

    Raises:
        ValueError: inconsistent shapes, too few live slots (the message says how many ranks or slots
            per rank are needed), unknown algorithm, bad options.
    """
    if algorithm not in ALGORITHMS:
        raise ValueError(f"unknown EPLB algorithm {algorithm!r}; choose one of {sorted(ALGORITHMS)}")
    w = normalize_load(load)
    L, E = w.shape
    for name, v in (("num_ranks", num_ranks), ("slots_per_rank", slots_per_rank)):
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v <= 0:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    if ranks_per_node is not None and (ranks_per_node <= 0 or num_ranks % ranks_per_node):
        raise ValueError(f"ranks_per_node ({ranks_per_node}) must be a positive divisor of num_ranks ({num_ranks})")
    live = as_live_mask(live_ranks, num_ranks)
    n_live = int(live.sum())
    if n_live * slots_per_rank < E:
        need_ranks = -(-E // slots_per_rank)
        need_slots = -(-E // n_live) if n_live else None
        hint = f" or {need_slots} slots per rank" if need_slots is not None else ""
        raise ValueError(
            f"{n_live} live ranks x {slots_per_rank} slots = {n_live * slots_per_rank} slots cannot hold "
            f"{E} logical experts: need at least {need_ranks} live ranks{hint}"
        )
    cur = None
    if current is not None:
        if isinstance(current, Placement):
            if current.num_ranks != num_ranks:
                raise ValueError(f"current placement is for {current.num_ranks} ranks, not {num_ranks}")
            cur = current.phy2log.numpy()
        else:
            cur = current.detach().cpu().numpy() if isinstance(current, torch.Tensor) else np.asarray(current)
        if cur.shape != (L, num_ranks * slots_per_rank):
            raise ValueError(
                f"current placement has shape {tuple(cur.shape)}, expected [layers, num_ranks * slots_per_rank] = "
                f"[{L}, {num_ranks * slots_per_rank}]"
            )
        if not np.issubdtype(cur.dtype, np.integer):
            raise ValueError(f"current placement must hold integer expert ids, got {cur.dtype}")
        if cur.min() < -1 or cur.max() >= E:
            raise ValueError(f"current placement holds expert ids outside [-1, {E})")
        cur = cur.astype(np.int64)
    fn = ALGORITHMS[algorithm]
    phy2log = fn(w, num_ranks, slots_per_rank, live, ranks_per_node, cur, **options)
    try:
        placement = Placement(torch.from_numpy(np.ascontiguousarray(phy2log)), num_ranks, E)
        return placement.validate(live, allow_duplicates=getattr(fn, "allows_duplicates", False))
    except PlacementError as exc:  # an algorithm bug, not bad input: say so
        raise RuntimeError(f"EPLB algorithm {algorithm!r} produced an invalid placement: {exc}") from exc


# Register the built-in algorithms (import for side effect).
from . import deepseek, elasticity_aware  # noqa: E402,F401
