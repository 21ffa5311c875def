"""Replica counts: how many replicas each logical expert gets, and the balance bound they imply.

All functions work on every layer at once (arrays ``[L, E]``); loops run over added replicas only.
"""
from __future__ import annotations

from typing import Optional

import numpy as np

__all__ = ["BIG", "greedy_counts", "replica_counts", "capped_counts", "FILL_RULES", "lightest_sum", "max_load_bound",
           "greedy_busiest"]

BIG = 1e30  # "never pick this" score that stays finite (inf would poison sums)

def greedy_counts(weight: np.ndarray, num_slots: int, cap: int) -> np.ndarray:
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
        return greedy_counts(weight, num_slots, max_per_expert)
    c = np.ones((L, E), dtype=np.int64) if start is None else np.clip(start, 1, max_per_expert).astype(np.int64)
    gain = np.where(c < max_per_expert, weight / c, -1.0)  # heaviest replica if we add one more
    loss = np.where(c > 1, weight / np.maximum(c - 1, 1), BIG)  # replica load if we remove one

    def bump(ls: np.ndarray, es: np.ndarray, delta: int) -> None:
        c[ls, es] += delta
        cc, ww = c[ls, es], weight[ls, es]
        gain[ls, es] = np.where(cc < max_per_expert, ww / cc, -1.0)
        loss[ls, es] = np.where(cc > 1, ww / np.maximum(cc - 1, 1), BIG)

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
        lo[rows, hot] = BIG
        cold = lo.argmin(1)
        go = np.flatnonzero((hot_load > bound * (1 + 1e-12)) & (lo[rows, cold] < hot_load))
        if go.size == 0:
            break
        bump(go, hot[go], 1)
        bump(go, cold[go], -1)
    return c


# Where the slots a replica cap leaves go (see capped_counts).
FILL_RULES = ("light", "single")


def capped_counts(weight: np.ndarray, num_slots: int, cap: np.ndarray, max_per_expert: int,
                  fill: str) -> np.ndarray:
    """int64 ``[L, E]``: the fewest replicas that keep each expert's replica at most ``cap[l]``, the
    slots left over spread by ``fill``; a row of ``-1`` where the cap needs more than ``num_slots``.

    The greedy counts make every replica about as heavy as the layer's mean replica; with few slots a
    rank (2 on wide EP) that leaves more heavy replicas than ranks, and ranks pair two of them (upstream
    then puts an expert twice on a rank). Capping the heavy experts' replicas near a rank's share and
    spending the spare slots on light replicas instead leaves every heavy replica a light companion.
    ``fill``: ``"light"``: one more replica of each expert, lightest expert first (small fillers);
    ``"single"``: the heaviest experts of one replica first (split in two), then the heaviest replicas.
    Rounds repeat while slots are left; an expert never exceeds ``max_per_expert``.

    Parameters:
        weight: float64 ``[L, E]``. num_slots: ``n * S``. cap: float64 ``[L]`` (> 0).
        max_per_expert: ``n`` (one replica a rank). fill: one of :data:`FILL_RULES`.

    Returns:
        int64 ``[L, E]`` summing to ``num_slots`` per feasible row.
    """
    E = weight.shape[1]
    c = np.clip(np.ceil(weight / cap[:, None]), 1, max_per_expert).astype(np.int64)
    left = num_slots - c.sum(1)
    if fill == "light":
        key = weight
    else:  # singletons (heaviest first) before the rest (heaviest replica first)
        key = np.where(c == 1, -weight, weight.max(1, keepdims=True) - weight / c)
    order = np.argsort(key, 1, kind="stable")
    pos = np.empty_like(order)
    np.put_along_axis(pos, order, np.broadcast_to(np.arange(E), order.shape), 1)
    spare = np.maximum(left, 0)[:, None]
    c = c + spare // E + (pos < spare % E)
    c[(left < 0) | (c > max_per_expert).any(1)] = -1
    return c



def lightest_sum(per: np.ndarray, k: int) -> np.ndarray:
    """float64 ``[L]``: the ``k`` smallest entries of each row of ``per`` ``[L, E]``, summed smallest first
    (a fixed order, so that the compiled path adds them the same way); ``0`` for ``k = 0``."""
    if k <= 0:
        return np.zeros(per.shape[0])
    return np.sort(np.partition(per, k - 1, axis=1)[:, :k], axis=1).sum(1)


def max_load_bound(weight: np.ndarray, counts: np.ndarray, num_ranks: int, slots_per_rank: int) -> np.ndarray:
    """float64 ``[L]``: a lower bound on the busiest rank's load of any placement with these ``counts``.

    The busiest rank carries at least the mean, and at least the heaviest replica plus the
    ``S - 1`` lightest replicas of the layer (the rank holding that replica fills its other slots).

    Parameters:
        weight: float64 ``[L, E]`` load per logical expert.
        counts: int64 ``[L, E]`` replicas per expert, summing to ``num_ranks * slots_per_rank``.
        num_ranks: live ranks ``n``.
        slots_per_rank: ``S``.

    Returns:
        float64 ``[L]``.
    """
    per = weight / counts
    mean = weight.sum(1) / num_ranks
    fill = 0.0
    if slots_per_rank > 1:
        k = min(slots_per_rank - 1, per.shape[1] - 1)
        fill = lightest_sum(per, k)
    return np.maximum(mean, per.max(1) + fill)


def greedy_busiest(weight: np.ndarray, num_ranks: int, slots_per_rank: int) -> np.ndarray:
    """float64 ``[L]``: the busiest rank's load of DeepSeek's greedy from-scratch placement on
    ``num_ranks`` ranks, i.e. of what upstream SGLang's EPLB (global policy on the live ranks) places
    for this load.

    Replicas: one per expert, then each further one to the expert whose replica is heaviest (no cap,
    as upstream). Packing: replicas heaviest first (by float32 value, as upstream sorts them; a stable
    order), each onto the least loaded rank with a free slot (ties: lower rank), loads added in that
    order. Upstream may so put two replicas of an expert on one rank, a weighted split our placements
    do not make (the algorithm then allows a layer its own from-scratch balance, see ``from_current``).

    Parameters:
        weight: float64 ``[L, E]`` load per logical expert. num_ranks: ``n``. slots_per_rank: ``S``
            (``n * S >= E``).

    Returns:
        float64 ``[L]``.
    """
    from .deepseek import replicate_experts

    L = weight.shape[0]
    n, S = num_ranks, slots_per_rank
    _, _, cnt = replicate_experts(weight, n * S)
    out = np.empty(L)
    for l in range(L):  # the reference path (numba compiles the same steps: jit_sums)
        per = np.repeat(weight[l] / cnt[l], cnt[l])
        per = per[np.argsort(per.astype(np.float32).view(np.uint32), kind="stable")[::-1]]
        load = np.zeros(n)
        left = np.full(n, S)
        for p in per:
            room = np.flatnonzero(left > 0)
            r = int(room[load[room].argmin()])
            load[r] += p
            left[r] -= 1
        out[l] = load.max()
    return out
