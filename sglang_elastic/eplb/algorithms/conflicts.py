"""Conflict removal: no rank holds an expert twice; with nodes, replicas spread over nodes."""
from __future__ import annotations

import numpy as np

from .counts import BIG
from .slots import SlotState

__all__ = ["fix_conflicts", "fix_conflicts_reference"]


def fix_conflicts(st: SlotState, max_iters: int) -> None:
    """:func:`fix_conflicts_reference`, compiled wherever :mod:`.repair` runs its kernels (the same swaps)."""
    from . import refine_jit, repair  # repair imports this module; its switch decides for both

    if repair.USE_JIT:
        refine_jit.fix_conflicts_compiled(st, max_iters)
    else:
        fix_conflicts_reference(st, max_iters)


def fix_conflicts_reference(st: SlotState, max_iters: int) -> None:
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
            cost = cost + np.where(keeps_e2, 0.0, 2 * BIG) + np.where(to_lacking, 0.0, BIG)
        cost = np.where(ok, cost, np.inf).reshape(c.size, -1)
        best = cost.argmin(1)
        found = cost[np.arange(c.size), best] < np.inf
        if found.any():
            st.swap(c[found], r1[found], s1[found], best[found] // S, best[found] % S)

