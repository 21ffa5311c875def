"""Movement-aware placement: repair the placement in force, then swap towards balance."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Tuple

import numpy as np
from scipy.optimize import linear_sum_assignment

from .conflicts import fix_conflicts
from .counts import BIG, lightest_sum, replica_counts
from .packing import from_scratch
from .recount import recount
from . import refine_jit, repair_jit
from .refine import refine, rewind
from .slots import SlotState, drop_duplicates

__all__ = ["drop_surplus", "pool_items", "place_pool", "replica_bound", "surviving_heaviest", "from_current",
           "choose_stops"]

_AIM_PAST = 2e-3  # how far past min_balance the swap refinement aims (see from_current)
_NEAR = 1 + 2e-3  # a layer this close above its target is compared with from scratch (_already_there)
# Layers (int64 indices into the caller's layers) -> float64 ceiling of each: computed on demand.
Ceiling = Callable[[np.ndarray], np.ndarray]
_LIGHT = 6  # the narrow search: partners of the busiest rank among this many least busy ranks
# ... and, where none of them offers a swap that fetches nothing, up to this many more that may
# (refine.best_swaps' ``extra``): 2-7 % fewer transfers after a failure on the bench's loads, 4 more of
# its 31 failure cells within the target, ~0.6 ms on its speed cell.
_EXTRA = 12
# search="both": a layer whose narrow swaps fetched more than this many experts is searched wide too,
# from the same repair, and stops on whichever trace serves the sum best (choose_stops sees both): 6 %
# fewer transfers over the bench's 31 failure cells (up to 22 % on a cell: zipf 1.2), one more cell in
# the target. Wide re-routes moved replicas for free where the narrow swaps fetch a lot;
# elsewhere it rarely finds better and costs ~1.7x the narrow search (every layer again: 2.3x the
# time on the speed cell, where no layer's swaps fetch more than 24, for 3 % fewer transfers).
_RETRY = 24
# search="both" on a whole problem of at most this many live slots (L x n x S; a pass takes ~0.2 ms
# there), or on at most _FEW_RANKS live ranks (the narrow search may ask every other rank):
# every layer is searched again, narrow, with counts from a replica bound twice as loose (fewer count
# trades): on the 10x7 toy with a hot expert 30 -> 28 transfers, the cell's target; small odd shapes
# -2.7 %; Qwen3 EP16x10 (14-15 live ranks) -3 to -6 % for ~2x its time. Wide again instead: -0.5 % on
# the small shapes, the toy at 30.
_SMALL = 4096
_FEW_RANKS = _LIGHT + _EXTRA + 1
_SMALL_CANDIDATES = ((False, 2.0),)  # (wide search, replica bound factor)
# ... and, on a problem of at most _SMALL live slots without nodes, one more that changes replica
# counts (.recount: orphans into replica slots, then count trades, then the narrow swaps), the count
# moves of the exact solutions (docs/results.md, session 29): the small odd shapes 3208 -> 3033
# transfers, 25 -> 22 cells missed, ~0.4 ms more a cell. Not on few ranks with more slots (Qwen3
# EP16x10: -3 to -6 % transfers for 2.5-4x the time, 7 -> 20 ms where upstream takes 24-27 ms).
_RECOUNT = True
# The compiled repair and refinement (repair_jit: same decisions as replica_counts, drop_surplus,
# pool_items + place_pool, fix_conflicts and refine.refine here; ~20x faster); tests switch it off to compare.
USE_JIT = refine_jit.AVAILABLE


def _count(ids: np.ndarray, size: int) -> np.ndarray:
    """int64 ``[L, size]``: occurrences of each id in ``[0, size)`` per row of ``ids`` ``[L, K]``."""
    L = ids.shape[0]
    return np.bincount((ids + size * np.arange(L)[:, None]).ravel(), minlength=L * size).reshape(L, size)


def drop_surplus(x: np.ndarray, counts: np.ndarray, per: np.ndarray) -> np.ndarray:
    """Empty the slots of replicas beyond ``counts``, taking them from the busiest ranks first.

    Parameters:
        x: int64 ``[L, n, S]`` experts on live ranks (``-1`` = empty), no expert twice on a rank.
        counts: int64 ``[L, E]`` replicas wanted. per: float64 ``[L, E]`` load per replica.

    Returns:
        int64 ``[L, n, S]``: ``x`` with at most ``counts[e]`` replicas of each expert ``e``.
    """
    L, n, S = x.shape
    E = counts.shape[1]
    flat = x.reshape(L, n * S)
    load = np.where(x >= 0, np.take_along_axis(per, np.maximum(x, 0).reshape(L, -1), 1).reshape(x.shape), 0.0).sum(-1)
    rank_load = np.repeat(load, S, axis=1)
    # Order slots by expert, busiest rank first within an expert, then by slot: the first surplus ones go.
    eid = np.where(flat >= 0, flat, E)
    order = np.lexsort((-rank_load, eid), axis=1)
    e_sorted = np.take_along_axis(eid, order, 1)
    have = _count(e_sorted, E + 1)
    first = np.cumsum(have, 1) - have
    pos = np.arange(n * S)[None] - np.take_along_axis(first, e_sorted, 1)
    surplus = np.concatenate([np.maximum(have[:, :E] - counts, 0), np.zeros((L, 1), np.int64)], 1)
    drop = np.zeros((L, n * S), dtype=bool)
    np.put_along_axis(drop, order, pos < np.take_along_axis(surplus, e_sorted, 1), 1)
    return np.where(drop, -1, flat).reshape(L, n, S)


def pool_items(x: np.ndarray, counts: np.ndarray, per: np.ndarray) -> np.ndarray:
    """int64 ``[L, W]``: replicas still to place (``counts`` minus those in ``x``), heaviest first, ``-1`` padded."""
    L, E = counts.shape
    have = _count(x.reshape(L, -1) + 1, E + 1)
    need = np.maximum(counts - have[:, 1:], 0)
    order = np.argsort(-per, axis=1, kind="stable")
    rep = np.take_along_axis(need, order, 1)
    total = rep.sum(1)
    W = int(total.max()) if L else 0
    out = np.full((L, W), -1, dtype=np.int64)
    if W == 0:
        return out
    e = np.repeat(order.ravel(), rep.ravel())
    l = np.repeat(np.arange(L), total)
    pos = np.arange(e.size) - np.repeat(np.cumsum(total) - total, total)
    out[l, pos] = e
    return out


def place_pool(st: SlotState, pool: np.ndarray) -> None:
    """Put ``pool`` (``[L, W]``, heaviest first) into ``st``'s free slots: each replica on the least
    busy rank with a free slot that does not hold its expert (on a node lacking it, if any)."""
    x = st.x
    load = st.loads()
    free = (x < 0).sum(-1)
    for j in range(pool.shape[1]):
        e = pool[:, j]
        act = e >= 0
        if not act.any():
            break
        ee = np.maximum(e, 0)
        score = load + np.where(free > 0, 0.0, np.inf)
        score += st.present[st.rows, :, ee + 1] * BIG
        if st.node_of is not None:
            held = st.node_cnt[st.rows, ee + 1][:, st.node_of] > 0  # [L, n]: rank's node holds e
            some_node_lacks = (st.node_cnt[st.rows, ee + 1] == 0).any(1, keepdims=True)
            score += np.where(held & some_node_lacks, BIG / 4, 0.0)
        r = score.argmin(1)
        li, ri, ei = st.rows[act], r[act], e[act]
        si = (x[li, ri] < 0).argmax(1)
        st.place(li, ri, si, ei)
        load[li, ri] += st.per[li, ei]
        free[li, ri] -= 1


def match_ranks(fresh: np.ndarray, present: np.ndarray, node_of: Optional[np.ndarray]) -> np.ndarray:
    """Relabel the ranks of a from-scratch placement so it keeps as many current replicas as it can.

    Which live rank gets which rank content does not change balance; a maximum-weight matching of
    contents to ranks (weight: replicas the rank already holds) minimises transfers. With nodes the
    contents stay on their node (the node spread was built for them).

    Parameters:
        fresh: int64 ``[G, n, S]`` rank contents. present: int8 ``[G, n, E + 1]`` (``[l, r, e + 1]``: rank
            ``r`` holds ``e`` now). node_of: int64 ``[n]`` or ``None``.

    Returns:
        int64 ``[G, n, S]``: ``fresh`` with its rank axis permuted.
    """
    G, n, S = fresh.shape
    # keep[g, i, j]: replicas of content i that rank j holds already (whole rows of the transposed
    # presence gathered per slot: a fancy index over [G, n, n, S] was most of a 58-layer fallback's time).
    held = np.ascontiguousarray(present.transpose(0, 2, 1))  # [G, E + 1, n]
    keep = np.zeros((G, n, n), dtype=np.int64)
    for s in range(S):
        keep += np.take_along_axis(held, fresh[:, :, s, None] + 1, 1)
    if node_of is not None:
        keep = np.where(node_of[:, None] == node_of[None, :], keep + 1, -n * S)
    out = np.empty_like(fresh)
    for k in range(G):  # one small assignment per fallback layer (rare: layers the repair cannot fix)
        i, j = linear_sum_assignment(keep[k], maximize=True)
        out[k, j] = fresh[k, i]
    return out


def _rows_of(ceiling: Ceiling, rows: np.ndarray) -> Ceiling:
    """``ceiling`` of a subset: indices into ``rows`` -> the ceiling of those layers of the whole."""
    return lambda sub: ceiling(rows[sub])


def _already_there(got: np.ndarray, target: np.ndarray, w: np.ndarray, n: int, S: int,
                   node_of: Optional[np.ndarray], iters: int, min_balance: float,
                   ceiling: Optional[Ceiling] = None) -> np.ndarray:
    """``target`` lowered to ``got`` where a layer just above its target already keeps the promise.

    The target is a bound-based estimate; a layer within 0.2 % of it is compared with the real
    from-scratch placement (so that, e.g., the same load on the same ranks moves nothing even at
    ``min_balance=1``), held to ``ceiling`` (of the layers asked, upstream's busiest rank) as a
    placement from scratch is. Returns float64 ``[L]``.
    """
    near = np.flatnonzero((got > target) & (got <= target * _NEAR))
    if near.size == 0:
        return target
    # Without the ceiling our differencing on a layer with no redundant slot landed above upstream's
    # LPT and let the layer keep a repair 0.08 % above upstream's busiest rank (4 x 64 on EP16x4, a
    # periodic rebalance, session 34); with the target as the ceiling instead, a placement made from
    # scratch (ceiling: upstream's) was no longer "already there" for its own load.
    _, fresh_max = from_scratch(w[near], n, S, node_of, iters, ceiling=None if ceiling is None else ceiling(near))
    fine = got[near] * min_balance <= fresh_max
    target = target.copy()
    target[near[fine]] = got[near[fine]]
    return target


def replica_bound(w: np.ndarray, n: int, S: int, target: np.ndarray, min_balance: float,
                  keep: Optional[np.ndarray] = None) -> np.ndarray:
    """float64 ``[L]``: the heaviest replica the counts from a current placement may leave.

    A replica's rank also carries ``S - 1`` others: the heaviest replica stays well below the target
    (twice the lightest possible companions' load) so the ranks holding it can be balanced, and never
    above the greedy optimum's heaviest replica over ``min_balance`` — nor above ``keep`` (float64
    ``[L]``, e.g. :func:`surviving_heaviest`), where that is heavier. ``inf`` where the target is.
    """
    E = w.shape[1]
    per_opt = w / replica_counts(w, n * S, n)
    fill = lightest_sum(per_opt, min(S - 1, E - 1))
    top = per_opt.max(1) / min_balance
    if keep is not None:
        top = np.maximum(top, keep)
    return np.where(np.isfinite(target), np.minimum(top, target - 2 * fill), np.inf)


def surviving_heaviest(w: np.ndarray, cur: np.ndarray) -> np.ndarray:
    """float64 ``[L]``: the heaviest replica among the experts that keep a replica in ``cur``
    (int64 ``[L, n, S]`` on the live ranks, ``-1`` = empty), at their surviving counts.

    Our from-scratch counts cap the heavy experts' replicas near a rank's share where the greedy counts
    would leave more heavy replicas than ranks to pair them with (few slots a rank): a repair after a
    failure that pushed the survivors' counts back to the greedy's heaviest replica moved ~100
    replicas a layer on EP256 x 2 under zipf 1.2 for a less balanced layer (bounding by the placement's
    heaviest replica before the failure instead still traded the replicas the dead ranks took: 9x the
    transfers of this bound, 0.78 balancedness instead of 0.85)."""
    L, E = w.shape
    cnt = _count(cur.reshape(L, -1) + 1, E + 1)[:, 1:]
    return np.where(cnt > 0, w / np.maximum(cnt, 1), 0.0).max(1)


@dataclass
class _Pass:
    """One repair and traced refinement of some layers: the state after the last swap, the trace
    (``maxes`` / ``fetched``: ``[T + 1, L]``) and its undo (``rewind(stop [L])``)."""

    x: np.ndarray
    orig: np.ndarray
    target: np.ndarray
    maxes: np.ndarray
    fetched: np.ndarray
    rewind: Callable[[np.ndarray], None]


def _repair_pass(w: np.ndarray, cur: np.ndarray, n: int, S: int, node_of: Optional[np.ndarray], iters: int,
                 target: np.ndarray, min_balance: float, wide_search: bool, rep_bound: np.ndarray,
                 near_target: bool, ceiling: Optional[Ceiling] = None) -> _Pass:
    """Repair ``cur`` (counts, surplus drop, pool, conflicts) and trace the swaps towards ``target``.
    ``near_target``: a layer just above its target after the repair may lower it (``_already_there``,
    with ``ceiling``)."""
    L, E = w.shape
    aim_factor = _aim_factor(min_balance)
    target = target.copy()
    if USE_JIT:
        rp = repair_jit.repair_refine(w, cur, n, S, node_of, iters, target, rep_bound, _NEAR if near_target else 1.0,
                                      aim_factor, light=_LIGHT, extra=_EXTRA, wide_search=wide_search)
        stopped = np.flatnonzero(rp.flag)
        if stopped.size:  # conflicts to fix, or just above the target: numpy, then the compiled swaps
            st = SlotState(rp.x[stopped], rp.per[stopped], node_of)
            fix_conflicts(st, max_iters=n * S)
            rp.x[stopped] = st.x
            rp.present[stopped] = st.present
            if node_of is not None:
                rp.node_cnt[stopped] = st.node_cnt
            rp.load[stopped] = load = st.loads()
            if near_target:
                target[stopped] = _already_there(load.max(1), target[stopped], w[stopped], n, S, node_of, iters,
                                                 min_balance, None if ceiling is None else _rows_of(ceiling, stopped))
            rp.aim[stopped] = target[stopped] * aim_factor
            repair_jit.refine_layers(rp, stopped)
        return _compiled_pass(rp, target)
    cur = drop_duplicates(cur)
    start = _count(cur.reshape(L, -1) + 1, E + 1)
    counts = replica_counts(w, n * S, n, start=start[:, 1:], bound=rep_bound)
    per = w / counts
    x = drop_surplus(cur, counts, per)
    st = SlotState(x, per, node_of)
    place_pool(st, pool_items(x, counts, per))
    fix_conflicts(st, max_iters=n * S)
    orig = SlotState(cur, per, None).present
    if near_target:
        target = _already_there(st.loads().max(1), target, w, n, S, node_of, iters, min_balance, ceiling)
    return _reference_pass(st, orig, target, iters, target * aim_factor, wide_search)


def _aim_factor(min_balance: float) -> float:
    """The swaps aim 0.2 pt past the promise so that the stopping rule has points below the targets
    to trade against layers above them (~1 % fewer transfers, no measurable time)."""
    return min_balance / min(1.0, min_balance + _AIM_PAST)


def _compiled_pass(rp: "repair_jit.Repaired", target: np.ndarray) -> _Pass:
    """The :class:`_Pass` of a compiled repair or start and its traced swaps."""
    maxes, fetched, record = repair_jit.traced(rp)
    return _Pass(rp.x, rp.orig, target, maxes, fetched, lambda k: refine_jit.rewind_traced(rp.x, record, k))


def _reference_pass(st: SlotState, orig: np.ndarray, target: np.ndarray, iters: int, aim: np.ndarray,
                    wide_search: bool) -> _Pass:
    """The numpy reference's traced swaps from ``st`` towards ``aim``, as a :class:`_Pass`."""
    # One swap per layer and step: concurrent swaps (tried: disjoint heavy/light pairs, 6 rounds
    # instead of ~38) each pay for a move the others make moot, ~25 % more transfers on DS-V3 after
    # a failure.
    trace: list = []
    refine(st, iters, aim, orig_present=orig, heavy=1, light=_LIGHT, trace=trace, wide_search=wide_search,
           extra=_EXTRA)
    return _Pass(st.x, orig, target, np.stack([t[1] for t in trace]), np.stack([t[2] for t in trace]),
                 lambda k: rewind(st.x, trace, k))


def _recount_pass(w: np.ndarray, cur: np.ndarray, iters: int, target: np.ndarray, min_balance: float) -> _Pass:
    """The count-changing candidate (:mod:`.recount`: orphans into replica slots, count trades) from
    ``cur`` (the current placement without duplicates), then the narrow swaps towards ``target`` (no
    nodes). A layer whose orphans find no slot gets a trace no layer may pick."""
    L, n, S = cur.shape
    aim = target * _aim_factor(min_balance)
    trades = n * S
    if USE_JIT:
        rp, ok = repair_jit.recount_refine(w, cur, cur, iters, aim, True, trades, light=_LIGHT, extra=_EXTRA)
        done = _compiled_pass(rp, target)
    else:
        x, ok = recount(w, cur, cur, aim, True, trades)
        per = w / np.maximum(_count(x.reshape(L, -1) + 1, w.shape[1] + 1)[:, 1:], 1)
        done = _reference_pass(SlotState(x, per, None), SlotState(cur, per, None).present, target, iters, aim, False)
    done.maxes[:, ~ok] = np.inf
    return done


def from_current(w: np.ndarray, cur: np.ndarray, n: int, S: int, node_of: Optional[np.ndarray],
                 iters: int, target: np.ndarray, min_balance: float, search: str = "narrow",
                 rep_bound: Optional[np.ndarray] = None, exact_target: bool = False,
                 keep: Optional[np.ndarray] = None, scratch_ceiling: Optional[Ceiling] = None) -> np.ndarray:
    """Movement-aware placement: repair ``cur``, swap towards ``target``, then stop each layer where the
    balance it still buys costs most transfers (:func:`choose_stops`, the sum over layers is what counts).

    Parameters:
        w: float64 ``[L, E]`` load (positive). cur: int64 ``[L, n, S]`` on today's live ranks, ``-1`` = empty.
        n, S: live ranks, slots per rank. node_of: int64 ``[n]`` node of each live rank, or ``None``.
        iters: swap budget per layer. target: float64 ``[L]`` busiest-rank load to reach (``inf``: any).
        min_balance: the promise: a layer that misses ``target`` may take the from-scratch placement, and
            its allowance in the sum is that placement's busiest rank over ``min_balance``.
        search: ``"narrow"`` (the 6 least busy ranks and extra partners, see :func:`refine`), ``"wide"``
            (every rank under the target) or ``"both"`` (narrow, then wide again for the layers whose
            narrow swaps fetched more than ``_RETRY`` experts; on a problem of at most ``_SMALL`` live
            slots or so few ranks that narrow may ask them all, every layer narrow again with looser
            counts, and on at most ``_SMALL`` slots without nodes also from :mod:`.recount`'s changed
            counts; each layer stops on any of the traces).
        rep_bound: :func:`replica_bound` (with ``keep``) if the caller has it.
        keep: float64 ``[L]``: replicas up to this load keep their counts where the target allows
            (:func:`replica_bound`'s ``keep``; after a failure :func:`surviving_heaviest`).
        exact_target: ``target`` comes from a real placement's busiest rank over ``min_balance`` (the
            greedy reference), not from a bound: a layer just above it is not compared with our
            from-scratch placement (which only a layer that misses it entirely may fall back to).
        scratch_ceiling: the ceiling of that comparison's from-scratch placement (upstream's busiest
            rank, as a placement from scratch has): called with the int64 indices of the layers
            compared, returns float64 ``[len]``; ``None``: no ceiling. A function, so that a call where
            no layer lands just above its target never computes it.

    Returns:
        int64 ``[L, n, S]``.
    """
    L, E = w.shape
    if rep_bound is None:
        rep_bound = replica_bound(w, n, S, target, min_balance, keep)
    first = _repair_pass(w, cur, n, S, node_of, iters, target, min_balance, search == "wide", rep_bound,
                         not exact_target, scratch_ceiling)
    target, orig, x = first.target, first.orig, first.x
    maxes, fetched = first.maxes, first.fetched
    got = maxes[-1].copy()
    if search != "both":
        retry, candidates = np.zeros(0, np.int64), ()
    elif L * n * S <= _SMALL or n <= _FEW_RANKS:  # cheap, or narrow may ask every rank anyway
        # Not a layer without load signal (no target): it keeps its repair, whatever the counts.
        retry, candidates = np.flatnonzero(np.isfinite(target)), _SMALL_CANDIDATES
    else:
        grown = first.fetched[-1] - first.fetched[0]  # experts the swaps fetched (every layer's last point)
        retry, candidates = np.flatnonzero(grown > _RETRY), ((True, 1.0),)
    # The same repair (the target already settled; counts from the bound times the factor), another
    # search. Their traces go first, each padded with points no layer may pick, so that each layer's
    # last point stays the first search's.
    passes = [lambda wide=wide, factor=factor: _repair_pass(w[retry], cur[retry], n, S, node_of, iters,
                                                            target[retry], min_balance, wide,
                                                            rep_bound[retry] * factor, False)
              for wide, factor in candidates]
    if candidates is _SMALL_CANDIDATES and node_of is None and L * n * S <= _SMALL and _RECOUNT:
        # replica counts changed by orphans and trades (.recount)
        passes.append(lambda: _recount_pass(w[retry], drop_duplicates(cur[retry]), iters, target[retry], min_balance))
    more = []
    if retry.size:
        for make in passes:
            again = make()
            T = again.maxes.shape[0]
            m2 = np.full((T, L), np.inf)
            f2 = np.zeros((T, L), dtype=fetched.dtype)
            m2[:, retry], f2[:, retry] = again.maxes, again.fetched
            maxes, fetched = np.concatenate([m2, maxes]), np.concatenate([f2, fetched])
            got[retry] = np.minimum(got[retry], again.maxes[-1])
            more.insert(0, again)
    missed = np.flatnonzero(got > target)
    if missed.size:
        # Held to the reference as the plain from-scratch path is (upstream's greedy busiest rank after
        # a failure): a fresh layer worse than it loosened every layer's share of the sum (periodic
        # rebalances on 16 x 384 / EP16x32 ended 1e-4 below upstream's balance).
        fresh, fresh_max = from_scratch(w[missed], n, S, node_of, iters, ceiling=target[missed] * min_balance)
        fresh = match_ranks(fresh, orig[missed], node_of)
        g = missed[:, None, None]
        fresh_cost = ((orig[g, np.arange(n)[None, :, None], fresh + 1] == 0) & (fresh >= 0)).sum((1, 2))
    else:
        fresh_max = fresh_cost = np.zeros(0)
    # Where we computed the real from-scratch placement, a layer may keep its busiest rank over
    # min_balance: with a bound-based target the promise is relative to it; with upstream's (exact)
    # one, it is a layer whose expert upstream balances by two replicas on one rank, out of our reach.
    allowed = target.copy()
    allowed[missed] = np.maximum(target[missed], fresh_max / min_balance)
    k, use_fresh = choose_stops(maxes, fetched, allowed, missed, fresh_max, fresh_cost)
    off = sum(p.maxes.shape[0] for p in more)
    first.rewind(np.where(k >= off, k - off, first.maxes.shape[0] - 1))
    off = 0
    for again in more:  # in trace order
        T = again.maxes.shape[0]
        k2 = k[retry] - off
        took = (k2 >= 0) & (k2 < T)
        again.rewind(np.where(took, k2, T - 1))
        x[retry[took]] = again.x[took]
        off += T
    if use_fresh.any():
        x[missed[use_fresh]] = fresh[use_fresh]
    return x


def choose_stops(maxes: np.ndarray, fetched: np.ndarray, target: np.ndarray, missed: np.ndarray,
                 fresh_max: np.ndarray, fresh_cost: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Where each layer's swap sequence stops (or whether it takes the from-scratch placement).

    Balancedness is global (sum of means over sum of busiest ranks), so the promise holds when the
    busiest ranks summed over layers stay under the targets summed: a layer whose last swaps buy
    little balance per transfer stops early and another, cheaper, layer pays for it. Each layer picks
    the point minimising ``fetched + lam * busiest`` (a Lagrangian relaxation of "fewest transfers
    with sum of busiest <= sum of targets"); ``lam`` is the smallest that keeps the sum.

    Parameters:
        maxes, fetched: ``[K + 1, L]`` busiest rank and experts fetched after each refinement step.
        target: float64 ``[L]`` (``inf``: a layer without signal, it keeps its last step).
        missed: int64 ``[M]`` layers with a from-scratch candidate; fresh_max, fresh_cost: ``[M]`` its figures.

    Returns:
        ``(step [L], use_fresh bool [M])``.
    """
    if USE_JIT:  # the same picks, compiled
        return repair_jit.choose_stops(maxes, fetched, target, missed, fresh_max, fresh_cost)
    K1, L = maxes.shape
    m = np.concatenate([maxes, np.full((1, L), np.inf)], 0)
    c = np.concatenate([fetched.astype(np.float64), np.zeros((1, L))], 0)
    m[K1, missed] = fresh_max
    c[K1, missed] = fresh_cost
    fin = np.isfinite(target)
    budget = target[fin].sum()
    last = np.full(L, K1 - 1)
    if not fin.any():
        return last, np.zeros(missed.size, dtype=bool)
    scale = np.abs(m[:, fin][np.isfinite(m[:, fin])]).max()
    none = ~np.isfinite(m)  # no such point (a from-scratch row of a layer that has none)
    mm = np.where(none, 0.0, m / scale)
    c_none = np.where(none, np.inf, c)  # inf + lam * 0 stays inf: no mask per pick
    cols_fin = np.flatnonzero(fin)

    def pick(lam: float) -> np.ndarray:
        obj = np.multiply(mm, lam)
        obj += c_none
        return obj.argmin(0)

    def total(k: np.ndarray) -> float:
        return m[k[cols_fin], cols_fin].sum()

    lo, hi = 0.0, 1.0
    while total(pick(hi)) > budget and hi < 1e12:
        hi *= 4.0
    bracketed = total(pick(hi)) <= budget
    if bracketed:
        for _ in range(30):  # ties at the end are settled one layer at a time below
            mid = (lo + hi) / 2
            if total(pick(mid)) > budget:
                lo = mid
            else:
                hi = mid
    k_lo, k = pick(lo), pick(hi)
    if bracketed:
        # Layers alike (same load shape) switch at the same lam: switch only as many as the sum needs,
        # cheapest transfers per unit of balance first.
        cols = np.arange(L)
        d = np.flatnonzero((k_lo != k) & fin)
        if d.size:
            dm = m[k_lo[d], d] - m[k[d], d]
            dc = c[k[d], d] - c[k_lo[d], d]
            order = np.argsort(dc / np.maximum(dm, 1e-300), kind="stable")
            need = m[k_lo, cols][fin].sum() - budget
            cnt = int(np.searchsorted(np.cumsum(dm[order]), need * (1 - 1e-12))) + 1
            k_hi = k
            k = k_lo.copy()
            k[d[order[:cnt]]] = k_hi[d[order[:cnt]]]
    k = np.where(fin, k, last)
    use_fresh = k[missed] == K1
    k = np.where(k == K1, last, k)
    return k, use_fresh
