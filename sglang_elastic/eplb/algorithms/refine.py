"""Swap refinement: trade replicas between the busiest ranks and light ones while that helps."""
from __future__ import annotations

from typing import Optional, Tuple

import numpy as np

from .jit_kernels import MIN_GAIN
from .slots import SlotState

__all__ = ["best_swaps", "refine", "rewind"]


def best_swaps(st: SlotState, g: np.ndarray, load: np.ndarray, H: int, K: int, target: np.ndarray,
                orig_present: Optional[np.ndarray], under: bool = False,
                extra: int = 0) -> Tuple[np.ndarray, Tuple[np.ndarray, ...]]:
    """Best swap of each of the ``H`` busiest ranks with one of its ``K`` light ranks, in layers ``g``.

    Returns ``(busiest_found [G], (layers, heavy ranks, heavy slots, light ranks, light slots))``.
    Heavy rank ``j`` gets the light ranks ``j, j + H, j + 2H, ...`` in ascending load order, so
    the chosen swaps touch disjoint ranks and can all be applied at once. With ``under`` (one heavy
    rank), only light ranks under ``target`` take part (they are the lightest: ``K`` shrinks to them).

    ``extra`` (one heavy rank, with ``orig_present``, not ``under``): where the light ranks offer no
    swap that fetches nothing on balance, up to ``extra`` more partners may: the next ranks in
    ascending load order under ``target`` that hold a new slot (an expert fetched there, or empty).
    Such a partner gives a new slot's content for a new slot of the heavy rank, or for any slot where
    that content's expert was on the heavy rank before: a swap that fetches nothing on balance,
    re-routing replicas that move anyway where the light ranks would need a fetch.
    """
    S, G = st.S, g.size
    if under and H == 1:
        K = int(np.clip((load[g] < target[g][:, None]).sum(1).max(), 1, K))
    order = np.argsort(load[g], axis=1, kind="stable")  # stable: ties in a fixed order (refine_jit matches it)
    hi = order[:, ::-1][:, :H]  # [G, H]
    lo = order[:, : H * K].reshape(G, K, H).transpose(0, 2, 1)  # [G, H, K]
    n1, E1 = st.n, st.E + 1
    X = 0
    if extra > 0 and H == 1 and orig_present is not None and not under and st.n - 1 > K:
        # The ranks after the K lightest (the busiest excluded), under the target, with a new slot:
        # the first ``extra`` of them in load order (padding: the busiest rank itself, never valid).
        rest = order[:, K: st.n - 1]  # [G, n - 1 - K]
        x_rest = st.x[g[:, None], rest]
        new_slot = (orig_present.reshape(-1)[((g[:, None] * n1 + rest) * E1 + 1)[..., None] + x_rest] == 0).any(-1)
        ok = new_slot & (load[g[:, None], rest] < target[g][:, None])
        ok &= np.cumsum(ok, axis=1) <= extra
        X = min(extra, rest.shape[1])
        pick = np.argsort(~ok, axis=1, kind="stable")[:, :X]
        ext_ok = np.take_along_axis(ok, pick, 1)  # [G, X]
        ext = np.where(ext_ok, np.take_along_axis(rest, pick, 1), hi[:, :1])
        lo = np.concatenate([lo, ext[:, None, :]], axis=2)  # [G, 1, K + X]
    g2, g3, g4 = g[:, None], g[:, None, None], g[:, None, None, None]
    xa, xb = st.x[g2, hi], st.x[g3, lo]  # [G, H, S], [G, H, KX, S]
    hi3 = hi[:, :, None]
    # Flat gathers from the [L, n, E + 1] presence tables (cheaper than 3-axis fancy indexing).
    row_lo = (g3 * n1 + lo)[..., None] * E1 + 1  # [G, H, KX, 1]
    row_hi = (g2 * n1 + hi)[:, :, None] * E1 + 1  # [G, H, 1]
    ia_lo = row_lo + xa[:, :, None, :]  # a on the light rank [G, H, KX, S]
    ib_hi = row_hi[..., None] + xb  # b on the heavy rank [G, H, KX, S]
    va = st.present.reshape(-1)[ia_lo] == 0  # a may go to the light rank
    vb = st.present.reshape(-1)[ib_hi] == 0  # b may go to the heavy rank
    if st.node_of is not None:
        nh, nl = st.node_of[hi3][..., None], st.node_of[lo][..., None]
        va &= ~st.spread_loss_at(g4, xa[:, :, None, :], nh, nl)
        vb &= ~st.spread_loss_at(g4, xb, nl, nh)
    th = load[g2, hi]  # [G, H]
    gap = (th[:, :, None] - load[g3, lo]).astype(np.float32)[..., None, None]  # [G, H, KX, 1, 1]
    wa2 = 2 * st.per32[g3, xa][:, :, None, :, None]  # 2 * (wa - wb) == 2 * wa - 2 * wb exactly
    wb2 = 2 * st.per32[g4, xb][:, :, :, None, :]
    # For d = wa - wb the pair's new max minus th is (|gap - 2d| - gap) / 2: negative iff 0 < d < gap,
    # and comparable across light ranks, so one argmin picks the heavy rank's best swap.
    score = np.subtract(wa2, wb2)  # [G, H, KX, S, S]; in place from here (no page faults per step)
    np.subtract(gap, score, out=score)
    np.abs(score, out=score)
    np.subtract(score, gap, out=score)
    # Validity and the movement cost are folded into per-(light rank, slot) penalties on the small
    # [G, H, KX, S] arrays (inf = not allowed) and meet the [G, H, KX, S, S] scores in one addition.
    va &= (th > target[g][:, None])[:, :, None, None]
    if under:
        va &= (load[g3, lo] < target[g][:, None, None])[..., None]
    zero = np.float32(0)
    if orig_present is not None:
        op = orig_present.reshape(-1)
        fa = (op[ia_lo] == 0).astype(np.int8) - (op[row_hi + xa] == 0)[:, :, None, :]
        fb = (op[ib_hi] == 0).astype(np.int8) - (op[row_lo + xb] == 0)
        if X:
            va[:, :, K:] &= ext_ok[:, None, :, None]
            vb[:, :, K:] &= op[row_lo[:, :, K:] + xb[:, :, K:]] == 0  # an extra partner gives a new slot only
        # Experts fetched (minus those sent home) first, balance second: |score| < gap < step.
        # fa, fb are in {-1, 0, 1}: step * fa + step * fb == step * (fa + fb) exactly. One step per
        # layer (its largest gap), so that layers never interact (refine_jit runs them apart).
        step = 2 * gap.max((1, 2), keepdims=True)[..., 0] + 1  # float32 [G, 1, 1, 1]
        pa, pb = step * fa, step * fb
    else:
        pa = pb = zero
    pa = np.where(va, pa, np.float32(np.inf))
    pb = np.where(vb, pb, np.float32(np.inf))
    # A swap must lower the pair's max by more than float32 rounding can fake: where both ranks hold
    # a replica of the same expert, giving away the other slot's expert for the partner's is only a
    # relabelling (with 2 slots a rank, every such swap), and a score a few ulps below 0 made it win
    # back and forth until the swap budget ran out (DS-V3 on EP256x2: no layer reached its target).
    useless = score >= -(th * MIN_GAIN).astype(np.float32)[:, :, None, None, None]
    pen = pa[..., None] + pb[..., None, :]
    np.add(score, pen, out=score)
    np.putmask(score, useless, np.float32(np.inf))
    if X:
        # Extra partners only where the light ranks' best swap fetches something (or there is none),
        # and only for a new slot of the heavy rank, or any slot where their new slot's expert was on
        # the heavy rank before (fb == -1): such swaps fetch nothing on balance.
        near = score[:, :, :K].reshape(G, H, -1)
        nb = near.argmin(2)
        nb_pen = np.take_along_axis(pen[:, :, :K].reshape(G, H, -1), nb[..., None], 2)[..., 0]
        nb_found = np.take_along_axis(near, nb[..., None], 2)[..., 0] < np.inf
        away = (op[row_hi + xa] == 0)[:, :, None, :, None]  # [G, H, 1, S, 1]
        allowed = away | (fb[:, :, K:] == -1)[:, :, :, None, :]
        skip = (nb_found & (nb_pen <= 0))[:, :, None, None, None] | ~allowed
        score[:, :, K:] = np.where(skip, np.float32(np.inf), score[:, :, K:])
    score = score.reshape(G, H, -1)
    best = score.argmin(2)  # [G, H]
    found = np.take_along_axis(score, best[..., None], 2)[..., 0] < np.inf
    gi, hj = np.nonzero(found)
    b = best[gi, hj]
    return found[:, 0], (g[gi], hi[gi, hj], (b % (S * S)) // S, lo[gi, hj, b // (S * S)], b % S)


def refine(st: SlotState, max_iters: int, target: np.ndarray,
            orig_present: Optional[np.ndarray] = None, heavy: int = 4, light: int = 2,
            widen: bool = True, trace: Optional[list] = None, wide_search: bool = False, extra: int = 0) -> None:
    """Swap replicas from the busiest live ranks to the least busy ones while that helps.

    Each iteration, in every layer whose busiest rank is above ``target``, each of the ``heavy``
    busiest ranks (above ``target``) looks at its own ``light`` light ranks and makes the swap that
    brings the pair closest to their mean (:func:`best_swaps`). A layer whose busiest rank finds no
    such swap widens its search to every rank under ``target`` (if ``widen``); if that fails too, or
    the layer reached ``target``, it stops. With ``orig_present`` (``[L, n, E+1]``: expert was on that rank before) a swap that
    fetches fewer new experts wins over a better-balancing one (experts sent back home count
    negative), so rebalancing from a live placement moves little.

    With ``trace`` (a list, and ``orig_present``), every step appends ``(its swaps, busiest rank load
    [L], experts fetched so far [L])``, the start first (no swaps), so a caller can stop each layer at
    any step afterwards with :func:`rewind` (layers never interact).

    ``wide_search``: the busiest rank looks at every rank under ``target`` from the start
    (``light`` is ignored). With ``orig_present`` that finds more swaps that re-route already moved
    replicas for free: 0-22 % fewer transfers than with ``extra`` after a failure on the bench's loads.

    ``extra``: the narrow search's extra partners (:func:`best_swaps`; one heavy rank, ``orig_present``).
    """
    L, n = st.L, st.n
    load = st.loads()
    if trace is not None:
        fetched = ((orig_present[st.rows[:, None, None], np.arange(n)[None, :, None], st.x + 1] == 0)
                   & (st.x >= 0)).sum((1, 2))
        trace.append(([], load.max(1), fetched.copy()))
    if n < 2:
        return
    if st.node_of is not None:
        heavy = 1  # concurrent swaps could each take an expert's last replica off a node
    if wide_search:
        heavy, light = 1, n - 1
    H = max(1, min(heavy, n // (light + 1)))
    K = max(1, min(light, (n - H) // H))
    active = load.max(1) > target
    wide = np.zeros(L, dtype=bool)
    for _ in range(max_iters):
        g_all = np.flatnonzero(active)
        if g_all.size == 0:
            return
        moves = []
        for g, h, k, narrow in ((g_all[~wide[g_all]], H, K, True), (g_all[wide[g_all]], 1, n - 1, False)):
            if g.size == 0:
                continue
            # The widened search looks at every rank under the target: one above it cannot take load
            # without ending above it too (on zipf 1.2 that search ran every layer to the swap cap).
            found, swaps = best_swaps(st, g, load, h, k, target, orig_present, under=wide_search or not narrow,
                                      extra=extra if narrow and not wide_search else 0)
            if narrow and widen:
                wide[g[~found]] = True
            else:  # the busiest rank cannot improve: other swaps cannot lower this layer's max
                active[g[~found]] = False
            moves.append(swaps)
        for gg, r_hi, sa, r_lo, sb in moves:
            if gg.size == 0:
                continue
            e1, e2 = st.x[gg, r_hi, sa], st.x[gg, r_lo, sb]
            dl = st.per[gg, e1] - st.per[gg, e2]
            if trace is not None:  # experts fetched: what arrives where it was not, minus what leaves
                op = orig_present
                fetched[gg] += ((op[gg, r_hi, e2 + 1] == 0).astype(np.int64) + (op[gg, r_lo, e1 + 1] == 0)
                                - (op[gg, r_hi, e1 + 1] == 0) - (op[gg, r_lo, e2 + 1] == 0))
            st.swap(gg, r_hi, sa, r_lo, sb)
            # Each (layer, rank) takes part in at most one swap per step: plain indexing adds exactly.
            load[gg, r_hi] -= dl
            load[gg, r_lo] += dl
        active &= load.max(1) > target
        if trace is not None:
            trace.append((moves, load.max(1), fetched.copy()))


def rewind(x: np.ndarray, trace: list, stop: np.ndarray) -> None:
    """Undo, in ``x`` (``[L, n, S]``, the state after the last step of ``trace``), every swap of layer
    ``l`` made after its step ``stop[l]`` (``0``: before the first swap), latest first."""
    for t in range(len(trace) - 1, 0, -1):
        for gg, r_hi, sa, r_lo, sb in trace[t][0]:
            undo = stop[gg] < t
            if undo.any():
                l, r1, s1, r2, s2 = gg[undo], r_hi[undo], sa[undo], r_lo[undo], sb[undo]
                x[l, r1, s1], x[l, r2, s2] = x[l, r2, s2], x[l, r1, s1].copy()

