"""The movement-aware swap refinement of :mod:`.repair`, compiled with numba: one layer per thread.

:func:`.refine.refine` (with ``orig_present``, ``trace``, ``heavy=1``) is the reference: it takes one
swap per layer and step, vectorised over layers with numpy, and each step costs ~0.3 ms of numpy call
overhead on tiny arrays (~28-38 steps). Here every layer runs its whole swap sequence as a compiled
loop, ``prange`` over layers; the decisions are exactly the reference's (same float32 scores, same
first-minimum tie-breaking, same stable rank order), which ``test/test_elasticity_aware.py`` checks
over the bench families and random shapes. Without numba, :mod:`.repair` uses the reference.
"""
from __future__ import annotations

from typing import Optional, Tuple

import numpy as np

from .slots import SlotState

__all__ = ["AVAILABLE", "refine_traced", "rewind_traced"]

try:  # numba is optional: without it the numpy reference runs (same placements, ~10x slower)
    from numba import njit, prange
    AVAILABLE = True
except ImportError:  # pragma: no cover - exercised only where numba is absent
    AVAILABLE = False

if AVAILABLE:
    @njit(cache=True, nogil=True, inline="always")
    def _spread_loss(node_cnt, l, e, frm, to):
        return frm != to and node_cnt[l, e + 1, frm] == 1 and node_cnt[l, e + 1, to] > 0

    @njit(cache=True, nogil=True)
    def _layer(l, x, present, node_cnt, node_of, has_nodes, per, per32, ld, target, orig, f0, max_iters,
               k_narrow, wide_search, maxes, fetched, swaps):
        n, S = x.shape[1], x.shape[2]
        E = per.shape[1]
        inf = np.float32(np.inf)
        f = f0
        maxes[l, 0] = ld.max()
        fetched[l, 0] = f
        if n < 2:
            return 0
        tgt = target[l]
        active = ld.max() > tgt
        wide = False
        order = np.empty(n, np.int64)
        pa = np.empty(S, np.float32)
        pb = np.empty(S, np.float32)
        t = 0
        while active and t < max_iters:
            # Stable ascending order of rank loads (insertion sort: n is small).
            for i in range(n):
                v = ld[i]
                j = i - 1
                while j >= 0 and ld[order[j]] > v:
                    order[j + 1] = order[j]
                    j -= 1
                order[j + 1] = i
            hi = order[n - 1]
            th = ld[hi]
            K = n - 1 if wide else k_narrow
            under = wide_search and not wide
            step = np.float32(2) * np.float32(th - ld[order[0]]) + np.float32(1)
            best = inf
            bk = -1
            bsa = -1
            bsb = -1
            for k in range(K):
                r = order[k]
                gap = np.float32(th - ld[r])
                ok_a = th > tgt and (not under or ld[r] < tgt)
                for s in range(S):
                    ea = x[l, hi, s]
                    va = ok_a and present[l, r, ea + 1] == 0
                    if va and has_nodes:
                        va = not _spread_loss(node_cnt, l, ea, node_of[hi], node_of[r])
                    fa = np.int8(orig[l, r, ea + 1] == 0) - np.int8(orig[l, hi, ea + 1] == 0)
                    pa[s] = step * np.float32(fa) if va else inf
                    eb = x[l, r, s]
                    vb = present[l, hi, eb + 1] == 0
                    if vb and has_nodes:
                        vb = not _spread_loss(node_cnt, l, eb, node_of[r], node_of[hi])
                    fb = np.int8(orig[l, hi, eb + 1] == 0) - np.int8(orig[l, r, eb + 1] == 0)
                    pb[s] = step * np.float32(fb) if vb else inf
                for sa in range(S):
                    ea = x[l, hi, sa]
                    wa2 = np.float32(2) * per32[l, ea if ea >= 0 else E + ea]
                    for sb in range(S):
                        eb = x[l, r, sb]
                        wb2 = np.float32(2) * per32[l, eb if eb >= 0 else E + eb]
                        sc = abs(gap - (wa2 - wb2)) - gap
                        if sc >= 0:
                            continue
                        sc = sc + (pa[sa] + pb[sb])
                        if sc < best:
                            best, bk, bsa, bsb = sc, r, sa, sb
            if bk < 0:
                if wide:
                    active = False
                else:
                    wide = True
            else:
                e1, e2 = x[l, hi, bsa], x[l, bk, bsb]
                dl = per[l, e1 if e1 >= 0 else E + e1] - per[l, e2 if e2 >= 0 else E + e2]
                f += (np.int64(orig[l, hi, e2 + 1] == 0) + np.int64(orig[l, bk, e1 + 1] == 0)
                      - np.int64(orig[l, hi, e1 + 1] == 0) - np.int64(orig[l, bk, e2 + 1] == 0))
                x[l, hi, bsa] = -1
                x[l, bk, bsb] = -1
                present[l, hi, e1 + 1] = 0
                present[l, bk, e2 + 1] = 0
                for s in range(S):  # a rank may hold a second copy (a conflict not yet fixed)
                    if x[l, hi, s] == e1:
                        present[l, hi, e1 + 1] = 1
                    if x[l, bk, s] == e2:
                        present[l, bk, e2 + 1] = 1
                x[l, hi, bsa] = e2
                x[l, bk, bsb] = e1
                present[l, hi, e2 + 1] = 1
                present[l, bk, e1 + 1] = 1
                if has_nodes:
                    m1, m2 = node_of[hi], node_of[bk]
                    node_cnt[l, e1 + 1, m1] -= 1
                    node_cnt[l, e2 + 1, m2] -= 1
                    node_cnt[l, e2 + 1, m1] += 1
                    node_cnt[l, e1 + 1, m2] += 1
                ld[hi] -= dl
                ld[bk] += dl
                swaps[l, t, 0], swaps[l, t, 1], swaps[l, t, 2], swaps[l, t, 3] = hi, bsa, bk, bsb
            mx = ld.max()
            active = active and mx > tgt
            t += 1
            maxes[l, t] = mx
            fetched[l, t] = f
        return t

    @njit(cache=True, nogil=True, parallel=True)
    def _refine_all(x, present, node_cnt, node_of, has_nodes, per, per32, load, target, orig, f0, max_iters,
                    k_narrow, wide_search, maxes, fetched, swaps, nsteps):
        for l in prange(x.shape[0]):
            nsteps[l] = _layer(l, x, present, node_cnt, node_of, has_nodes, per, per32, load[l], target, orig,
                               f0[l], max_iters, k_narrow, wide_search, maxes, fetched, swaps)

    @njit(cache=True, nogil=True)
    def _rewind_all(x, swaps, nsteps, stop):
        for l in range(x.shape[0]):
            for t in range(nsteps[l] - 1, stop[l] - 1, -1):  # the swap of step t + 1, latest first
                r1, s1, r2, s2 = swaps[l, t, 0], swaps[l, t, 1], swaps[l, t, 2], swaps[l, t, 3]
                if r1 >= 0:
                    x[l, r1, s1], x[l, r2, s2] = x[l, r2, s2], x[l, r1, s1]


def refine_traced(st: SlotState, max_iters: int, target: np.ndarray, orig_present: np.ndarray,
                  light: int = 4, wide_search: bool = False) -> Tuple[np.ndarray, np.ndarray, Tuple]:
    """:func:`.refine.refine` ``(st, max_iters, target, orig_present, heavy=1, light, trace=[...],
    wide_search)``, compiled; updates ``st.x`` / ``st.present`` / ``st.node_cnt`` the same way.

    Returns:
        ``(maxes [T + 1, L], fetched [T + 1, L], record)``: the reference trace's busiest rank and
        experts fetched per step (layers that stopped repeat their last point), and what
        :func:`rewind_traced` needs.
    """
    L, n, S = st.x.shape
    load = st.loads()
    fetched0 = ((orig_present[st.rows[:, None, None], np.arange(n)[None, :, None], st.x + 1] == 0)
                & (st.x >= 0)).sum((1, 2))
    heavy, light = (1, n - 1) if wide_search else (1, light)
    H = max(1, min(heavy, n // (light + 1)))
    K = max(1, min(light, (n - H) // H))
    cap = max(0, int(max_iters))
    maxes = np.empty((L, cap + 1))
    fetched = np.empty((L, cap + 1), dtype=np.int64)
    swaps = np.full((L, cap, 4), -1, dtype=np.int64)
    nsteps = np.zeros(L, dtype=np.int64)
    has_nodes = st.node_of is not None
    node_of = st.node_of if has_nodes else np.zeros(n, dtype=np.int64)
    node_cnt = st.node_cnt if has_nodes else np.zeros((1, 1, 1), dtype=np.int64)
    _refine_all(st.x, st.present, node_cnt, np.ascontiguousarray(node_of, dtype=np.int64), has_nodes, st.per,
                st.per32, load, np.asarray(target, dtype=np.float64), orig_present, fetched0.astype(np.int64),
                cap, K, bool(wide_search), maxes, fetched, swaps, nsteps)
    T = int(nsteps.max()) if L else 0
    # Pad every layer with its last point, as the reference's global steps do.
    t = np.minimum(np.arange(T + 1)[:, None], nsteps[None, :])
    cols = np.arange(L)[None, :]
    return maxes[cols, t], fetched[cols, t], (swaps, nsteps)


def rewind_traced(x: np.ndarray, record: Tuple, stop: np.ndarray) -> None:
    """:func:`.refine.rewind` for :func:`refine_traced`'s record: undo layer ``l``'s swaps after step ``stop[l]``."""
    swaps, nsteps = record
    _rewind_all(x, swaps, nsteps, np.asarray(stop, dtype=np.int64))
