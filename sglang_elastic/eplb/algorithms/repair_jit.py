"""``from_current``'s steps up to the traced swaps, compiled: one pass per layer, layers over 2 threads.

The numpy references (:func:`.counts.replica_counts`, :func:`.repair.drop_surplus`,
:func:`.repair.pool_items` + :func:`.repair.place_pool`, :func:`.conflicts.fix_conflicts`,
:func:`.refine.refine`) are vectorised over layers and pay numpy's call overhead on tiny arrays at
every step; here each layer runs all of them in one compiled call (:func:`.jit_kernels._repair_refine_all`)
with the same decisions (``test/test_eplb_jit.py``). The rare layers that need a conflict fixed, or
that land just above their target after the repair (``_already_there`` asks for a from-scratch
placement), stop before the swaps; :mod:`.repair` handles them with numpy and then calls
:func:`refine_layers` for them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np

from .counts import BIG
from .jit_kernels import AVAILABLE
from .refine_jit import _run_split

if AVAILABLE:
    from .jit_kernels import _recount_all, _refine_all, _repair_refine_all
    from .jit_sums import _choose_stops, _targets_all, _valid

__all__ = ["Repaired", "repair_refine", "recount_refine", "refine_layers", "traced", "choose_stops", "targets", "valid"]


@dataclass
class Repaired:
    """Arrays of the compiled repair (``[L, ...]``); ``flag[l]``: 0 refined, 1 conflicts to fix, 2 near its target."""

    x: np.ndarray
    counts: np.ndarray
    per: np.ndarray
    per32: np.ndarray
    present: np.ndarray
    orig: np.ndarray
    node_cnt: np.ndarray
    node_of: np.ndarray
    has_nodes: bool
    load: np.ndarray
    aim: np.ndarray
    maxes: np.ndarray
    fetched: np.ndarray
    swaps: np.ndarray
    nsteps: np.ndarray
    flag: np.ndarray
    max_iters: int
    k_narrow: int
    k_extra: int
    wide_search: bool


def repair_refine(w: np.ndarray, cur: np.ndarray, n: int, S: int, node_of: Optional[np.ndarray], max_iters: int,
                  target: np.ndarray, rep_bound: np.ndarray, near_factor: float, aim_factor: float,
                  light: int = 4, extra: int = 0, wide_search: bool = False) -> Repaired:
    """Replica counts from ``cur``'s survivors, surplus drop, pool placement, then the traced swap
    refinement towards ``target * aim_factor``, per layer (see the module docstring).

    Parameters:
        w: float64 ``[L, E]`` positive load. cur: int64 ``[L, n, S]`` (a later copy of an expert on a rank is dropped).
        node_of: int64 ``[n]`` or ``None``. max_iters: swaps per layer. target, rep_bound: float64 ``[L]``.
        near_factor: a layer with ``target < busiest <= target * near_factor`` after the repair stops
            (flag 2). aim_factor: the refinement aims at ``target * aim_factor``. light, extra,
            wide_search: the swap search (:func:`.refine.refine`'s ``light``, ``extra``, ``wide_search``).

    Returns:
        :class:`Repaired`.
    """
    L, E = w.shape
    K = _narrow_partners(n, light, wide_search)
    cap = max(0, int(max_iters))
    has_nodes = node_of is not None
    M = int(node_of.max()) + 1 if has_nodes else 1
    rp = Repaired(
        x=np.empty((L, n, S), np.int64), counts=np.empty((L, E), np.int64), per=np.empty((L, E)),
        per32=np.empty((L, E), np.float32), present=np.empty((L, n, E + 1), np.int8),
        orig=np.empty((L, n, E + 1), np.int8),
        node_cnt=np.empty((L, E + 1, M) if has_nodes else (1, 1, 1), np.int64),
        node_of=np.ascontiguousarray(node_of, dtype=np.int64) if has_nodes else np.zeros(n, np.int64),
        has_nodes=has_nodes, load=np.empty((L, n)), aim=np.full(L, np.inf), maxes=np.empty((L, cap + 1)),
        fetched=np.empty((L, cap + 1), np.int64), swaps=np.empty((L, cap, 4), np.int64),
        nsteps=np.zeros(L, np.int64), flag=np.zeros(L, np.int64), max_iters=cap, k_narrow=K,
        k_extra=max(0, int(extra)), wide_search=bool(wide_search))
    args = (np.ascontiguousarray(w, dtype=np.float64), np.ascontiguousarray(cur, dtype=np.int64), rp.x, rp.counts,
            rp.per, rp.per32, rp.present, rp.orig, rp.node_cnt, rp.node_of, has_nodes, rp.load, n * S, n,
            np.ascontiguousarray(rep_bound, dtype=np.float64), BIG, np.ascontiguousarray(target, dtype=np.float64),
            float(near_factor), float(aim_factor), rp.aim, cap, K, rp.k_extra, rp.wide_search, rp.maxes, rp.fetched,
            rp.swaps, rp.nsteps, rp.flag)
    _run_split(_repair_refine_all, np.arange(L), args, slots=n * S)
    return rp


def _narrow_partners(n: int, light: int, wide_search: bool) -> int:
    """The busiest rank's partners per step (:func:`.refine.refine` with ``heavy=1``)."""
    heavy, light = (1, n - 1) if wide_search else (1, light)
    H = max(1, min(heavy, n // (light + 1)))
    return max(1, min(light, (n - H) // H))


def recount_refine(w: np.ndarray, start: np.ndarray, cur: np.ndarray, max_iters: int, aim: np.ndarray,
                   orphans_first: bool, max_trades: int, light: int = 4, extra: int = 0) -> Tuple[Repaired, np.ndarray]:
    """:func:`.recount.recount` from ``start``, then the traced narrow refinement towards ``aim``, per layer
    (``from_current``'s count-changing candidate; no nodes: the orphans' slots ignore node spread).

    Parameters:
        w: float64 ``[L, E]``. start: int64 ``[L, n, S]``. cur: int64 ``[L, n, S]`` without duplicates.
        max_iters: swaps per layer. aim: float64 ``[L]``. orphans_first, max_trades: :func:`.recount.recount`'s.

    Returns:
        ``(Repaired, ok bool [L])``.
    """
    L, n, S = start.shape
    E = w.shape[1]
    x = np.ascontiguousarray(start, dtype=np.int64).copy()
    ok = np.zeros(L, np.bool_)
    counts, per, per32 = np.empty((L, E), np.int64), np.empty((L, E)), np.empty((L, E), np.float32)
    present, orig, load = np.empty((L, n, E + 1), np.int8), np.empty((L, n, E + 1), np.int8), np.empty((L, n))
    aim = np.ascontiguousarray(aim, dtype=np.float64)
    _run_split(_recount_all, np.arange(L), (np.ascontiguousarray(w, dtype=np.float64), x,
                                            np.ascontiguousarray(cur, dtype=np.int64), aim, bool(orphans_first),
                                            int(max_trades), ok, counts, per, per32, present, orig, load),
               slots=n * S)
    cap = max(0, int(max_iters))
    rp = Repaired(
        x=x, counts=counts, per=per, per32=per32, present=present, orig=orig,
        node_cnt=np.zeros((1, 1, 1), np.int64), node_of=np.zeros(n, np.int64), has_nodes=False,
        load=load, aim=aim.copy(), maxes=np.empty((L, cap + 1)),
        fetched=np.empty((L, cap + 1), np.int64), swaps=np.empty((L, cap, 4), np.int64),
        nsteps=np.zeros(L, np.int64), flag=np.zeros(L, np.int64), max_iters=cap,
        k_narrow=_narrow_partners(n, light, False), k_extra=max(0, int(extra)), wide_search=False)
    refine_layers(rp, np.arange(L))
    return rp, ok


def refine_layers(rp: Repaired, layers: np.ndarray) -> None:
    """The traced refinement of ``layers`` (those the repair stopped early), towards ``rp.aim``, from
    ``rp.load`` (the caller sets both, and ``rp.x`` / ``rp.present`` / ``rp.node_cnt`` after its fixes)."""
    rp.swaps[layers] = -1
    _run_split(_refine_all, np.ascontiguousarray(layers, dtype=np.int64),
               (rp.x, rp.present, rp.node_cnt, rp.node_of, rp.has_nodes, rp.per, rp.per32, rp.load, rp.aim,
                rp.orig, rp.max_iters, rp.k_narrow, rp.k_extra, rp.wide_search, rp.maxes, rp.fetched, rp.swaps,
                rp.nsteps), slots=rp.x.shape[1] * rp.x.shape[2])


def traced(rp: Repaired) -> Tuple[np.ndarray, np.ndarray, Tuple]:
    """``(maxes [T + 1, L], fetched [T + 1, L], record)`` as :func:`.refine_jit.refine_traced` returns them."""
    L = rp.x.shape[0]
    T = int(rp.nsteps.max()) if L else 0
    # Pad every layer with its last point, as the reference's global steps do.
    t = np.minimum(np.arange(T + 1)[:, None], rp.nsteps[None, :])
    cols = np.arange(L)[None, :]
    return rp.maxes[cols, t], rp.fetched[cols, t], (rp.swaps, rp.nsteps)


def choose_stops(maxes: np.ndarray, fetched: np.ndarray, target: np.ndarray, missed: np.ndarray,
                 fresh_max: np.ndarray, fresh_cost: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """:func:`.repair.choose_stops`, compiled (the same picks): ``(step [L], use_fresh bool [M])``."""
    L = maxes.shape[1]
    k, use_fresh = np.empty(L, np.int64), np.empty(len(missed), np.bool_)
    _choose_stops(np.ascontiguousarray(maxes, dtype=np.float64), np.ascontiguousarray(fetched, dtype=np.float64),
                  np.ascontiguousarray(target, dtype=np.float64), np.ascontiguousarray(missed, dtype=np.int64),
                  np.ascontiguousarray(fresh_max, dtype=np.float64), np.ascontiguousarray(fresh_cost, dtype=np.float64),
                  k, use_fresh)
    return k, use_fresh


def valid(phy2log: np.ndarray, num_ranks: int, num_experts: int, live: np.ndarray, allow_duplicates: bool) -> bool:
    """Whether :meth:`..placement.Placement.validate` ``(live, allow_duplicates)`` would pass, compiled
    (~20x faster); ``False`` also without numba, so the caller runs ``validate`` for its message."""
    if not AVAILABLE or phy2log.shape[1] % num_ranks:
        return False
    x = np.ascontiguousarray(phy2log, dtype=np.int64).reshape(phy2log.shape[0], num_ranks, -1)
    return bool(_valid(x, int(num_experts), np.ascontiguousarray(live, dtype=np.bool_), bool(allow_duplicates)))


def targets(weight: np.ndarray, w: np.ndarray, n: int, S: int, min_balance: float,
            slack: float, reference: str = "greedy",
            keep: Optional[np.ndarray] = None) -> Tuple[np.ndarray, np.ndarray]:
    """``(balance_target(weight, n, S, min_balance, reference), replica_bound(w, n, S, that target,
    min_balance, keep))`` compiled, per layer over the threads (same floats; ``slack``: the factor
    ``balance_target`` puts on the bound). ``weight``: the caller's load ``[L, E]``; ``w``: it with the
    zero-load floor; ``keep``: float64 ``[L]`` or ``None``."""
    L = weight.shape[0]
    target, rep_bound = np.empty(L), np.empty(L)
    keep = np.zeros(L) if keep is None else np.ascontiguousarray(keep, dtype=np.float64)
    _run_split(_targets_all, np.arange(L), (np.ascontiguousarray(weight, dtype=np.float64),
                                            np.ascontiguousarray(w, dtype=np.float64), int(n), int(S),
                                            float(min_balance), float(slack), reference == "greedy",
                                            keep, target, rep_bound), slots=n * S)
    return target, rep_bound
