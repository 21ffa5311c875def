"""Movement-aware placement: repair the placement in force, then swap towards balance."""
from __future__ import annotations

from typing import Optional

import numpy as np

from .conflicts import fix_conflicts
from .counts import BIG, replica_counts
from .packing import from_scratch
from .refine import refine
from .slots import SlotState, drop_duplicates

__all__ = ["repair_assign", "from_current"]


def repair_assign(st: SlotState, counts: np.ndarray, keep_load: np.ndarray) -> None:
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
        score += np.where(st.present[st.rows, :, ee + 1] > 0, BIG, 0.0)
        if st.node_of is not None:
            held = st.node_cnt[st.rows, ee + 1][:, st.node_of] > 0  # [L, n]: rank's node holds e
            some_node_lacks = (st.node_cnt[st.rows, ee + 1] == 0).any(1, keepdims=True)
            score += np.where(held & some_node_lacks, BIG / 4, 0.0)
        r = score.argmin(1)
        li = st.rows[act]
        ri = r[act]
        si = (x[li, ri] < 0).argmax(1)
        st.place(li, ri, si, e[act])
        load[li, ri] += st.per[li, e[act]]
        free[li, ri] -= 1



def from_current(w: np.ndarray, cur: np.ndarray, n: int, S: int, node_of: Optional[np.ndarray],
                 iters: int, target: np.ndarray, min_balance: float) -> np.ndarray:
    """Movement-aware placement: repair ``cur``, then swap towards ``target``.

    Parameters:
        w: float64 ``[L, E]`` load (positive). cur: int64 ``[L, n, S]`` on today's live ranks, ``-1`` = empty.
        n, S: live ranks, slots per rank. node_of: int64 ``[n]`` node of each live rank, or ``None``.
        iters: swap budget per layer. target: float64 ``[L]`` busiest-rank load to reach (``inf``: any).
        min_balance: a layer that misses ``target`` takes the from-scratch placement unless it is within
            ``1 / min_balance`` of that placement's busiest rank.

    Returns:
        int64 ``[L, n, S]``.
    """
    L, E = w.shape
    rows = np.arange(L)
    cur = drop_duplicates(cur)
    start = np.zeros((L, E + 1), dtype=np.int64)
    np.add.at(start, (rows[:, None], cur.reshape(L, -1) + 1), 1)
    opt_counts = replica_counts(w, n * S, n)
    rep_bound = np.where(np.isfinite(target), (w / opt_counts).max(1) / min_balance, np.inf)
    counts = replica_counts(w, n * S, n, start=start[:, 1:], bound=rep_bound)
    per = w / counts
    st = SlotState(cur.copy(), per, node_of)
    keep_load = np.where(cur >= 0, per[rows[:, None, None], np.maximum(cur, 0)], 0.0).sum(-1)
    repair_assign(st, counts, keep_load)
    fix_conflicts(st, max_iters=n * S)
    orig = SlotState(cur, per, None).present
    # One swap per layer and step: concurrent swaps would each pay for a move the others make moot.
    refine(st, iters, target, orig_present=orig, heavy=1, light=4)
    got = st.loads().max(1)
    missed = np.flatnonzero(got > target)
    if missed.size:
        fresh, fresh_max = from_scratch(w[missed], n, S, node_of, iters)
        worse = got[missed] * min_balance > fresh_max
        st.x[missed[worse]] = fresh[worse]
    return st.x
