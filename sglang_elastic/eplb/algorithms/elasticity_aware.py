"""Elasticity-aware EPLB: balanced placement on live ranks only, moving as few experts as it can.

The plan, per layer (every step is vectorised over layers; loops run over rounds or swaps, never
over layers, experts or tokens):

1. ``replica_counts``: how many replicas each expert gets (at least one, at most one per live rank),
   minimising the heaviest replica. With a ``current`` placement we start from the replicas that
   survive and only trade replicas while that lowers the heaviest replica below the optimum's bound.
2. Assignment of replicas to live ranks' slots, ``S`` per rank:
   - from scratch: longest-processing-time in rounds (each round gives every rank one replica, the
     heaviest to the lightest rank);
   - from ``current``: keep every surviving replica in its slot, drop surplus replicas from the most
     loaded ranks, and put the missing ones (orphans first) on the lightest ranks with a free slot.
3. ``_fix_conflicts``: swap away two replicas of one expert on one rank, and replicas sharing a node
   while another node lacks the expert (when ``ranks_per_node`` is given).
4. ``_refine``: swap replicas between the heaviest rank and the lightest ones while that lowers the
   heaviest. With ``current`` it prefers swaps that move nothing new, and stops once a layer is within
   ``balance_tolerance`` of the from-scratch placement; a layer that cannot get there takes the
   from-scratch placement.

Dead ranks get ``-1`` in every slot; node-awareness survives dead ranks because nodes are simply
groups of live ranks of unequal size.
"""
from __future__ import annotations

from typing import Optional, Tuple

import numpy as np
import torch

from . import register_algorithm
from .deepseek import balanced_packing

__all__ = ["elasticity_aware", "replica_counts", "rebalance_experts"]

_BIG = 1e30


def _greedy_counts(weight: np.ndarray, num_slots: int, cap: int) -> np.ndarray:
    """The greedy optimum: replicate the expert with the heaviest replica, one replica at a time.

    One argmax and two writes per added replica, all layers at once (cheaper than any bulk scheme
    we tried, because one very hot expert makes bulk steps degenerate to single ones).
    """
    L, E = weight.shape
    rows = np.arange(L)
    c = np.ones((L, E), dtype=np.int64)
    gain = weight.copy()
    for _ in range(num_slots - E):
        e = gain.argmax(1)
        ce = c[rows, e] + 1
        c[rows, e] = ce
        gain[rows, e] = np.where(ce < cap, weight[rows, e] / ce, -1.0)
    return c


def replica_counts(weight: np.ndarray, num_slots: int, max_per_expert: int,
                   start: Optional[np.ndarray] = None, bound: Optional[np.ndarray] = None) -> np.ndarray:
    """int64 ``[L, E]`` replica counts summing to ``num_slots`` per layer, each in ``[1, max_per_expert]``.

    Without ``start``: the greedy optimum (repeatedly replicate the expert with the heaviest replica).
    With ``start`` (replicas that survive, ``0`` for orphans): keep it as far as possible; trade one
    replica at a time from the expert that loses least to the heaviest one while the heaviest replica
    is above ``bound[l]`` (the optimum's heaviest replica) — so counts only change where they matter.
    """
    L, E = weight.shape
    rows = np.arange(L)
    if start is None:
        return _greedy_counts(weight, num_slots, max_per_expert)
    c = np.ones((L, E), dtype=np.int64) if start is None else np.clip(start, 1, max_per_expert).astype(np.int64)
    gain = np.where(c < max_per_expert, weight / c, -1.0)  # heaviest replica if we add one more
    loss = np.where(c > 1, weight / np.maximum(c - 1, 1), _BIG)  # replica load if we remove one

    def bump(ls: np.ndarray, es: np.ndarray, delta: int) -> None:
        c[ls, es] += delta
        cc, ww = c[ls, es], weight[ls, es]
        gain[ls, es] = np.where(cc < max_per_expert, ww / cc, -1.0)
        loss[ls, es] = np.where(cc > 1, ww / np.maximum(cc - 1, 1), _BIG)

    diff = c.sum(1) - num_slots
    for _ in range(int(np.abs(diff).max())):
        up, down = rows[diff < 0], rows[diff > 0]
        if up.size:
            bump(up, gain[up].argmax(1), 1)
        if down.size:
            bump(down, loss[down].argmin(1), -1)
        diff = diff + (diff < 0) - (diff > 0)
    if start is None or bound is None:
        return c
    for _ in range(E):
        hot = gain.argmax(1)
        hot_load = gain[rows, hot]
        lo = loss.copy()
        lo[rows, hot] = _BIG
        cold = lo.argmin(1)
        go = np.flatnonzero((hot_load > bound * (1 + 1e-12)) & (lo[rows, cold] < hot_load))
        if go.size == 0:
            break
        bump(go, hot[go], 1)
        bump(go, cold[go], -1)
    return c


class _State:
    """Assignment of replicas to live ranks' slots for all layers, with the indexes swaps need.

    ``x[l, r, s]`` is the expert in slot ``s`` of live rank ``r`` (``-1`` = empty). ``present[l, r, e+1]``
    says whether rank ``r`` holds ``e``; ``node_cnt[l, e+1, m]`` counts replicas of ``e`` on node ``m``.
    Both are kept in step with ``x`` so constraint checks are gathers, not searches.
    """

    def __init__(self, x: np.ndarray, per_replica: np.ndarray, node_of: Optional[np.ndarray]):
        self.x = x
        self.L, self.n, self.S = x.shape
        self.E = per_replica.shape[1]
        self.per = per_replica
        self.per32 = per_replica.astype(np.float32)
        self.node_of = node_of
        self.rows = np.arange(self.L)
        L, n, E1 = self.L, self.n, self.E + 1
        li, ri = np.indices((L, n))
        self.present = np.zeros((L, n, E1), dtype=np.int8)
        self.present[li[..., None], ri[..., None], x + 1] = 1
        self.present[..., 0] = 0
        if node_of is not None:
            self.M = int(node_of.max()) + 1
            flat = ((li[..., None] * E1 + x + 1) * self.M + node_of[ri][..., None]).ravel()
            self.node_cnt = np.bincount(flat, minlength=L * E1 * self.M).reshape(L, E1, self.M)
            self.node_cnt[:, 0] = 0

    def loads(self) -> np.ndarray:
        """float64 ``[L, n]`` tokens per live rank."""
        return np.where(self.x >= 0, self.per[self.rows[:, None, None], self.x], 0.0).sum(-1)

    def place(self, l: np.ndarray, r: np.ndarray, s: np.ndarray, e: np.ndarray) -> None:
        """Put expert ``e`` into empty slots ``(l, r, s)``."""
        self.x[l, r, s] = e
        self.present[l, r, e + 1] = 1
        if self.node_of is not None:
            np.add.at(self.node_cnt, (l, e + 1, self.node_of[r]), 1)

    def remove(self, l: np.ndarray, r: np.ndarray, s: np.ndarray) -> None:
        """Empty slots ``(l, r, s)``."""
        e = self.x[l, r, s]
        self.x[l, r, s] = -1
        # A rank may hold a second copy (a conflict not yet fixed): presence is what is left.
        self.present[l, r, e + 1] = (self.x[l, r] == e[:, None]).any(1)
        if self.node_of is not None:
            np.add.at(self.node_cnt, (l, e + 1, self.node_of[r]), -1)

    def swap(self, l: np.ndarray, r1: np.ndarray, s1: np.ndarray, r2: np.ndarray, s2: np.ndarray) -> None:
        """Exchange the experts of slots ``(l, r1, s1)`` and ``(l, r2, s2)``."""
        e1, e2 = self.x[l, r1, s1], self.x[l, r2, s2]
        self.remove(l, r1, s1)
        self.remove(l, r2, s2)
        self.place(l, r1, s1, e2)
        self.place(l, r2, s2, e1)

    def duplicates(self) -> np.ndarray:
        """bool ``[L, n, S]``: slots holding a later copy of an expert already on the same rank."""
        x = self.x
        srt = np.sort(x, axis=-1)  # cheap way to find the few ranks that have a repeat at all
        has = ((srt[..., 1:] == srt[..., :-1]) & (srt[..., 1:] >= 0)).any(-1)
        dup = np.zeros(x.shape, dtype=bool)
        if has.any():
            l, r = np.nonzero(has)
            xs = x[l, r]  # [K, S]
            same = (xs[:, :, None] == xs[:, None, :]) & np.triu(np.ones((self.S, self.S), dtype=bool), 1)
            dup[l, r] = same.any(1) & (xs >= 0)
        return dup

    def spread_loss_at(self, l: np.ndarray, e: np.ndarray, from_node: np.ndarray, to_node: np.ndarray) -> np.ndarray:
        """bool: moving a replica of ``e`` from ``from_node`` to ``to_node`` lowers how many nodes hold ``e``."""
        return (from_node != to_node) & (self.node_cnt[l, e + 1, from_node] == 1) & (
            self.node_cnt[l, e + 1, to_node] > 0)


def _scratch_assign(per: np.ndarray, counts: np.ndarray, n: int, S: int) -> np.ndarray:
    """Balanced largest differencing (Karmarkar-Karp with equal cardinality): ``[L, n, S]`` experts.

    Replicas sorted by load are cut into ``S`` rounds of ``n``; each round is a partial solution (one
    replica per rank). We repeatedly merge the two partials whose rank loads spread most, pairing the
    heaviest rank of one with the lightest of the other, which cancels their differences. Merges are
    recorded and replayed backwards to learn which final rank each round's replicas end on.
    """
    L, E = per.shape
    rows, r2 = np.arange(L), np.arange(L)[:, None]
    order = np.argsort(-per, axis=1)  # heaviest replicas first
    items = np.repeat(order.ravel(), np.take_along_axis(counts, order, 1).ravel()).reshape(L, S, n)
    sums = per[rows[:, None, None], items]  # [L, S, n]: partial p's rank loads
    spread = sums.max(-1) - sums.min(-1)
    history = []
    for _ in range(S - 1):
        a = spread.argmax(1)
        spread[rows, a] = -np.inf
        b = spread.argmax(1)
        pa = np.argsort(sums[rows, a], 1)  # lightest rank of a first ...
        pb = np.argsort(sums[rows, b], 1)[:, ::-1]  # ... meets the heaviest of b
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


def _order_ranks_by_node(x: np.ndarray, node_of: np.ndarray) -> np.ndarray:
    """Reorder the ranks of a from-scratch assignment so replicas of an expert land on different nodes.

    Rank contents are fixed; only which live rank gets which content changes (free for balance). Each
    content, heaviest-replicated first, goes to the node with room holding fewest of its experts.
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
    first = np.concatenate([[0], np.cumsum(np.bincount(node_of, minlength=M))[:-1]])
    pos = np.argsort(dest_node, axis=1, kind="stable")  # contents grouped by node
    out = np.empty_like(x)
    out[rows[:, None], node_ranks[None, :]] = x[rows[:, None], pos]
    del first
    return out


def _repair_assign(st: _State, counts: np.ndarray, keep_load: np.ndarray) -> None:
    """Make ``st`` hold exactly ``counts`` replicas: drop surplus replicas, then place missing ones.

    Surplus replicas are dropped from the most loaded ranks; missing ones (heaviest first) go to the
    lightest rank that has a free slot and does not hold the expert (on a node lacking it if possible).
    """
    L, n, S, E = st.L, st.n, st.S, st.E
    x = st.x
    flat = x.reshape(L, n * S)
    rank_load = np.repeat(keep_load, S, axis=1)
    # Position of each replica among its expert's replicas, most loaded rank first -> drop the first ones.
    eid = np.where(flat >= 0, flat, E)  # empty slots sort last
    key = eid * 2.0 - rank_load / (rank_load.max() + 1.0)
    order = np.argsort(key, axis=1, kind="stable")
    e_sorted = np.take_along_axis(eid, order, 1)
    have = np.zeros((L, E + 1), dtype=np.int64)
    np.add.at(have, (st.rows[:, None], e_sorted), 1)
    first = np.cumsum(have, 1) - have
    pos = np.arange(n * S)[None] - np.take_along_axis(first, e_sorted, 1)
    surplus = np.concatenate([have[:, :E] - counts, np.zeros((L, 1), np.int64)], 1)
    drop_sorted = pos < np.take_along_axis(surplus, e_sorted, 1)
    drop = np.zeros_like(drop_sorted)
    np.put_along_axis(drop, order, drop_sorted, 1)
    l, ps = np.nonzero(drop)
    st.remove(l, ps // S, ps % S)

    need = counts - np.minimum(have[:, :E], counts)  # replicas still to place
    # Missing replicas as a list per layer, heaviest first; all layers padded to the same length.
    order = np.argsort(-st.per, axis=1, kind="stable")
    items = [np.repeat(order[i], need[i, order[i]]) for i in range(L)]
    width = max((len(it) for it in items), default=0)
    if width == 0:
        return
    add = np.full((L, width), -1, dtype=np.int64)
    for i, it in enumerate(items):
        add[i, : len(it)] = it
    load = st.loads()
    free = (x < 0).sum(-1)
    for j in range(width):
        e = add[:, j]
        act = e >= 0
        if not act.any():
            break
        ee = np.maximum(e, 0)
        score = load.copy()
        score += np.where(free > 0, 0.0, np.inf)
        score += np.where(st.present[st.rows, :, ee + 1] > 0, _BIG, 0.0)
        if st.node_of is not None:
            held = st.node_cnt[st.rows, ee + 1][:, st.node_of] > 0  # [L, n]: rank's node holds e
            some_node_lacks = (st.node_cnt[st.rows, ee + 1] == 0).any(1, keepdims=True)
            score += np.where(held & some_node_lacks, _BIG / 4, 0.0)
        r = score.argmin(1)
        li = st.rows[act]
        ri = r[act]
        si = (x[li, ri] < 0).argmax(1)
        st.place(li, ri, si, e[act])
        load[li, ri] += st.per[li, e[act]]
        free[li, ri] -= 1


def _fix_conflicts(st: _State, max_iters: int) -> None:
    """Swap replicas until no rank holds an expert twice and no node holds two replicas of an expert
    while some node lacks it; each swap is the one that disturbs rank loads least.

    Conflicts are found once: a swap never creates a new one (its checks forbid that), so we walk
    the list, one conflict per layer per step, all conflicted layers at once. A conflict with no valid
    partner is left (a node conflict is only a preference; a rank duplicate has a partner when S <= E).
    """
    n, S = st.n, st.S
    x = st.x
    dup = st.duplicates()
    bad = dup.copy()
    if st.node_of is not None:
        l3, e3 = st.rows[:, None, None], x + 1
        nc = st.node_cnt[l3, e3, st.node_of[None, :, None]]
        lacks = (st.node_cnt[l3, e3] == 0).any(-1)
        bad |= (nc > 1) & lacks & (x >= 0)
    flat_bad = bad.reshape(st.L, -1)
    if not flat_bad.any():
        return
    # Rank duplicates first: they make a placement invalid, node conflicts only make it worse.
    prio = flat_bad.astype(np.int8) + dup.reshape(st.L, -1)
    order = np.argsort(-prio, axis=1, kind="stable")
    todo = np.take_along_axis(prio, order, 1) > 0
    for j in range(min(max_iters, int(todo.sum(1).max()))):
        c = np.flatnonzero(todo[:, j])
        r1, s1 = order[c, j] // S, order[c, j] % S
        e1 = x[c, r1, s1]
        is_dup = (x[c, r1] == e1[:, None]).sum(1) > 1
        still = is_dup
        if st.node_of is not None:
            m1 = st.node_of[r1]
            still = still | ((st.node_cnt[c, e1 + 1, m1] > 1) & (st.node_cnt[c, e1 + 1] == 0).any(1))
        c, r1, s1, e1, is_dup = c[still], r1[still], s1[still], e1[still], is_dup[still]
        if c.size == 0:
            continue
        c3, e2 = c[:, None, None], x[c]  # candidates: every slot of the layer
        ok = (np.arange(n)[None, :, None] != r1[:, None, None]) & (e2 >= 0) & (e2 != e1[:, None, None])
        ok &= (st.present[c[:, None], np.arange(n)[None, :], (e1 + 1)[:, None]] == 0)[:, :, None]
        ok &= st.present[c3, r1[:, None, None], e2 + 1] == 0
        if st.node_of is not None:
            n1 = st.node_of[r1][:, None, None]
            n2 = st.node_of[None, :, None]
            to_lacking = (n1 != n2) & (st.node_cnt[c3, e1[:, None, None] + 1, n2] == 0)
            # e2 may move to r1's node unless that empties a node of it or doubles it there while
            # another node lacks it.
            e2_lacking = (st.node_cnt[c3, e2 + 1] == 0).any(-1)
            keeps_e2 = ~st.spread_loss_at(c3, e2, n2, n1) & ~(
                (st.node_cnt[c3, e2 + 1, n1] > 0) & (n1 != n2) & e2_lacking)
            spread_ok = to_lacking & keeps_e2
            ok &= is_dup[:, None, None] | spread_ok
        cost = np.abs(st.per[c3, np.maximum(e2, 0)] - st.per[c, e1][:, None, None])
        if st.node_of is not None:  # a duplicate may go anywhere; best without hurting e2's spread
            cost = cost + np.where(keeps_e2, 0.0, 2 * _BIG) + np.where(to_lacking, 0.0, _BIG)
        cost = np.where(ok, cost, np.inf).reshape(c.size, -1)
        best = cost.argmin(1)
        found = cost[np.arange(c.size), best] < np.inf
        if found.any():
            st.swap(c[found], r1[found], s1[found], best[found] // S, best[found] % S)


def _best_swaps(st: _State, g: np.ndarray, load: np.ndarray, H: int, K: int, target: np.ndarray,
                orig_present: Optional[np.ndarray]) -> Tuple[np.ndarray, Tuple[np.ndarray, ...]]:
    """Best swap of each of the ``H`` busiest ranks with one of its ``K`` light ranks, in layers ``g``.

    Returns ``(busiest_found [G], (layers, heavy ranks, heavy slots, light ranks, light slots))``.
    Heavy rank ``j`` gets the light ranks ``j, j + H, j + 2H, ...`` in ascending load order, so
    the chosen swaps touch disjoint ranks and can all be applied at once.
    """
    S, G = st.S, g.size
    order = np.argsort(load[g], axis=1)
    hi = order[:, ::-1][:, :H]  # [G, H]
    lo = order[:, : H * K].reshape(G, K, H).transpose(0, 2, 1)  # [G, H, K]
    g2, g3, g4 = g[:, None], g[:, None, None], g[:, None, None, None]
    xa, xb = st.x[g2, hi], st.x[g3, lo]  # [G, H, S], [G, H, K, S]
    hi3 = hi[:, :, None]
    va = st.present[g4, lo[..., None], xa[:, :, None, :] + 1] == 0  # a may go to the light rank
    vb = st.present[g4, hi3[..., None], xb + 1] == 0  # b may go to the heavy rank
    if st.node_of is not None:
        nh, nl = st.node_of[hi3][..., None], st.node_of[lo][..., None]
        va &= ~st.spread_loss_at(g4, xa[:, :, None, :], nh, nl)
        vb &= ~st.spread_loss_at(g4, xb, nl, nh)
    th = load[g2, hi]  # [G, H]
    gap = (th[:, :, None] - load[g3, lo]).astype(np.float32)[..., None, None]  # [G, H, K, 1, 1]
    wa = st.per32[g3, xa][:, :, None, :, None]
    wb = st.per32[g4, xb][:, :, :, None, :]
    # For d = wa - wb the pair's new max minus th is (|gap - 2d| - gap) / 2: negative iff 0 < d < gap,
    # and comparable across light ranks, so one argmin picks the heavy rank's best swap.
    score = np.abs(gap - 2 * (wa - wb)) - gap
    ok = va[..., None] & vb[..., None, :] & (score < 0)
    ok &= (th > target[g][:, None])[:, :, None, None, None]
    score = np.where(ok, score, np.inf)
    if orig_present is not None:
        fa = (orig_present[g4, lo[..., None], xa[:, :, None, :] + 1] == 0).astype(np.int8) - (
            orig_present[g3, hi3, xa + 1] == 0)[:, :, None, :]
        fb = (orig_present[g4, hi3[..., None], xb + 1] == 0).astype(np.int8) - (
            orig_present[g4, lo[..., None], xb + 1] == 0)
        # Experts fetched (minus those sent home) first, balance second: |score| < gap < step.
        step = np.float32(2 * gap.max() + 1)
        score = score + step * (fa[..., None] + fb[..., None, :])
    score = score.reshape(G, H, -1)
    best = score.argmin(2)  # [G, H]
    found = np.take_along_axis(score, best[..., None], 2)[..., 0] < np.inf
    gi, hj = np.nonzero(found)
    b = best[gi, hj]
    return found[:, 0], (g[gi], hi[gi, hj], (b % (S * S)) // S, lo[gi, hj, b // (S * S)], b % S)


def _refine(st: _State, max_iters: int, target: np.ndarray,
            orig_present: Optional[np.ndarray] = None, heavy: int = 4, light: int = 2,
            widen: bool = True) -> None:
    """Swap replicas from the busiest live ranks to the least busy ones while that helps.

    Each iteration, in every layer whose busiest rank is above ``target``, each of the ``heavy``
    busiest ranks (above ``target``) looks at its own ``light`` light ranks and makes the swap that
    brings the pair closest to their mean (:func:`_best_swaps`). A layer whose busiest rank finds no
    such swap widens its search to every rank (if ``widen``); if that fails too, or the layer
    reached ``target``, it stops. With ``orig_present`` (``[L, n, E+1]``: expert was on that rank before) a swap that
    fetches fewer new experts wins over a better-balancing one (experts sent back home count
    negative), so rebalancing from a live placement moves little.
    """
    L, n = st.L, st.n
    if n < 2:
        return
    if st.node_of is not None:
        heavy = 1  # concurrent swaps could each take an expert's last replica off a node
    H = max(1, min(heavy, n // (light + 1)))
    K = max(1, min(light, (n - H) // H))
    load = st.loads()
    active = load.max(1) > target
    wide = np.zeros(L, dtype=bool)
    for _ in range(max_iters):
        g_all = np.flatnonzero(active)
        if g_all.size == 0:
            return
        moves = []
        for g, h, k, narrow in ((g_all[~wide[g_all]], H, K, True), (g_all[wide[g_all]], 1, n - 1, False)):
            if g.size == 0:
                continue
            found, swaps = _best_swaps(st, g, load, h, k, target, orig_present)
            if narrow and widen:
                wide[g[~found]] = True
            else:  # the busiest rank cannot improve: other swaps cannot lower this layer's max
                active[g[~found]] = False
            moves.append(swaps)
        for gg, r_hi, sa, r_lo, sb in moves:
            if gg.size == 0:
                continue
            dl = st.per[gg, st.x[gg, r_hi, sa]] - st.per[gg, st.x[gg, r_lo, sb]]
            st.swap(gg, r_hi, sa, r_lo, sb)
            np.add.at(load, (gg, r_hi), -dl)
            np.add.at(load, (gg, r_lo), dl)
        active &= load.max(1) > target


def _from_scratch(w: np.ndarray, n: int, S: int, node_of: Optional[np.ndarray], iters: int,
                  ) -> Tuple[np.ndarray, np.ndarray]:
    """``([L, n, S] experts, [L] busiest-rank load)`` of a fresh placement over ``n`` live ranks."""
    counts = replica_counts(w, n * S, n)
    per = w / counts
    x = _scratch_assign(per, counts, n, S)
    if node_of is not None:
        x = _order_ranks_by_node(x, node_of)
    st = _State(x, per, node_of)
    _fix_conflicts(st, max_iters=n * S)
    # Stop refining a layer within 0.1 % of the bound: past that, swaps cost more time than they buy.
    # Packing from scratch is already good; a narrow search keeps this path fast.
    bound = np.maximum(w.sum(1) / n, per.max(1))
    _refine(st, iters, bound * (1 + 1e-3), widen=False)
    x, best = st.x, st.loads().max(1)
    # Few large replicas (heavy tails with little redundancy) suit longest-processing-time better
    # than differencing; try it where we are still well above the bound and keep the better layer.
    bad = np.flatnonzero(best > bound * (1 + 5e-3))
    if bad.size and S > 1:
        order = np.argsort(-per[bad], axis=1)
        items = np.repeat(order.ravel(), np.take_along_axis(counts[bad], order, 1).ravel()).reshape(bad.size, n * S)
        pack, pos = balanced_packing(np.take_along_axis(per[bad], items, 1), n)
        xl = np.empty((bad.size, n, S), dtype=np.int64)
        xl[np.arange(bad.size)[:, None], pack, pos] = items
        if node_of is not None:
            xl = _order_ranks_by_node(xl, node_of)
        sl = _State(xl, per[bad], node_of)
        _fix_conflicts(sl, max_iters=n * S)
        _refine(sl, iters, bound[bad] * (1 + 1e-3), widen=False)
        lmax = sl.loads().max(1)
        better = lmax < best[bad]
        x[bad[better]], best[bad[better]] = sl.x[better], lmax[better]
    return x, best


def _live_set_changed(current: np.ndarray, live: np.ndarray, num_ranks: int, S: int) -> bool:
    was_live = (current.reshape(current.shape[0], num_ranks, S) >= 0).any(-1).any(0)
    return bool((was_live != live).any())


@register_algorithm("elasticity_aware")
def elasticity_aware(
    weight: np.ndarray,
    num_ranks: int,
    slots_per_rank: int,
    live: np.ndarray,
    ranks_per_node: Optional[int],
    current: Optional[np.ndarray],
    *,
    balance_tolerance: Optional[float] = None,
    max_swaps: Optional[int] = None,
) -> np.ndarray:
    """Place experts on live ranks only; see the module docstring.

    Options:
        balance_tolerance: with ``current``, how much busier (relative) a layer's busiest rank may be
            than in a from-scratch placement before we move experts to fix it. ``0`` asks for
            from-scratch balance with the fewest moves; ``0.01`` keeps more experts in place for up to
            1 % more load on the busiest rank. Default (``None``): ``0.01`` when the live set changed
            since ``current`` (failover or scaling: restore service with few transfers; the next
            periodic rebalance tightens balance), ``0.002`` otherwise (periodic rebalance).
        max_swaps: cap on improvement swaps per layer (default ``2 * live ranks + 4 * slots_per_rank + 16``:
            every rank may need a swap, and more slots give more ways to balance).
    """
    L, E = weight.shape
    S = slots_per_rank
    if balance_tolerance is not None and (not np.isfinite(balance_tolerance) or balance_tolerance < 0):
        raise ValueError(f"balance_tolerance must be a finite number >= 0, got {balance_tolerance!r}")
    if max_swaps is not None and max_swaps < 0:
        raise ValueError(f"max_swaps must be >= 0, got {max_swaps!r}")
    if S > E:
        raise ValueError(
            f"slots_per_rank ({S}) exceeds the number of logical experts ({E}): a rank would hold an expert twice"
        )
    live_idx = np.flatnonzero(live)
    n = len(live_idx)
    node_of = None
    if ranks_per_node is not None and ranks_per_node < num_ranks:
        node_of = np.unique(live_idx // ranks_per_node, return_inverse=True)[1].astype(np.int64)
        if node_of.max() == 0:
            node_of = None  # one node left: nothing to spread over
    iters = max_swaps if max_swaps is not None else 2 * n + 4 * S + 16
    # Zero-load experts still need a replica; a tiny floor keeps every ratio finite and well ordered.
    w = weight + (weight.sum(1, keepdims=True) / (E * 1e9) + 1e-300)

    if current is None:
        result, _ = _from_scratch(w, n, S, node_of, iters)
    else:
        tol = balance_tolerance
        if tol is None:
            tol = 0.01 if _live_set_changed(current, live, num_ranks, S) else 0.002
        result = _from_current(w, current.reshape(L, num_ranks, S)[:, live_idx], n, S, node_of, iters, tol)

    out = np.full((L, num_ranks, S), -1, dtype=np.int64)
    out[:, live_idx] = result
    return out.reshape(L, num_ranks * S)


def _from_current(w: np.ndarray, cur: np.ndarray, n: int, S: int, node_of: Optional[np.ndarray],
                  iters: int, tol: float) -> np.ndarray:
    """Movement-aware placement: repair ``cur`` (``[L, n, S]`` on today's live ranks, ``-1`` = empty),
    then swap towards balance; layers that cannot get within ``tol`` of from-scratch balance take the
    from-scratch placement."""
    L, E = w.shape
    rows = np.arange(L)
    cur = _drop_duplicates(cur)
    start = np.zeros((L, E + 1), dtype=np.int64)
    np.add.at(start, (rows[:, None], cur.reshape(L, -1) + 1), 1)
    opt_counts = replica_counts(w, n * S, n)
    bound = (w / opt_counts).max(1)
    counts = replica_counts(w, n * S, n, start=start[:, 1:], bound=bound * (1 + tol))
    per = w / counts
    st = _State(cur.copy(), per, node_of)
    keep_load = np.where(cur >= 0, per[rows[:, None, None], np.maximum(cur, 0)], 0.0).sum(-1)
    _repair_assign(st, counts, keep_load)
    _fix_conflicts(st, max_iters=n * S)
    orig = _State(cur, per, None).present
    lb = np.maximum(w.sum(1) / n, bound)
    # The from-scratch placement lands within ~0.05 % of the bound; aim at tol above that.
    target = lb * (1 + tol + 5e-4)
    # One swap per layer and step: concurrent swaps would each pay for a move the others make moot.
    _refine(st, iters, target, orig_present=orig, heavy=1, light=4)
    got = st.loads().max(1)
    missed = np.flatnonzero(got > target)
    if missed.size:
        fresh, fresh_max = _from_scratch(w[missed], n, S, node_of, iters)
        worse = got[missed] > fresh_max * (1 + tol)
        st.x[missed[worse]] = fresh[worse]
    return st.x


def _drop_duplicates(x: np.ndarray) -> np.ndarray:
    """Keep one copy where a rank holds the same expert twice (possible in foreign placements)."""
    srt = np.sort(x, axis=-1)
    if not ((srt[..., 1:] == srt[..., :-1]) & (srt[..., 1:] >= 0)).any():
        return x
    idx = np.argsort(x, axis=-1, kind="stable")
    s = np.take_along_axis(x, idx, -1)
    dup = np.concatenate([np.zeros(s.shape[:-1] + (1,), bool), (s[..., 1:] == s[..., :-1]) & (s[..., 1:] >= 0)], -1)
    mask = np.zeros_like(dup)
    np.put_along_axis(mask, idx, dup, -1)
    return np.where(mask, -1, x)


def rebalance_experts(
    weight: torch.Tensor,
    num_replicas: int,
    num_groups: Optional[int],
    num_nodes: int,
    num_gpus: int,
    enable_hierarchical: bool,
    active_ranks: torch.Tensor,
    current: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Drop-in for SGLang 0.5.23's ``elasticity_aware.rebalance_experts``, returning SGLang's triple.

    ``weight`` is ``[layers, E]``; ``active_ranks`` an int mask ``[num_gpus]`` (1 = alive).
    ``enable_hierarchical`` turns on node-aware spreading with ``num_gpus // num_nodes`` ranks per node
    (kept when ranks are dead, unlike upstream). ``num_groups`` is accepted for signature compatibility.
    ``current`` (our addition) is the ``physical_to_logical_map`` in force, for movement-awareness.
    Dead ranks' slots are left out of ``logical_to_physical_map`` and ``logical_count``.
    """
    from .. import rebalance  # late import: the registry imports this module

    if num_replicas % num_gpus:
        raise ValueError(f"num_replicas ({num_replicas}) must be a multiple of num_gpus ({num_gpus})")
    rpn = num_gpus // num_nodes if enable_hierarchical and num_nodes > 1 else None
    cur = None
    if current is not None:
        from ..placement import Placement

        cur = Placement.from_sglang(current, num_gpus, weight.shape[-1], active_ranks).phy2log
        # Slots of ranks dead *before* carry filler ids; treat them as empty so they are not "kept".
    placement = rebalance(weight, num_gpus, num_replicas // num_gpus, live_ranks=active_ranks,
                          ranks_per_node=rpn, current=cur)
    return placement.to_sglang()
