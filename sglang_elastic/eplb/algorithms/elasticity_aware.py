"""Elasticity-aware EPLB: balanced placement on live ranks only, moving as few experts as it can.

From scratch (:mod:`.packing`): DeepSeek's greedy replica counts, balanced largest differencing over
the live ranks, node ordering and conflict removal, a short swap refinement; without nodes, the
ranks' contents ordered so that an expert's replicas sit in different blocks of 8 consecutive ranks.

From a ``current`` placement (:mod:`.repair`): the caller states the trade-off, not a constant —
``min_balance=0.99`` asks for at least 99 % of the balancedness a from-scratch placement reaches
(after a failure or scale event upstream's, DeepSeek's greedy; for a periodic rebalance ours:
``balance_reference``), with the least movement that gets there. Every surviving replica stays unless balance needs its slot;
orphans and replicas the new counts need go to freed slots; swaps repair only the ranks above the
target; a layer that cannot reach it takes the from-scratch placement when that is better.

Dead ranks get ``-1`` in every slot; node-awareness survives dead ranks because nodes are simply
groups of live ranks of unequal size.
"""
from __future__ import annotations

from typing import Optional, Tuple

import numpy as np

from .counts import greedy_busiest, greedy_counts, max_load_bound
from .packing import from_scratch, order_ranks_by_node
from .registry import register_algorithm
from . import repair, repair_jit
from .repair import from_current

__all__ = ["elasticity_aware", "balance_target", "DEFAULT_MIN_BALANCE", "SEARCHES", "DEFAULT_SEARCH",
           "BALANCE_REFERENCES", "DEFAULT_BALANCE_REFERENCE"]

# Defaults of min_balance: (after a failure or scale event, periodic rebalance with the same live set).
DEFAULT_MIN_BALANCE = (0.99, 1.0)
# Our from-scratch placement lands about this close above max_load_bound (measured on the bench shapes).
_SCRATCH_SLACK = 5e-4
# Without ranks_per_node, a placement from scratch still spreads each expert's replicas over blocks
# of this many consecutive ranks (ranks are numbered node by node; nodes of 1, 2, 4 or 8 GPUs nest
# in these blocks): the packing puts an expert's replicas on neighbouring ranks (EP128x2: 290 of 388
# experts with two replicas had both on one node of 8), so that a dead node left 7.2 experts a layer
# without a live replica where 5.0 are left spread (EP256x2: 7.1 vs 2.9): tokens with no live
# expert until the repair lands, and the transfers that must follow.
_SPREAD_BLOCK = 8


def balance_target(w: np.ndarray, n: int, S: int, min_balance: float, reference: str = "greedy") -> np.ndarray:
    """float64 ``[L]``: the busiest-rank load each layer may reach, ``inf`` for layers without a signal.

    A layer's busiest rank at most ``ref / min_balance`` keeps the global balancedness (sum of means /
    sum of maxima) at least ``min_balance`` times the reference's. ``ref``: the busiest rank of
    DeepSeek's greedy from-scratch placement, i.e. upstream's (``reference="greedy"``,
    :func:`.counts.greedy_busiest`), or a lower bound of any placement's (``"bound"``: the mean, or the
    heaviest replica plus the ``S - 1`` lightest; our from-scratch placement lands within ~0.05 % of
    it, so 0.05 % above it, but never above the greedy's busiest rank), whichever is larger. A layer
    whose experts all carry the same load (all zero included) has no signal to balance on.

    Parameters:
        w: float64 ``[L, E]`` load. n: live ranks. S: slots per rank.
        min_balance: in ``(0, 1]``. reference: ``"greedy"`` or ``"bound"``.

    Returns:
        float64 ``[L]``.
    """
    bound = max_load_bound(w, greedy_counts(w, n * S, n), n, S)
    greedy = greedy_busiest(w, n, S)
    # The bound is below what our from-scratch reaches (slack), but never looser than upstream's
    # placement (on ranks of many slots the greedy lands closer than the slack); the greedy's is exact.
    bound = (np.maximum(bound, greedy) if reference == "greedy"
             else np.maximum(bound, np.minimum(bound * (1 + _SCRATCH_SLACK), greedy)))
    flat = w.max(1) <= w.min(1)
    return np.where(flat, np.inf, bound / min_balance)


SEARCHES = ("narrow", "wide", "both")
# Defaults of search: (after a failure or scale event, periodic rebalance with the same live set).
DEFAULT_SEARCH = ("both", "narrow")
# What min_balance is relative to (see balance_target), and its defaults (after a failure or scale
# event, periodic rebalance with the same live set).
BALANCE_REFERENCES = ("greedy", "bound")
DEFAULT_BALANCE_REFERENCE = ("greedy", "bound")


def _check_options(min_balance: Optional[float], balance_tolerance: Optional[float], max_swaps: Optional[int],
                   search: Optional[str] = None, balance_reference: Optional[str] = None) -> None:
    if min_balance is not None and balance_tolerance is not None:
        raise ValueError("give min_balance or balance_tolerance, not both (min_balance = 1 / (1 + balance_tolerance))")
    if min_balance is not None and (isinstance(min_balance, bool) or not isinstance(min_balance, (int, float, np.floating))
                                    or not 0 < min_balance <= 1):
        raise ValueError(f"min_balance must be a number in (0, 1], got {min_balance!r}")
    if balance_tolerance is not None and (isinstance(balance_tolerance, bool) or not isinstance(
            balance_tolerance, (int, float, np.floating)) or not np.isfinite(balance_tolerance) or balance_tolerance < 0):
        raise ValueError(f"balance_tolerance must be a finite number >= 0, got {balance_tolerance!r}")
    if max_swaps is not None and (isinstance(max_swaps, bool) or not isinstance(max_swaps, (int, np.integer))
                                  or max_swaps < 0):
        raise ValueError(f"max_swaps must be an integer >= 0, got {max_swaps!r}")
    if search is not None and search not in SEARCHES:
        raise ValueError(f"search must be one of {', '.join(SEARCHES)}, got {search!r}")
    if balance_reference is not None and balance_reference not in BALANCE_REFERENCES:
        raise ValueError(f"balance_reference must be one of {', '.join(BALANCE_REFERENCES)}, got {balance_reference!r}")


def _groups_of(live_idx: np.ndarray, size: int) -> Optional[np.ndarray]:
    """int64 ``[n]``: the group (node, or block of ``size`` consecutive ranks) of each live rank,
    numbered 0.. over the groups that have a live rank; ``None`` where they all share one."""
    groups = np.unique(live_idx // size, return_inverse=True)[1].astype(np.int64)
    return groups if groups.max() > 0 else None


def _live_set_changed(current: np.ndarray, live: np.ndarray, num_ranks: int, S: int) -> bool:
    was_live = (current.reshape(current.shape[0], num_ranks, S) >= 0).any(-1).any(0)
    return bool((was_live != live).any())


def _targets(weight: np.ndarray, w: np.ndarray, n: int, S: int, min_balance: float,
             reference: str, keep: Optional[np.ndarray] = None) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """``(balance_target, replica bound (with keep) or None)``: compiled where the kernels run, else the
    numpy reference (no replica bound)."""
    if repair.USE_JIT:
        return repair_jit.targets(weight, w, n, S, min_balance, 1 + _SCRATCH_SLACK, reference, keep)
    return balance_target(weight, n, S, min_balance, reference), None


@register_algorithm("elasticity_aware")
def elasticity_aware(
    weight: np.ndarray,
    num_ranks: int,
    slots_per_rank: int,
    live: np.ndarray,
    ranks_per_node: Optional[int],
    current: Optional[np.ndarray],
    *,
    min_balance: Optional[float] = None,
    balance_tolerance: Optional[float] = None,
    max_swaps: Optional[int] = None,
    search: Optional[str] = None,
    balance_reference: Optional[str] = None,
) -> np.ndarray:
    """Place experts on live ranks only; see the module docstring.

    Options (used with ``current``; a from-scratch placement is always as balanced as we can make it):
        min_balance: the trade-off: at least this fraction of the balancedness a from-scratch placement
            reaches, with the least movement. ``1.0`` asks for from-scratch balance; ``0.99`` keeps more
            experts in place for up to ~1 % less balance. Default: ``0.99`` when the live set changed
            since ``current`` (failover or scaling: restore service with few transfers), ``1.0``
            otherwise (a periodic rebalance exists to balance: from-scratch balance, least movement).
        balance_tolerance: the same trade-off as a relative excess of each layer's busiest rank over
            from-scratch's (``t`` is ``min_balance = 1 / (1 + t)``); give one of the two.
        max_swaps: cap on repair swaps per layer (default ``4 * live ranks + 8 * slots_per_rank + 32``).
        search: where each swap of a layer's busiest rank looks for a partner. ``"narrow"``: the 6 least
            busy ranks, and where none of them offers a free swap, up to 12 more under the target that
            can (see :func:`.refine.best_swaps`); ``"wide"``: every rank under the target (0-22 % fewer
            transfers after a failure on the bench's loads than narrow, ~1.7x the time); ``"both"``:
            narrow, then wide again for the layers whose narrow swaps fetched more than 24 experts, each
            layer stopping on either search's swaps (the same ~6 % fewer transfers than narrow as wide,
            where wide helps: the time of narrow where the swaps fetch little, ~2x on skewed loads); on
            a problem of at most 4096 live slots or 19 live ranks (where narrow may ask every rank),
            every layer narrow again with counts from a looser replica bound (~2x narrow's time).
            Default: ``"both"`` when the live set changed since ``current`` (the transfers are on the
            way back to service), ``"narrow"`` otherwise (a periodic rebalance: both saves 2-4 % there
            for twice the time).
        balance_reference: what ``min_balance`` is a fraction of. ``"greedy"``: the balancedness of
            DeepSeek's greedy from-scratch placement on the live ranks, i.e. what upstream SGLang's EPLB
            would give (where our from-scratch beats it, e.g. on a few very hot experts, the movement
            it would take to match ours is saved). ``"bound"``: a lower bound of any placement's busiest
            rank (our from-scratch balance, within ~0.05 %): stricter, more movement on skewed loads.
            Default: ``"greedy"`` when the live set changed since ``current`` (restore service as
            balanced as upstream's full rebalance would, moving little), ``"bound"`` otherwise (a
            periodic rebalance: as balanced as we can place).
    """
    L, E = weight.shape
    S = slots_per_rank
    _check_options(min_balance, balance_tolerance, max_swaps, search, balance_reference)
    if S > E:
        raise ValueError(
            f"slots_per_rank ({S}) exceeds the number of logical experts ({E}): a rank would hold an expert twice"
        )
    live_idx = np.flatnonzero(live)
    n = len(live_idx)
    node_of = None  # also where one node is left: nothing to spread over
    if ranks_per_node is not None and ranks_per_node < num_ranks:
        node_of = _groups_of(live_idx, ranks_per_node)
    # Swaps that re-route moved replicas (refine's extra partners) balance less per step: at half this
    # cap every layer of DS-V3 under zipf 1.2 ran out (129 swaps needed) and took a from-scratch
    # placement (+14 % transfers, ~4x the time). Layers that reach their target stop long before it;
    # no from-scratch placement of the bench reaches it.
    iters = max_swaps if max_swaps is not None else 4 * n + 8 * S + 32
    # Zero-load experts still need a replica; a tiny floor keeps every ratio finite and well ordered.
    w = weight + (weight.sum(1, keepdims=True) / (E * 1e9) + 1e-300)

    if current is None:
        # Never less balanced than upstream's EPLB would place this load: its greedy busiest rank per
        # layer is the ceiling (where it splits an expert twice on a rank, out of reach, the bound).
        ceiling, _ = _targets(weight, w, n, S, 1.0, "greedy")
        result, _ = from_scratch(w, n, S, node_of, iters, ceiling=ceiling)
        blocks = _groups_of(live_idx, _SPREAD_BLOCK) if node_of is None else None
        if blocks is not None:
            # Rank contents stay, only which rank holds which changes: the balance is the same.
            result = order_ranks_by_node(result, blocks)
    else:
        event = _live_set_changed(current, live, num_ranks, S)
        if balance_tolerance is not None:
            min_balance = 1.0 / (1.0 + balance_tolerance)
        elif min_balance is None:
            min_balance = DEFAULT_MIN_BALANCE[0 if event else 1]
        if balance_reference is None:
            balance_reference = DEFAULT_BALANCE_REFERENCE[0 if event else 1]
        if search is None:
            search = DEFAULT_SEARCH[0 if event else 1]
        cur = current.reshape(L, num_ranks, S)[:, live_idx]
        # After a failure or scale event the survivors keep the counts the current placement was made
        # with where the target allows (ours cap heavy replicas where the greedy's pair them); a
        # periodic rebalance exists to rebalance counts too.
        keep = repair.surviving_heaviest(w, cur) if event else None
        target, rep_bound = _targets(weight, w, n, S, min_balance, balance_reference, keep)
        exact = balance_reference == "greedy"
        # A layer just above a bound-based target is compared with a placement from scratch, made as the
        # healthy path makes it (upstream's busiest rank its ceiling).
        # (upstream's greedy placement of those layers only: most calls have none)
        scratch_ceiling = None if exact else lambda rows: _targets(weight[rows], w[rows], n, S, 1.0, "greedy")[0]
        result = from_current(w, cur, n, S, node_of, iters, target, min_balance, search=search,
                              rep_bound=rep_bound, exact_target=exact, keep=keep, scratch_ceiling=scratch_ceiling)
    out = np.full((L, num_ranks, S), -1, dtype=np.int64)
    out[:, live_idx] = result
    return out.reshape(L, num_ranks * S)
