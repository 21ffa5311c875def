"""The algorithm registry: placement algorithms by name.

An algorithm is a function over numpy arrays (see :class:`AlgorithmFn`); it never sees bad input
because :func:`sglang_elastic.eplb.rebalance` checks everything first. Algorithm modules import this
module (not the package), so the package can import them without a cycle.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional, Protocol

import numpy as np

__all__ = ["ALGORITHMS", "AlgorithmFn", "register_algorithm"]


class AlgorithmFn(Protocol):
    def __call__(
        self,
        weight: np.ndarray,  # float64 [L, E], non-negative, finite, max entry in [0.5, 1) unless all zero
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
