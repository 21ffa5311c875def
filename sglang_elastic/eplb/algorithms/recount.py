"""A start for the swaps that changes replica counts: orphans into replica slots, then count trades.

The usual repair (:mod:`.repair`) keeps every surviving replica where it is and puts the orphans in
free or surplus slots; its swaps never change a count. The fewest-transfer placements an exact
solver finds (``bench/eplb_milp.py``, docs/results.md session 29) often do: they take one replica of
a heavy multi-replica expert off a rank whose other holders have room, and put an orphan there. Two
steps, per layer, each a greedy choice over every slot:

1. :func:`place_orphans`: each expert without a live replica (heaviest first) takes the slot (an
   empty one, or one of an expert with two or more replicas) that leaves the busiest rank it
   touches lowest: the slot's rank, which swaps the slot's load for the orphan's, and the other
   holders of the slot's expert, which carry its load over one replica fewer.
2. :func:`trade_counts`: while the busiest rank is above the aim, one slot changes expert (one
   replica fewer of the slot's expert, one more of another) where that lowers the busiest rank:
   fewest experts fetched first (sending an expert back to a rank that held it counts negative),
   then the lowest busiest rank; at most one fetch a trade.

:mod:`.repair` refines the result with its usual swaps, as one more candidate trace that
:func:`.repair.choose_stops` may pick per layer. These are the numpy references;
:mod:`.jit_kernels` (``_recount_all``) makes the same decisions compiled.
"""
from __future__ import annotations

from typing import Tuple

import numpy as np

__all__ = ["place_orphans", "trade_counts", "recount"]

# A trade must lower the busiest rank by more than this fraction (float noise is no gain).
_GAIN = 1e-12


def _counts(xl: np.ndarray, E: int) -> np.ndarray:
    return np.bincount(xl[xl >= 0], minlength=E)


def _loads(xl: np.ndarray, per: np.ndarray) -> np.ndarray:
    """float64 ``[n]``: rank loads, summed as :class:`.slots.SlotState` sums them."""
    return np.where(xl >= 0, per[np.maximum(xl, 0)], 0.0).sum(-1)


def _per(w: np.ndarray, c: np.ndarray) -> np.ndarray:
    return np.where(c > 0, w / np.maximum(c, 1), 0.0)


def place_orphans(w: np.ndarray, xl: np.ndarray) -> bool:
    """Step 1 on one layer, in place.

    Parameters:
        w: float64 ``[E]`` load (positive). xl: int64 ``[n, S]`` live ranks' experts (``-1`` empty), no
            expert twice on a rank.

    Returns:
        ``False`` where some orphan found no slot (every slot holds an expert's only replica).
    """
    n, S = xl.shape
    E = w.size
    c = _counts(xl, E)
    orphans = np.flatnonzero(c == 0)
    flat = xl.reshape(-1)
    r_of = np.arange(n * S) // S
    for f in orphans[np.argsort(-w[orphans], kind="stable")]:
        per = _per(w, c)
        load = _loads(xl, per)
        e = flat
        ee = np.maximum(e, 0)
        held = e >= 0
        # The busiest other holder of each slot's expert: the busiest holder, or the second where
        # the busiest is the slot's own rank (first in slot order among equals).
        hl = np.where(held, load[r_of], -np.inf)
        order = np.lexsort((-hl, np.where(held, e, E)))
        es, hs, rs = np.where(held, e, E)[order], hl[order], r_of[order]
        head = np.ones(es.size, bool)
        head[1:] = es[1:] != es[:-1]
        second = np.zeros(es.size, bool)
        second[1:] = ~head[1:] & head[:-1]
        top1, top1r, top2 = np.full(E + 1, -np.inf), np.full(E + 1, -1), np.full(E + 1, -np.inf)
        top1[es[head]], top1r[es[head]] = hs[head], rs[head]
        top2[es[second]] = hs[second]
        other = np.where(top1r[ee] == r_of, top2[ee], top1[ee])
        cnt = c[ee]
        rise = w[ee] / np.maximum(cnt - 1, 1) - per[ee]          # on the other holders of e
        own = load[r_of] - np.where(held, per[ee], 0.0) + w[f]   # on the slot's rank
        score = np.where(held, np.maximum(own, other + rise), own)
        score = np.where(~held | (cnt >= 2), score, np.inf)
        j = int(score.argmin())
        if not np.isfinite(score[j]):
            return False
        if flat[j] >= 0:
            c[flat[j]] -= 1
        c[f] += 1
        flat[j] = f
    return True


def trade_counts(w: np.ndarray, xl: np.ndarray, orig: np.ndarray, aim: float, max_trades: int) -> int:
    """Step 2 on one layer, in place; returns the trades made.

    Parameters:
        w: float64 ``[E]``. xl: int64 ``[n, S]``, every expert on some rank, none twice on a rank.
        orig: bool ``[n, E + 1]`` (``[r, e + 1]``: rank ``r`` held ``e`` before). aim: float, the busiest
            rank to reach. max_trades: at most this many trades.
    """
    n, S = xl.shape
    E = w.size
    flat = xl.reshape(-1)
    done = 0
    for _ in range(max_trades):
        c = _counts(xl, E)
        per = _per(w, c)
        load = _loads(xl, per)
        hi = int(load.argmax())
        top = load[hi]
        if not top > aim:
            break
        hold = np.zeros((n, E + 1), bool)
        hold[np.arange(n)[:, None], xl + 1] = True
        hold[:, 0] = False
        # Candidates (slot j, new expert g): (a) a slot of the busiest rank, any expert; (b) any
        # slot, an expert the busiest rank holds (one replica more of it lightens the busiest rank).
        on_hi = xl[hi][xl[hi] >= 0]
        J = np.concatenate([np.repeat(hi * S + np.arange(S), E), np.tile(np.arange(n * S), on_hi.size)])
        G = np.concatenate([np.tile(np.arange(E), S), np.repeat(on_hi, n * S)])
        r, e = J // S, flat[J]
        ee = np.maximum(e, 0)
        ok = (e != G) & ~hold[r, G + 1] & ((e < 0) | (c[ee] >= 2))
        J, G, r, e, ee = J[ok], G[ok], r[ok], e[ok], ee[ok]
        if J.size == 0:
            break
        d_e = np.where(e >= 0, w[ee] / np.maximum(c[ee] - 1, 1) - per[ee], 0.0)
        d_g = w[G] / (c[G] + 1) - per[G]
        new = load[None, :] + hold[:, ee + 1].T * d_e[:, None]
        new = new + hold[:, G + 1].T * d_g[:, None]
        new[np.arange(J.size), r] = load[r] - np.where(e >= 0, per[ee], 0.0) + w[G] / (c[G] + 1)
        top_new = new.max(1)
        fetch = (~orig[r, G + 1]).astype(np.int64) - ((e >= 0) & ~orig[r, ee + 1]).astype(np.int64)
        key = np.where(top_new < top * (1 - _GAIN), fetch * 10.0 + top_new / top, np.inf)
        k = int(key.argmin())
        if not np.isfinite(key[k]) or fetch[k] > 1:
            break
        flat[J[k]] = G[k]
        done += 1
    return done


def recount(w: np.ndarray, x: np.ndarray, cur: np.ndarray, aim: np.ndarray, orphans_first: bool,
            max_trades: int) -> Tuple[np.ndarray, np.ndarray]:
    """Both steps on every layer (step 1 only with ``orphans_first``; else ``x`` is a repaired start).

    Parameters:
        w: float64 ``[L, E]``. x: int64 ``[L, n, S]``: the start (with ``orphans_first``, the current
            placement without duplicates; else the usual repair). cur: int64 ``[L, n, S]``, the current
            placement without duplicates. aim: float64 ``[L]``. max_trades: per layer.

    Returns:
        ``(x [L, n, S], ok bool [L])``: ``ok`` false where an orphan found no slot or a slot stays empty.
    """
    L, n, S = x.shape
    E = w.shape[1]
    x = x.copy()
    ok = np.ones(L, dtype=bool)
    for l in range(L):
        if orphans_first and not place_orphans(w[l], x[l]):
            ok[l] = False
            continue
        orig = np.zeros((n, E + 1), dtype=bool)
        orig[np.arange(n)[:, None], cur[l] + 1] = True
        orig[:, 0] = False
        trade_counts(w[l], x[l], orig, aim[l], max_trades)
        ok[l] = not (x[l] < 0).any()  # every live slot must hold an expert (new ranks' empty slots: the repair fills them)
    return x, ok
