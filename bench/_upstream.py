"""Thin adapters over upstream SGLang 0.5.23's EPLB algorithms, for side-by-side benchmarks.

Each adapter calls the upstream function unchanged and converts its ``physical_to_logical_map``
into our :class:`~sglang_elastic.eplb.Placement` (``-1`` on every slot of a dead rank).

Upstream ``deepseek`` and ``deepseek_vec`` know nothing about dead ranks. For a live mask with dead
ranks they are run over the live ranks only (``num_gpus`` = live count, flat: the hierarchical
variants need ``num_gpus % num_nodes == 0``, which a dead rank breaks, so they take the same flat
fallback upstream ``elasticity_aware`` takes), and their output is scattered into the live ranks'
positions. Upstream ``elasticity_aware`` takes the live mask itself (``active_ranks``, int tensor).

Every adapter is split in two so that a benchmark can time the upstream call alone:
``prepare_*(...) -> (call, convert)`` where ``call()`` runs upstream and ``convert(result)`` builds
the Placement. ``run_*`` does both.

Install upstream as the project does: ``bash .ci/setup --test`` (``pip install --no-deps
sglang==0.5.23`` plus ``bench/requirements-upstream.txt``).
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from sglang_elastic.eplb import Placement
from sglang_elastic.eplb.placement import as_live_mask

__all__ = [
    "UPSTREAM_VERSION",
    "upstream_available",
    "prepare_deepseek",
    "prepare_deepseek_vec",
    "prepare_elasticity_aware",
    "run_deepseek",
    "run_deepseek_vec",
    "run_elasticity_aware",
]

UPSTREAM_VERSION = "0.5.23"

Load = Union[np.ndarray, torch.Tensor]
Mask = Optional[Union[np.ndarray, torch.Tensor, Sequence]]
Prepared = Tuple[Callable[[], tuple], Callable[[tuple], Placement]]


def _modules():
    try:
        from sglang.srt.eplb.eplb_algorithms import deepseek, deepseek_vec, elasticity_aware
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            f"upstream SGLang is not importable ({exc}); install it with "
            f"`pip install --no-deps sglang=={UPSTREAM_VERSION} && pip install -r bench/requirements-upstream.txt` "
            "(or `bash .ci/setup --test`)"
        ) from exc
    return deepseek, deepseek_vec, elasticity_aware


def upstream_available() -> Tuple[bool, str]:
    """``(True, version)`` when upstream's EPLB modules import, else ``(False, reason)``."""
    try:
        _modules()
        import sglang

        return True, getattr(sglang, "__version__", "?")
    except ImportError as exc:
        return False, str(exc)


def _weight2d(load: Load) -> torch.Tensor:
    w = load if isinstance(load, torch.Tensor) else torch.from_numpy(np.asarray(load, dtype=np.float64))
    if w.dim() == 3:
        w = w.sum(0)
    return w.float()


def _scatter_live(p2l: torch.Tensor, live: np.ndarray, slots_per_rank: int, num_experts: int) -> Placement:
    """``p2l`` computed over the live ranks only -> a Placement over all ranks, ``-1`` on dead ones."""
    L = p2l.shape[0]
    R = live.shape[0]
    out = torch.full((L, R, slots_per_rank), -1, dtype=torch.int64)
    out[:, torch.from_numpy(live)] = p2l.to(torch.int64).view(L, int(live.sum()), slots_per_rank)
    return Placement(out.view(L, R * slots_per_rank), R, num_experts)


def prepare_deepseek(load: Load, num_ranks: int, slots_per_rank: int, *, live_ranks: Mask = None,
                     num_groups: Optional[int] = None, num_nodes: int = 1,
                     hierarchical: bool = False) -> Prepared:
    """Upstream ``deepseek.rebalance_experts`` (over the live ranks only when some are dead)."""
    deepseek, _, _ = _modules()
    w = _weight2d(load)
    E = w.shape[1]
    live = as_live_mask(live_ranks, num_ranks)
    n = int(live.sum())
    all_live = n == num_ranks
    hier = hierarchical and all_live
    groups = num_groups if num_groups is not None else num_nodes

    def call():
        return deepseek.rebalance_experts(w, n * slots_per_rank, groups, num_nodes if hier else 1, n, hier)

    def convert(res) -> Placement:
        return _scatter_live(res[0], live, slots_per_rank, E)

    return call, convert


def prepare_deepseek_vec(load: Load, num_ranks: int, slots_per_rank: int, *, live_ranks: Mask = None,
                         num_groups: Optional[int] = None, num_nodes: int = 1,
                         hierarchical: bool = False) -> Prepared:
    """Upstream ``deepseek_vec.rebalance_experts`` (``tokens_per_expert`` ``[1, L, E]``; live ranks only)."""
    _, deepseek_vec, _ = _modules()
    w = _weight2d(load)
    E = w.shape[1]
    tpe = w.unsqueeze(0).contiguous()
    live = as_live_mask(live_ranks, num_ranks)
    n = int(live.sum())
    hier = hierarchical and n == num_ranks
    groups = num_groups if num_groups is not None else num_nodes

    def call():
        return deepseek_vec.rebalance_experts(tpe, n * slots_per_rank, slots_per_rank, groups,
                                              num_nodes if hier else 1, hier)

    def convert(res) -> Placement:
        return _scatter_live(res[0], live, slots_per_rank, E)

    return call, convert


def prepare_elasticity_aware(load: Load, num_ranks: int, slots_per_rank: int, *, live_ranks: Mask = None,
                             num_groups: Optional[int] = None, num_nodes: int = 1,
                             hierarchical: bool = False) -> Prepared:
    """Upstream ``elasticity_aware.rebalance_experts`` with ``active_ranks`` = the live mask (int32).

    Upstream fills dead ranks' slots with ``0``; :meth:`Placement.from_sglang` turns them into ``-1``.
    With any rank dead, upstream ignores ``enable_hierarchical`` (flat fallback). It asserts when the
    live slots cannot hold every expert.
    """
    _, _, elasticity_aware = _modules()
    w = _weight2d(load)
    E = w.shape[1]
    live = as_live_mask(live_ranks, num_ranks)
    active = torch.from_numpy(live.astype(np.int32))
    groups = num_groups if num_groups is not None else num_nodes

    def call():
        return elasticity_aware.rebalance_experts(w, num_ranks * slots_per_rank, groups, num_nodes, num_ranks,
                                                  hierarchical, active)

    def convert(res) -> Placement:
        return Placement.from_sglang(res[0], num_ranks, E, live_ranks=live)

    return call, convert


def _run(prep: Prepared) -> Placement:
    call, convert = prep
    return convert(call())


def run_deepseek(load: Load, num_ranks: int, slots_per_rank: int, **kw) -> Placement:
    """Upstream ``deepseek`` as a Placement; see :func:`prepare_deepseek`."""
    return _run(prepare_deepseek(load, num_ranks, slots_per_rank, **kw))


def run_deepseek_vec(load: Load, num_ranks: int, slots_per_rank: int, **kw) -> Placement:
    """Upstream ``deepseek_vec`` as a Placement; see :func:`prepare_deepseek_vec`."""
    return _run(prepare_deepseek_vec(load, num_ranks, slots_per_rank, **kw))


def run_elasticity_aware(load: Load, num_ranks: int, slots_per_rank: int, **kw) -> Placement:
    """Upstream ``elasticity_aware`` as a Placement; see :func:`prepare_elasticity_aware`."""
    return _run(prepare_elasticity_aware(load, num_ranks, slots_per_rank, **kw))
