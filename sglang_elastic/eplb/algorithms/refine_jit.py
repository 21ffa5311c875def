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

from .jit_kernels import AVAILABLE
from .slots import SlotState

if AVAILABLE:
    from .jit_kernels import _refine_all, _rewind_all

__all__ = ["AVAILABLE", "THREADS", "refine_traced", "rewind_traced", "warm_up"]

# Threads for the compiled refinement (at most the CPUs this process may use): the machine has 2.
THREADS = int(os.environ.get("SGLANG_ELASTIC_EPLB_THREADS", "2"))

_POOL: Optional[ThreadPoolExecutor] = None


def _threads() -> int:
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - platforms without affinity
        cpus = os.cpu_count() or 1
    return max(1, min(THREADS, cpus))


def _run_split(fn, layers: np.ndarray, args: tuple) -> None:
    """``fn(some_layers, *args)`` over all of ``layers`` (int64), shared among up to :data:`THREADS` threads.

    The kernels release the GIL (``nogil``) and layers never interact, so plain threads run them in
    parallel; numba's own ``parallel=True`` (OpenMP layer) waited ~2x longer for its threads on the
    shared 2-core machine than this. The layers come in small interleaved chunks that each thread
    takes as it gets free: where another process holds a core, the caller's thread does the work
    instead of waiting for a worker that is not scheduled. Which thread takes a layer changes nothing.
    """
    global _POOL
    L = layers.size
    k = _threads() if L >= 8 else 1  # a thread hand-off costs ~50 us: not worth it for a few layers
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
    _run_split(_refine_all, np.arange(L), args)
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
