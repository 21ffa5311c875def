"""The repair steps of :mod:`.repair` (replica counts, surplus drop, pool placement) compiled with numba.

:func:`.counts.replica_counts`, :func:`.repair.drop_surplus`, :func:`.repair.pool_items` and
:func:`.repair.place_pool` are the references (vectorised over layers; ~2.5 ms of numpy call overhead
per call on DS-V3); these make the same decisions per layer in compiled loops (``test/test_eplb_jit.py`` compares them). Rank loads come
from numpy (:meth:`.slots.SlotState.loads`) so every float is the reference's.
"""
from __future__ import annotations

import numpy as np

from .counts import BIG
from .refine_jit import AVAILABLE
from .slots import SlotState

__all__ = ["drop_surplus_jit", "place_pool_jit", "replica_counts_jit"]

if AVAILABLE:
    from numba import njit

    @njit(cache=True, nogil=True)
    def _drop_surplus(x, counts, rank_load, mx):
        L, n, S = x.shape
        E = counts.shape[1]
        have = np.zeros(E, np.int64)
        pos = np.empty(n * S, np.int64)
        key = np.empty(n * S, np.float64)
        for l in range(L):
            have[:] = 0
            for r in range(n):
                for s in range(S):
                    if x[l, r, s] >= 0:
                        have[x[l, r, s]] += 1
            for e in range(E):
                drop = have[e] - counts[l, e]
                if drop <= 0:
                    continue
                # Its slots by key (busiest rank first), ties by slot: the reference's stable argsort.
                m = 0
                for r in range(n):
                    k = np.float64(e) * 2.0 - rank_load[l, r] / (mx + 1.0)
                    for s in range(S):
                        if x[l, r, s] == e:
                            j = m
                            while j > 0 and key[j - 1] > k:
                                key[j], pos[j] = key[j - 1], pos[j - 1]
                                j -= 1
                            key[j], pos[j] = k, r * S + s
                            m += 1
                for i in range(drop):
                    x[l, pos[i] // S, pos[i] % S] = -1

    @njit(cache=True, nogil=True)
    def _place_pool(x, present, node_cnt, node_of, has_nodes, counts, per, load):
        L, n, S = x.shape
        E = counts.shape[1]
        M = node_cnt.shape[2]
        have = np.zeros(E, np.int64)
        items = np.empty(n * S, np.int64)
        free = np.empty(n, np.int64)
        for l in range(L):
            have[:] = 0
            for r in range(n):
                free[r] = 0
                for s in range(S):
                    if x[l, r, s] >= 0:
                        have[x[l, r, s]] += 1
                    else:
                        free[r] += 1
            # Replicas still needed, heaviest first, ties by expert id (the reference's stable argsort).
            w = 0
            for e in range(E):
                for _ in range(counts[l, e] - have[e]):
                    j = w
                    while j > 0 and -per[l, items[j - 1]] > -per[l, e]:
                        items[j] = items[j - 1]
                        j -= 1
                    items[j] = e
                    w += 1
            for i in range(w):
                e = items[i]
                lacks = False
                if has_nodes:
                    for m in range(M):
                        if node_cnt[l, e + 1, m] == 0:
                            lacks = True
                br = 0
                best = 0.0
                for r in range(n):
                    v = load[l, r] + (0.0 if free[r] > 0 else np.inf)
                    v = v + np.float64(present[l, r, e + 1]) * BIG
                    if has_nodes:
                        v = v + (BIG / 4 if node_cnt[l, e + 1, node_of[r]] > 0 and lacks else 0.0)
                    if r == 0 or v < best:
                        best, br = v, r
                si = 0
                for s in range(S):
                    if x[l, br, s] < 0:
                        si = s
                        break
                x[l, br, si] = e
                present[l, br, e + 1] = 1
                if has_nodes:
                    node_cnt[l, e + 1, node_of[br]] += 1
                load[l, br] += per[l, e]
                free[br] -= 1


    @njit(cache=True, nogil=True)
    def _replica_counts(weight, num_slots, cap, c, bound, big, gains, losses):
        L, E = weight.shape
        for l in range(L):
            w, cl, gain, loss = weight[l], c[l], gains[l], losses[l]
            diff = cl.sum() - num_slots
            while diff != 0:
                if diff < 0:
                    e = np.argmax(gain)
                    cl[e] += 1
                    diff += 1
                else:
                    e = np.argmin(loss)
                    cl[e] -= 1
                    diff -= 1
                gain[e] = w[e] / cl[e] if cl[e] < cap else -1.0
                loss[e] = w[e] / max(cl[e] - 1, 1) if cl[e] > 1 else big
            for _ in range(E):
                hot = np.argmax(gain)
                hot_load = gain[hot]
                keep = loss[hot]
                loss[hot] = big
                cold = np.argmin(loss)
                cold_load = loss[cold]
                loss[hot] = keep
                if not (hot_load > bound[l] * (1 + 1e-12) and cold_load < hot_load):
                    break
                for e, d in ((hot, 1), (cold, -1)):
                    cl[e] += d
                    gain[e] = w[e] / cl[e] if cl[e] < cap else -1.0
                    loss[e] = w[e] / max(cl[e] - 1, 1) if cl[e] > 1 else big


def replica_counts_jit(weight: np.ndarray, num_slots: int, max_per_expert: int, start: np.ndarray,
                       bound: np.ndarray) -> np.ndarray:
    """:func:`.counts.replica_counts` with ``start`` and ``bound``, compiled (same counts)."""
    c = np.clip(start, 1, max_per_expert).astype(np.int64)
    weight = np.ascontiguousarray(weight, dtype=np.float64)
    # The starting gains and losses as the reference computes them (vectorised divisions are cheaper).
    gain = np.where(c < max_per_expert, weight / c, -1.0)
    loss = np.where(c > 1, weight / np.maximum(c - 1, 1), BIG)
    _replica_counts(weight, int(num_slots), int(max_per_expert), c, np.ascontiguousarray(bound, dtype=np.float64),
                    BIG, gain, loss)
    return c


def drop_surplus_jit(x: np.ndarray, counts: np.ndarray, per: np.ndarray) -> np.ndarray:
    """:func:`.repair.drop_surplus`, compiled (same result)."""
    L, n, S = x.shape
    load = np.where(x >= 0, np.take_along_axis(per, np.maximum(x, 0).reshape(L, -1), 1).reshape(x.shape), 0.0).sum(-1)
    out = np.ascontiguousarray(x).copy()
    _drop_surplus(out, counts, load, float(load.max()) if load.size else 0.0)
    return out


def place_pool_jit(st: SlotState, counts: np.ndarray) -> None:
    """:func:`.repair.place_pool` ``(st, pool_items(st.x, counts, st.per))``, compiled (same placement)."""
    has_nodes = st.node_of is not None
    node_of = st.node_of.astype(np.int64) if has_nodes else np.zeros(st.n, dtype=np.int64)
    node_cnt = st.node_cnt if has_nodes else np.zeros((1, 1, 1), dtype=np.int64)
    _place_pool(st.x, st.present, node_cnt, node_of, has_nodes, counts.astype(np.int64), st.per, st.loads())
