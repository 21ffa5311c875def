"""The movement-aware swap refinement of :mod:`.repair`, compiled with numba: layers over 2 threads.

:func:`.refine.refine` (with ``orig_present``, ``trace``, ``heavy=1``) is the reference: it takes one
swap per layer and step, vectorised over layers with numpy, and each step costs ~0.3 ms of numpy call
overhead on tiny arrays (~28-38 steps). Here every layer runs its whole swap sequence as a compiled
loop, layers dealt over plain threads (the kernels release the GIL); the decisions are exactly the
reference's (same float32 scores, same first-minimum tie-breaking, same stable rank order), which
``test/test_eplb_jit.py`` checks over the bench families and random problems. Without numba,
:mod:`.repair` uses the reference.
"""
from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Optional, Tuple

import numpy as np

from .slots import SlotState

__all__ = ["AVAILABLE", "THREADS", "refine_traced", "rewind_traced", "warm_up"]

# Threads for the compiled refinement (at most the CPUs this process may use): the machine has 2.
THREADS = int(os.environ.get("SGLANG_ELASTIC_EPLB_THREADS", "2"))

try:  # numba is optional: without it the numpy reference runs (same placements, ~10x slower)
    from numba import njit
    AVAILABLE = True
except ImportError:  # pragma: no cover - exercised only where numba is absent
    AVAILABLE = False

if AVAILABLE:
    @njit(cache=True, nogil=True, inline="always")
    def _spread_loss(node_cnt, l, e, frm, to):
        return frm != to and node_cnt[l, e + 1, frm] == 1 and node_cnt[l, e + 1, to] > 0

    @njit(cache=True, nogil=True)
    def _layer(l, x, present, node_cnt, node_of, has_nodes, per, per32, ld, target, orig, max_iters,
               k_narrow, wide_search, maxes, fetched, swaps):
        n, S = x.shape[1], x.shape[2]
        E = per.shape[1]
        inf = np.float32(np.inf)
        f = 0  # experts fetched: filled slots whose expert was not on that rank before
        for r in range(n):
            for s in range(S):
                if x[l, r, s] >= 0 and orig[l, r, x[l, r, s] + 1] == 0:
                    f += 1
        maxes[l, 0] = ld.max()
        fetched[l, 0] = f
        if n < 2:
            return 0
        tgt = target[l]
        active = ld.max() > tgt
        wide = False
        order = np.arange(n)
        pa = np.empty(S, np.float32)
        pb = np.empty(S, np.float32)
        wa2 = np.empty(S, np.float32)
        wb2 = np.empty(S, np.float32)
        xl, pres, og, p32 = x[l], present[l], orig[l], per32[l]
        t = 0
        while active and t < max_iters:
            # Ranks by (load, id), as the reference's stable argsort: insertion sort from the last
            # step's order, which one swap only perturbs (two ranks move).
            for i in range(1, n):
                c = order[i]
                v = ld[c]
                j = i - 1
                while j >= 0 and (ld[order[j]] > v or (ld[order[j]] == v and order[j] > c)):
                    order[j + 1] = order[j]
                    j -= 1
                order[j + 1] = c
            hi = order[n - 1]
            th = ld[hi]
            K = n - 1 if wide else k_narrow
            under = wide_search and not wide
            step = np.float32(2) * np.float32(th - ld[order[0]]) + np.float32(1)
            best = inf
            best_pen = inf
            bk = -1
            bsa = -1
            bsb = -1
            for s in range(S):
                ea = xl[hi, s]
                wa2[s] = np.float32(2) * p32[ea if ea >= 0 else E + ea]
            for k in range(K):
                r = order[k]
                gap = np.float32(th - ld[r])
                if under and not ld[r] < tgt:
                    break  # ranks come lightest first: none after this one is under the target either
                if not th > tgt:
                    break
                pa_min = inf
                for s in range(S):
                    ea = xl[hi, s]
                    va = pres[r, ea + 1] == 0
                    if va and has_nodes:
                        va = not _spread_loss(node_cnt, l, ea, node_of[hi], node_of[r])
                    fa = np.int8(og[r, ea + 1] == 0) - np.int8(og[hi, ea + 1] == 0)
                    pa[s] = step * np.float32(fa) if va else inf
                    pa_min = min(pa_min, pa[s])
                # Every pair with this rank has pen >= pa_min - step (fb >= -1): skip the rank when that
                # is a higher class than the best so far (or no slot of the heavy rank may come here).
                if pa_min == inf or pa_min - step > best_pen:
                    continue
                for s in range(S):
                    eb = xl[r, s]
                    wb2[s] = np.float32(2) * p32[eb if eb >= 0 else E + eb]
                    vb = pres[hi, eb + 1] == 0
                    if vb and has_nodes:
                        vb = not _spread_loss(node_cnt, l, eb, node_of[r], node_of[hi])
                    fb = np.int8(og[hi, eb + 1] == 0) - np.int8(og[r, eb + 1] == 0)
                    pb[s] = step * np.float32(fb) if vb else inf
                # A pair's score is its penalty class pen = step * (fa + fb) (exact in float32) plus a
                # balance term in (-gap, 0), |gap| < step / 2: a pair of a higher class than the best so
                # far scores strictly more even after rounding, so it is skipped unevaluated (same argmin).
                pb_min = pb.min()
                for sa in range(S):
                    if pa[sa] == inf or pa[sa] + pb_min > best_pen:
                        continue
                    for sb in range(S):
                        pen = pa[sa] + pb[sb]
                        if pen > best_pen or pb[sb] == inf:
                            continue
                        sc = abs(gap - (wa2[sa] - wb2[sb])) - gap
                        if sc >= 0:
                            continue
                        sc = sc + pen
                        if sc < best:
                            best, best_pen, bk, bsa, bsb = sc, pen, r, sa, sb
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

    @njit(cache=True, nogil=True)
    def _refine_all(layers, x, present, node_cnt, node_of, has_nodes, per, per32, load, target, orig, max_iters,
                    k_narrow, wide_search, maxes, fetched, swaps, nsteps):
        for i in range(layers.size):
            l = layers[i]
            nsteps[l] = _layer(l, x, present, node_cnt, node_of, has_nodes, per, per32, load[l], target, orig,
                               max_iters, k_narrow, wide_search, maxes, fetched, swaps)

    @njit(cache=True, nogil=True)
    def _rewind_all(x, swaps, nsteps, stop):
        for l in range(x.shape[0]):
            for t in range(nsteps[l] - 1, stop[l] - 1, -1):  # the swap of step t + 1, latest first
                r1, s1, r2, s2 = swaps[l, t, 0], swaps[l, t, 1], swaps[l, t, 2], swaps[l, t, 3]
                if r1 >= 0:
                    x[l, r1, s1], x[l, r2, s2] = x[l, r2, s2], x[l, r1, s1]


_POOL: Optional[ThreadPoolExecutor] = None


def _threads() -> int:
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - platforms without affinity
        cpus = os.cpu_count() or 1
    return max(1, min(THREADS, cpus))


def _run_split(fn, L: int, args: tuple) -> None:
    """``fn(layers, *args)`` over all ``L`` layers, shared among up to :data:`THREADS` threads.

    The kernels release the GIL (``nogil``) and layers never interact, so plain threads run them in
    parallel; numba's own ``parallel=True`` (OpenMP layer) waited ~2x longer for its threads on the
    shared 2-core machine than this. The layers come in small interleaved chunks that each thread
    takes as it gets free: where another process holds a core, the caller's thread does the work
    instead of waiting for a worker that is not scheduled. Which thread takes a layer changes nothing.
    """
    global _POOL
    k = _threads() if L >= 8 else 1  # a thread hand-off costs ~50 us: not worth it for a few layers
    layers = np.arange(L)
    if k == 1:
        fn(layers, *args)
        return
    if _POOL is None or _POOL._max_workers < k - 1:
        _POOL = ThreadPoolExecutor(max_workers=k - 1, thread_name_prefix="eplb-refine")
    n_chunks = min(L, 4 * k)
    chunks = iter([layers[i::n_chunks] for i in range(n_chunks)])
    lock = threading.Lock()

    def work() -> None:
        while True:
            with lock:
                c = next(chunks, None)
            if c is None:
                return
            fn(c, *args)

    futs = [_POOL.submit(work) for _ in range(k - 1)]
    work()
    for f in futs:
        f.result()


def refine_traced(st: SlotState, max_iters: int, target: np.ndarray, orig_present: np.ndarray,
                  light: int = 4, wide_search: bool = False,
                  load: Optional[np.ndarray] = None) -> Tuple[np.ndarray, np.ndarray, Tuple]:
    """:func:`.refine.refine` ``(st, max_iters, target, orig_present, heavy=1, light, trace=[...],
    wide_search)``, compiled; updates ``st.x`` / ``st.present`` / ``st.node_cnt`` the same way.
    ``load``: ``st.loads()`` if the caller has it (it is modified).

    Returns:
        ``(maxes [T + 1, L], fetched [T + 1, L], record)``: the reference trace's busiest rank and
        experts fetched per step (layers that stopped repeat their last point), and what
        :func:`rewind_traced` needs.
    """
    L, n, S = st.x.shape
    load = st.loads() if load is None else load
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
    args = (st.x, st.present, node_cnt, np.ascontiguousarray(node_of, dtype=np.int64), has_nodes, st.per,
            st.per32, load, np.asarray(target, dtype=np.float64), orig_present,
            cap, K, bool(wide_search), maxes, fetched, swaps, nsteps)
    _run_split(_refine_all, L, args)
    T = int(nsteps.max()) if L else 0
    # Pad every layer with its last point, as the reference's global steps do.
    t = np.minimum(np.arange(T + 1)[:, None], nsteps[None, :])
    cols = np.arange(L)[None, :]
    return maxes[cols, t], fetched[cols, t], (swaps, nsteps)


def rewind_traced(x: np.ndarray, record: Tuple, stop: np.ndarray) -> None:
    """:func:`.refine.rewind` for :func:`refine_traced`'s record: undo layer ``l``'s swaps after step ``stop[l]``."""
    swaps, nsteps = record
    _rewind_all(x, swaps, nsteps, np.asarray(stop, dtype=np.int64))


def warm_up() -> float:
    """Compile (or load from numba's on-disk cache) every kernel of the movement-aware path, with and
    without nodes, so that the first failover does not pay for it; returns the seconds it took.

    The first process on a machine compiles (~3-7 s on the 2-core box); later processes load the
    cache (``cache=True``, next to the sources or in ``NUMBA_CACHE_DIR``) in ~0.3 s. Call it at start-up
    (e.g. in a background thread) where a failover must not wait for it. A no-op without numba.
    """
    import time

    from . import rebalance  # the package imports this module: import it at call time

    t = time.perf_counter()
    if AVAILABLE:
        w = np.arange(1, 9 * 12 + 1, dtype=np.float64).reshape(9, 12) ** 1.5
        for rpn, search in ((None, "narrow"), (2, "wide")):
            cur = rebalance(w, 4, 4, ranks_per_node=rpn)
            rebalance(w, 4, 4, live_ranks=[0, 1, 2], ranks_per_node=rpn, current=cur, search=search)
    return time.perf_counter() - t
