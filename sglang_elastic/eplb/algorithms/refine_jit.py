"""Running the compiled kernels (:mod:`.jit_kernels`) over layers on 2 threads; rewinding traced swaps; warm-up.

:func:`.refine.refine` (with ``orig_present``, ``trace``, ``heavy=1``) is the reference of the swap
refinement: one swap per layer and step, vectorised over layers with numpy, each step ~0.3 ms of numpy
call overhead on tiny arrays (~28-38 steps). The kernels run every layer's whole sequence as a compiled
loop, layers dealt over plain threads (the kernels release the GIL), with exactly the reference's
decisions (``test/test_eplb_jit.py``). Without numba, :mod:`.repair` uses the reference.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Optional, Tuple

import numpy as np

from .jit_kernels import AVAILABLE

if AVAILABLE:
    from .jit_kernels import _assign_all, _conflicts_all, _lpt_all, _rewind_all, _scratch_all
    from .jit_sums import _node_order_all

if TYPE_CHECKING:
    from .slots import SlotState

__all__ = ["AVAILABLE", "THREADS", "rewind_traced", "refine_scratch", "fix_conflicts_compiled",
           "scratch_assign_compiled", "lpt_assign_compiled", "order_ranks_by_node_compiled", "warm_up", "warm_up_in_background"]

# Threads for the compiled refinement (at most the CPUs this process may use): the machine has 2.
THREADS = int(os.environ.get("SGLANG_ELASTIC_EPLB_THREADS", "2"))

_POOL: Optional[ThreadPoolExecutor] = None
log = logging.getLogger(__name__)


def _threads() -> int:
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - platforms without affinity
        cpus = os.cpu_count() or 1
    return max(1, min(THREADS, cpus))


# Below this many slots in all (layers x live ranks x slots per rank) one thread runs the kernels: a
# hand-off costs ~50 us, more than a small model's layers take (8x32 EP8x6 to 16x60 EP8x9: ~25 % faster).
_MIN_SPLIT = 4096


def _run_split(fn, layers: np.ndarray, args: tuple, slots: int = _MIN_SPLIT) -> None:
    """``fn(some_layers, *args)`` over all of ``layers`` (int64), shared among up to :data:`THREADS` threads
    where there is enough work (``slots``: a layer's live slots).

    The kernels release the GIL (``nogil``) and layers never interact, so plain threads run them in
    parallel; numba's own ``parallel=True`` (OpenMP layer) waited ~2x longer for its threads on the
    shared 2-core machine than this. The layers come in small interleaved chunks that each thread
    takes as it gets free: where another process holds a core, the caller's thread does the work
    instead of waiting for a worker that is not scheduled. Which thread takes a layer changes nothing.
    """
    global _POOL
    L = layers.size
    k = _threads() if L >= 8 and L * slots >= _MIN_SPLIT else 1
    if k == 1:
        fn(layers, *args)
        return
    if _POOL is None or _POOL._max_workers < k - 1:
        _POOL = ThreadPoolExecutor(max_workers=k - 1, thread_name_prefix="eplb-refine")
    n_chunks = min(L, 4 * k)
    chunks = iter([np.ascontiguousarray(layers[i::n_chunks]) for i in range(n_chunks)])  # one kernel signature
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


def rewind_traced(x: np.ndarray, record: Tuple, stop: np.ndarray) -> None:
    """:func:`.refine.rewind` for :func:`.repair_jit.traced`'s record: undo layer ``l``'s swaps after step ``stop[l]``."""
    swaps, nsteps = record
    _rewind_all(x, swaps, nsteps, np.asarray(stop, dtype=np.int64))


def _assign(kernel, per: np.ndarray, counts: np.ndarray, n: int, S: int) -> np.ndarray:
    L = per.shape[0]
    x = np.empty((L, n, S), dtype=np.int64)
    if L:
        _run_split(kernel, np.arange(L), (np.ascontiguousarray(per, dtype=np.float64),
                                          np.ascontiguousarray(counts, dtype=np.int64), x), slots=n * S)
    return x


def scratch_assign_compiled(per: np.ndarray, counts: np.ndarray, n: int, S: int) -> np.ndarray:
    """:func:`.packing.scratch_assign_reference`, compiled (the same assignment): int64 ``[L, n, S]``."""
    return _assign(_assign_all, per, counts, n, S)


def lpt_assign_compiled(per: np.ndarray, counts: np.ndarray, n: int, S: int) -> np.ndarray:
    """:func:`.packing.lpt_assign_reference`, compiled (the same assignment): int64 ``[L, n, S]``."""
    return _assign(_lpt_all, per, counts, n, S)


def order_ranks_by_node_compiled(x: np.ndarray, node_of: np.ndarray) -> np.ndarray:
    """:func:`.packing.order_ranks_by_node_reference`, compiled (the same order): int64 ``[L, n, S]``."""
    x = np.ascontiguousarray(x, dtype=np.int64)
    node_of = np.ascontiguousarray(node_of, dtype=np.int64)
    out = np.empty_like(x)
    if x.shape[0]:
        _node_order_all(x, node_of, np.argsort(node_of, kind="stable"), int(node_of.max()) + 1, out)
    return out


def _kernel_arrays(st: SlotState) -> Tuple[np.ndarray, np.ndarray]:
    """Give ``st`` C-contiguous arrays of the kernels' dtypes, on ``st`` itself (the kernels write into
    them; no copy where they already are, as for every ``SlotState`` the package builds); returns the
    kernels' ``(node_cnt, node_of)`` (placeholders without nodes)."""
    st.x = np.ascontiguousarray(st.x, dtype=np.int64)
    st.present = np.ascontiguousarray(st.present, dtype=np.int8)
    st.per = np.ascontiguousarray(st.per, dtype=np.float64)
    st.per32 = np.ascontiguousarray(st.per32, dtype=np.float32)
    if st.node_of is None:
        return np.zeros((1, 1, 1), np.int64), np.zeros(st.n, np.int64)
    st.node_cnt = np.ascontiguousarray(st.node_cnt, dtype=np.int64)
    return st.node_cnt, np.ascontiguousarray(st.node_of, dtype=np.int64)


def refine_scratch(st: SlotState, max_iters: int, target: np.ndarray, heavy: int = 4, light: int = 2) -> None:
    """:func:`.refine.refine` of a from-scratch placement (``widen=False``, no ``orig_present``), compiled:
    the same swaps, in place on ``st`` (``x``, ``present``, ``node_cnt``); layers over the threads."""
    n = st.n
    if n < 2 or st.L == 0:
        return
    has_nodes = st.node_of is not None
    if has_nodes:
        heavy = 1  # as the reference: concurrent swaps could each take an expert's last replica off a node
    H = max(1, min(heavy, n // (light + 1)))
    K = max(1, min(light, (n - H) // H))
    node_cnt, node_of = _kernel_arrays(st)
    _run_split(_scratch_all, np.arange(st.L), (st.x, st.present, node_cnt, node_of, has_nodes, st.per, st.per32,
                                               st.loads(), np.ascontiguousarray(target, dtype=np.float64),
                                               int(max_iters), H, K), slots=n * st.S)


def fix_conflicts_compiled(st: SlotState, max_iters: int) -> None:
    """:func:`.conflicts.fix_conflicts`, compiled: the same swaps, in place on ``st``; layers over the threads."""
    if st.L == 0:
        return
    from .counts import BIG

    has_nodes = st.node_of is not None
    node_cnt, node_of = _kernel_arrays(st)
    _run_split(_conflicts_all, np.arange(st.L), (st.x, st.present, node_cnt, node_of, has_nodes, st.per,
                                                 int(max_iters), BIG), slots=st.n * st.S)


def warm_up() -> float:
    """Compile (or load from numba's on-disk cache) every kernel of the movement-aware path, with and
    without nodes, so that the first failover does not pay for it; returns the seconds it took.

    The first process on a machine compiles (~3-7 s on the 2-core box); later processes load the
    cache (``cache=True``, next to the sources or in ``NUMBA_CACHE_DIR``) in ~0.3 s. Call it at start-up
    (e.g. in a background thread) where a failover must not wait for it. A no-op without numba.
    """
    from . import rebalance  # the package imports this module: import it at call time

    t = time.perf_counter()
    if AVAILABLE:
        w = np.arange(1, 9 * 12 + 1, dtype=np.float64).reshape(9, 12) ** 1.5
        for rpn, search in ((None, "both"), (2, "wide")):  # both, on so few slots: narrow and .recount's passes too
            cur = rebalance(w, 4, 4, ranks_per_node=rpn)
            rebalance(w, 4, 4, live_ranks=[0, 1, 2], ranks_per_node=rpn, current=cur, search=search)
        # The swaps of layers the compiled repair hands back (conflicts, near the target) have their own
        # entry point: compile it too.
        from . import repair_jit

        rp = repair_jit.repair_refine(w, cur.phy2log.numpy().reshape(9, 4, 4)[:, :3], 3, 4, None, 4,
                                      np.full(9, np.inf), np.full(9, np.inf), 1.002, 1.0)
        repair_jit.refine_layers(rp, np.arange(9))
        # From scratch, the LPT packing runs only for layers the differencing packs badly: compile it too.
        lpt_assign_compiled(w / 2, np.full(w.shape, 2, np.int64), 6, 4)
    return time.perf_counter() - t


def warm_up_in_background(name: str = "sglang-elastic-eplb-warm-up") -> threading.Thread:
    """Start :func:`warm_up` in a daemon thread named ``name`` and return it (join it to wait for the
    kernels). A failure is logged, not raised: it only costs the first rebalance its compile."""
    def run() -> None:
        t = time.perf_counter()
        try:
            warm_up()
        except Exception as exc:  # noqa: BLE001 - see the docstring
            log.warning("[sglang_elastic] EPLB warm-up failed (%s: %s); the first rebalance compiles",
                        type(exc).__name__, exc)
            return
        log.info("[sglang_elastic] EPLB kernels ready in %.2f s", time.perf_counter() - t)

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    return thread
