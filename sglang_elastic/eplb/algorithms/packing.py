"""From-scratch placement over the live ranks: balanced largest differencing, node ordering, refinement."""
from __future__ import annotations

from typing import Optional, Tuple

import numpy as np

from .conflicts import fix_conflicts
from .counts import FILL_RULES, capped_counts, max_load_bound, replica_counts
from .deepseek import balanced_packing
from .refine import refine
from .refine_jit import lpt_assign_compiled, order_ranks_by_node_compiled, refine_scratch, scratch_assign_compiled
from .slots import SlotState

__all__ = ["scratch_assign", "scratch_assign_reference", "lpt_assign", "lpt_assign_reference", "order_ranks_by_node", "order_ranks_by_node_reference", "shift_to_top", "from_scratch"]


def _replicas_by_load(per: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """int64 ``[L, sum(counts)]``: each expert ``counts`` times, heaviest replica first (a stable order:
    equal loads keep expert order; an expert's replicas stay together)."""
    order = np.argsort(-per, axis=1, kind="stable")
    return np.repeat(order.ravel(), np.take_along_axis(counts, order, 1).ravel()).reshape(per.shape[0], -1)


def scratch_assign(per: np.ndarray, counts: np.ndarray, n: int, S: int) -> np.ndarray:
    """:func:`scratch_assign_reference`, compiled wherever :mod:`.repair` runs its kernels (the same assignment)."""
    from . import repair  # repair imports this module; its switch decides for both

    if repair.USE_JIT:
        return scratch_assign_compiled(per, counts, n, S)
    return scratch_assign_reference(per, counts, n, S)


def scratch_assign_reference(per: np.ndarray, counts: np.ndarray, n: int, S: int) -> np.ndarray:
    """Balanced largest differencing (Karmarkar-Karp with equal cardinality): ``[L, n, S]`` experts.

    Replicas sorted by load are cut into ``S`` rounds of ``n``; each round is a partial solution (one
    replica per rank). We repeatedly merge the two partials whose rank loads spread most, pairing the
    heaviest rank of one with the lightest of the other, which cancels their differences. Merges are
    recorded and replayed backwards to learn which final rank each round's replicas end on.
    """
    L = per.shape[0]
    rows, r2 = np.arange(L), np.arange(L)[:, None]
    items = _replicas_by_load(per, counts).reshape(L, S, n)  # stable: the kernel's order
    sums = per[rows[:, None, None], items]  # [L, S, n]: partial p's rank loads
    spread = sums.max(-1) - sums.min(-1)
    history = []
    for _ in range(S - 1):
        a = spread.argmax(1)
        spread[rows, a] = -np.inf
        b = spread.argmax(1)
        pa = np.argsort(sums[rows, a], 1, kind="stable")  # lightest rank of a first ...
        pb = np.argsort(sums[rows, b], 1, kind="stable")[:, ::-1]  # ... meets the heaviest of b
        merged = sums[rows, a][r2, pa] + sums[rows, b][r2, pb]
        sums[rows, a] = merged
        spread[rows, a] = merged.max(1) - merged.min(1)
        spread[rows, b] = -np.inf
        history.append((a, b, pa, pb))
    # rank[p][j]: final rank of position j of partial p; the survivor's positions are the ranks.
    rank = np.empty((L, S, n), dtype=np.int64)
    rank[rows, spread.argmax(1)] = np.arange(n)
    for a, b, pa, pb in reversed(history):
        after = rank[rows, a].copy()
        rank[r2, a[:, None], pa] = after
        rank[r2, b[:, None], pb] = after
    x = np.empty((L, n, S), dtype=np.int64)
    x[rows[:, None, None], rank, np.arange(S)[None, :, None]] = items
    return x


def lpt_assign(per: np.ndarray, counts: np.ndarray, n: int, S: int) -> np.ndarray:
    """:func:`lpt_assign_reference`, compiled wherever :mod:`.repair` runs its kernels (the same assignment)."""
    from . import repair  # repair imports this module; its switch decides for both

    if repair.USE_JIT:
        return lpt_assign_compiled(per, counts, n, S)
    return lpt_assign_reference(per, counts, n, S)


def lpt_assign_reference(per: np.ndarray, counts: np.ndarray, n: int, S: int) -> np.ndarray:
    """Longest processing time (DeepSeek's :func:`.deepseek.balanced_packing`): ``[L, n, S]`` experts.

    Replicas heaviest first (a stable order), each onto the lightest rank with a free slot (ties: the
    lower rank), filling its slots in order.
    """
    L = per.shape[0]
    items = _replicas_by_load(per, counts)
    pack, pos = balanced_packing(np.take_along_axis(per, items, 1), n)
    x = np.empty((L, n, S), dtype=np.int64)
    x[np.arange(L)[:, None], pack, pos] = items
    return x


def order_ranks_by_node(x: np.ndarray, node_of: np.ndarray) -> np.ndarray:
    """:func:`order_ranks_by_node_reference`, compiled wherever :mod:`.repair` runs its kernels (the same order)."""
    from . import repair  # repair imports this module; its switch decides for both

    if repair.USE_JIT:
        return order_ranks_by_node_compiled(x, node_of)
    return order_ranks_by_node_reference(x, node_of)


def order_ranks_by_node_reference(x: np.ndarray, node_of: np.ndarray) -> np.ndarray:
    """Reorder the ranks of a from-scratch assignment so replicas of an expert land on different nodes.

    Rank contents are fixed; only which live rank gets which content changes (free for balance). Each
    content, in rank order, goes to the node with room holding fewest of its experts (then the one
    with most room). Parameters: x int64 ``[L, n, S]``, node_of int64 ``[n]``. Returns int64 ``[L, n, S]``.
    """
    L, n, S = x.shape
    E1 = int(x.max()) + 2
    M = int(node_of.max()) + 1
    rows = np.arange(L)
    room = np.broadcast_to(np.bincount(node_of, minlength=M), (L, M)).copy()
    node_cnt = np.zeros((L, E1, M), dtype=np.int64)
    dest_node = np.empty((L, n), dtype=np.int64)
    for j in range(n):
        clash = node_cnt[rows[:, None], x[:, j] + 1].sum(1)  # [L, M]
        score = np.where(room > 0, clash * (n + 1) - room, np.iinfo(np.int64).max)
        m = score.argmin(1)
        dest_node[:, j] = m
        room[rows, m] -= 1
        node_cnt[rows[:, None], x[:, j] + 1, m[:, None]] += 1
    # Contents bound for node m fill node m's live ranks in order.
    node_ranks = np.argsort(node_of, kind="stable")
    pos = np.argsort(dest_node, axis=1, kind="stable")  # contents grouped by node
    out = np.empty_like(x)
    out[rows[:, None], node_ranks[None, :]] = x[rows[:, None], pos]
    return out



def _refine(st: SlotState, iters: int, target: np.ndarray) -> None:
    """The short swap refinement of a fresh placement (4 heavy ranks a step, 2 light ones each, no
    widening): compiled wherever :mod:`.repair` runs its kernels (the same swaps), else numpy's."""
    from . import repair  # repair imports this module; its switch decides for both

    if repair.USE_JIT:
        refine_scratch(st, iters, target)
    else:
        refine(st, iters, target, widen=False)


def _settle(x: np.ndarray, per: np.ndarray, node_of: Optional[np.ndarray], iters: int, aim: np.ndarray) -> SlotState:
    """A fresh packing ``x`` ``[L, n, S]`` made a placement: node order, conflicts fixed, refined to ``aim``."""
    n, S = x.shape[1], x.shape[2]
    if node_of is not None:
        x = order_ranks_by_node(x, node_of)
    st = SlotState(x, per, node_of)
    fix_conflicts(st, max_iters=n * S)
    _refine(st, iters, aim)
    return st


def _pack(w: np.ndarray, counts: np.ndarray, n: int, S: int, node_of: Optional[np.ndarray], iters: int,
          ) -> Tuple[np.ndarray, np.ndarray]:
    """``([L, n, S] experts, [L] busiest-rank load)``: differencing, node order, conflicts, refinement."""
    per = w / counts
    # Stop refining a layer within 0.1 % of the bound: past that, swaps cost more time than they buy.
    # Packing from scratch is already good; a narrow search keeps this path fast.
    bound = np.maximum(w.sum(1) / n, per.max(1))
    st = _settle(scratch_assign(per, counts, n, S), per, node_of, iters, bound * (1 + 1e-3))
    return st.x, st.loads().max(1)


def shift_to_top(w: np.ndarray, counts: np.ndarray, cap: int) -> np.ndarray:
    """``counts`` with one more replica of each layer's heaviest expert (up to ``cap``), taken from the
    expert whose replicas grow least when it loses one. Returns int64 ``[L, E]``."""
    rows = np.arange(w.shape[0])
    top = w.argmax(1)
    c = counts.copy()
    loss = np.where(c > 1, w / np.maximum(c - 1, 1), np.inf)
    loss[rows, top] = np.inf
    cold = loss.argmin(1)
    ok = (c[rows, top] < cap) & np.isfinite(loss[rows, cold])
    c[rows[ok], top[ok]] += 1
    c[rows[ok], cold[ok]] -= 1
    return c


def _lpt_candidates(w: np.ndarray, counts: np.ndarray, n: int, S: int, node_of: Optional[np.ndarray],
                    iters: int, aim: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """``([L, n, S], [L] busiest)``: LPT packing of every layer of ``w``, conflicts fixed, refined to ``aim``;
    a layer whose rank still holds an expert twice (no partner to swap with: few experts, many
    replicas) gets busiest ``inf``, so it is never taken."""
    per = w / counts
    st = _settle(lpt_assign(per, counts, n, S), per, node_of, iters, aim)
    return st.x, np.where(st.duplicates().any((1, 2)), np.inf, st.loads().max(1))


# The replica caps the count search tries first (times a layer's mean rank load, from the least that
# can be met to 1), and how many times it then halves its step around each layer's best candidate.
_CAP_GRID = 5
_CAP_REFINES = 3
# Only layers whose greedy-count packing is this far above what any counts allow are searched (DS-V3 on
# EP32x9 lands within ~0.1 %: the search bought +0.03 % balance there for ~10x the time and, after a
# failure, ~2 % more transfers; on EP64x5 under zipf 1.2 it lifts 0.906 to 0.997).
_SEARCH_ABOVE = 5e-3


def _trial_iters(n: int, S: int) -> int:
    """The refinement budget a count candidate is judged with (the winner gets the full one): on
    DS-V3 most candidates are far off and would spend the whole budget."""
    return n + 2 * S + 8


def search_counts(w: np.ndarray, counts: np.ndarray, x: np.ndarray, best: np.ndarray, n: int, S: int,
                  node_of: Optional[np.ndarray], iters: int, todo: np.ndarray) -> None:
    """Replica counts chosen by packing them, for the layers ``todo``: ``counts``, ``x`` and ``best``
    (the layers' counts, packings and busiest ranks so far) are updated in place where a layer gains.

    The counts so far are one candidate; the others cap each expert's replica at
    ``cap * mean rank load`` (:func:`.counts.capped_counts`, both fill rules), first on a geometric
    grid of caps from the least that can be met (``1/S``, or the hottest expert over every rank) to
    ``1``, then halving the step around each layer's best candidate (the packing is jagged in the cap:
    a grid point may miss a cap a few percent off that packs better than the greedy counts). A candidate
    whose bound (:func:`.counts.max_load_bound`) is no better than the layer's best is skipped; the rest
    are packed (differencing and a short refinement, no nodes, all layers and caps in one batch) and
    each layer keeps its least busy counts, packed in full at the end (nodes, the whole refinement).

    Parameters:
        w: float64 ``[L, E]`` load (positive). counts: int64 ``[L, E]``. x: int64 ``[L, n, S]``.
        best: float64 ``[L]``. n, S: live ranks, slots per rank. node_of: int64 ``[n]`` or ``None``.
        iters: refinement budget. todo: int64 layer indices.
    """
    L = w.shape[0]
    if todo.size == 0 or S == 1:
        return
    mean = w.sum(1) / n
    before = counts.copy()
    # Each layer's best packing after the short refinement (the counts so far: in full); below ``best``
    # where a candidate beat the counts so far.
    quick = best.copy()
    cand = np.full(L, np.inf)  # the best candidate's busiest rank, and its cap: the search centres on it
    best_cap = np.full(L, np.nan)
    short = min(iters, _trial_iters(n, S))

    def trial(caps: np.ndarray, layers: np.ndarray) -> None:
        """Pack every fill rule and cap of ``caps`` ``[K, len(layers)]`` in one batch, keep improvements."""
        of_cap = np.tile(layers, caps.shape[0])  # the layer of each entry of caps.ravel()
        cands = np.concatenate([capped_counts(w[of_cap], n * S, caps.ravel(), n, fill) for fill in FILL_RULES])
        rows, capv = np.tile(of_cap, len(FILL_RULES)), np.tile(caps.ravel(), len(FILL_RULES))
        ok = np.flatnonzero(cands[:, 0] >= 0)
        ok = ok[max_load_bound(w[rows[ok]], cands[ok], n, S) < np.minimum(quick, cand)[rows[ok]]]
        if ok.size == 0:
            return
        rows, cands, capv = rows[ok], cands[ok], capv[ok]
        _, bz = _pack(w[rows], cands, n, S, None, short)
        # Per layer, the least busy candidate (a stable order: the first of equals).
        order = np.lexsort((bz, rows))
        first = order[np.r_[True, rows[order][1:] != rows[order][:-1]]]
        top = first[bz[first] < cand[rows[first]]]
        cand[rows[top]], best_cap[rows[top]] = bz[top], capv[top]
        win = first[bz[first] < quick[rows[first]]]
        l = rows[win]
        quick[l], counts[l] = bz[win], cands[win]

    # Caps below the mean replica (1/S of a rank's share) or below the hottest expert spread over every
    # rank cannot be met.
    lo = np.minimum(np.maximum(1.0 / S, w.max(1) / n / mean), 1.0)[todo]
    trial(mean[todo] * np.exp(np.log(lo) * np.linspace(1.0, 0.0, _CAP_GRID)[:, None]), todo)
    step = np.full(L, np.inf)
    step[todo] = lo ** (-1.0 / (_CAP_GRID - 1))
    for _ in range(_CAP_REFINES):
        step = np.sqrt(step)
        near = np.flatnonzero(np.isfinite(best_cap))
        if near.size:
            trial(np.stack([best_cap[near] / step[near], best_cap[near] * step[near]]), near)
    changed = np.flatnonzero(quick < best)
    if changed.size:
        xc, bc = _pack(w[changed], counts[changed], n, S, node_of, iters)
        keep = bc < best[changed]  # the layer's packing so far may still be the better one
        x[changed[keep]], best[changed[keep]] = xc[keep], bc[keep]
        counts[changed[~keep]] = before[changed[~keep]]


def from_scratch(w: np.ndarray, n: int, S: int, node_of: Optional[np.ndarray], iters: int,
                 ceiling: Optional[np.ndarray] = None) -> Tuple[np.ndarray, np.ndarray]:
    """``([L, n, S] experts, [L] busiest-rank load)`` of a fresh placement over ``n`` live ranks.

    ``ceiling`` (float64 ``[L]``, ``inf`` = none): busiest-rank loads whose sum ours should not exceed,
    e.g. upstream's greedy placement's (balancedness is a sum over layers); where ours does, the layers
    above their ceiling also try LPT refined down to it, and the ones that gain most take it, until the
    sum holds (or none is left): the placement changes no more than the promise needs.
    """
    counts = replica_counts(w, n * S, n)
    x, best = _pack(w, counts, n, S, node_of, iters)
    floor = np.maximum(w.sum(1) / n, w.max(1) / n)  # no counts place a layer below this
    searched = np.flatnonzero(best > floor * (1 + _SEARCH_ABOVE))
    search_counts(w, counts, x, best, n, S, node_of, iters, searched)
    per = w / counts
    bound = np.maximum(w.sum(1) / n, per.max(1))
    # Few large replicas (heavy tails with little redundancy) suit longest-processing-time better
    # than differencing; try it where we are still well above the bound and keep the better layer.
    bad = np.flatnonzero(best > bound * (1 + 5e-3))
    if bad.size and S > 1:
        xl, lmax = _lpt_candidates(w[bad], counts[bad], n, S, node_of, iters, bound[bad] * (1 + 1e-3))
        better = lmax < best[bad]
        x[bad[better]], best[bad[better]] = xl[better], lmax[better]
    # One very hot expert (zipf: half a layer's tokens) packs badly with the greedy counts' replica
    # size; one to three more replicas of it (from the experts that lose least) often pack much
    # better. Tried only where we are still well above the bound; the better layer is kept.
    bad = np.flatnonzero(best > bound * (1 + 5e-3))
    if bad.size and S > 1:
        c = counts[bad]
        for _ in range(3):
            c = shift_to_top(w[bad], c, n)
            xv, lmax = _pack(w[bad], c, n, S, node_of, iters)
            better = lmax < best[bad]
            x[bad[better]], best[bad[better]] = xv[better], lmax[better]
    if ceiling is not None and S > 1:
        # Near-uniform loads: upstream's LPT lands within 0.01 % of the bound, below where our
        # refinement stops (0.1 %); there LPT refined to the ceiling is the better layer.
        fin = np.isfinite(ceiling)
        excess = best[fin].sum() - ceiling[fin].sum()
        over = np.flatnonzero(fin & (best > ceiling))
        if excess > 0 and over.size:
            xl, lmax = _lpt_candidates(w[over], counts[over], n, S, node_of, iters,
                                       np.minimum(bound[over] * (1 + 1e-3), ceiling[over]))
            gain = best[over] - lmax
            for i in np.argsort(-gain, kind="stable"):
                if excess <= 0 or gain[i] <= 0:
                    break
                x[over[i]], best[over[i]] = xl[i], lmax[i]
                excess -= gain[i]
            if excess > 0:  # still above: upstream splits an expert on a rank; other counts may match it
                # (a layer searched above would try the same candidates again: none beats its winner)
                over = np.setdiff1d(np.flatnonzero(fin & (best > ceiling)), searched)
                search_counts(w, counts, x, best, n, S, node_of, iters, over)
                per = w / counts
    srt = np.sort(x, axis=-1)
    twice = np.flatnonzero(((srt[..., 1:] == srt[..., :-1]) & (srt[..., 1:] >= 0)).any((1, 2)))
    if twice.size:
        # Few experts with many replicas each (e.g. 6 experts on 8 ranks x 4 slots): a conflict may
        # find no single swap that fixes it. Deal the replicas, grouped by expert, round the ranks:
        # an expert's (at most n) replicas land on distinct ranks; then the usual refinement.
        j = np.arange(n * S)
        xd = np.empty((twice.size, n, S), dtype=np.int64)
        xd[:, j % n, j // n] = _replicas_by_load(per[twice], counts[twice])
        st = SlotState(xd, per[twice], node_of)
        _refine(st, iters, bound[twice] * (1 + 1e-3))
        x[twice], best[twice] = st.x, st.loads().max(1)
    return x, best

