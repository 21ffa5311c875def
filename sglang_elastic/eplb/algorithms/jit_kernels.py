"""The numba kernels of the movement-aware repair and swap refinement (:mod:`.jit_sums`: the others).

A kernel here only calls kernels of this module: numba's on-disk cache (``cache=True``) notices edits
to the file that defines a kernel, not to kernels it calls from other files, so a kernel calling
another module's kernel could keep running stale code after an edit. :mod:`.refine_jit` and
:mod:`.repair_jit` are the Python wrappers (threads, arrays, traces).

Each kernel makes exactly the decisions of its numpy reference (same float operations in the same
order, same first-minimum tie-breaking, same stable orders); ``test/test_eplb_jit.py`` compares the
placements. Rank loads are summed the way numpy's ``sum(-1)`` does (:func:`_rank_sum`), so that every
float the refinement starts from is the reference's.
"""
from __future__ import annotations

import numpy as np

try:  # numba is optional: without it the numpy reference runs (same placements, ~10x slower)
    from numba import njit
    AVAILABLE = True
except ImportError:  # pragma: no cover - exercised only where numba is absent
    AVAILABLE = False

__all__ = ["AVAILABLE", "MIN_GAIN"]

# A swap counts only if it lowers the pair's busier rank by more than this fraction of the heavy
# rank's load (half of it, as the scores are doubled): a score's float32 rounding is at most ~5.4e-7
# of that load (9 roundings of values up to twice it), and a looser bound (2^-16) kept periodic
# rebalances on ranks of 130+ slots a few 1e-6 short of upstream's balance.
MIN_GAIN = 2.0 ** -20

if AVAILABLE:
    @njit(cache=True, nogil=True, inline="always")
    def _spread_loss(node_cnt, l, e, frm, to):
        return frm != to and node_cnt[l, e + 1, frm] == 1 and node_cnt[l, e + 1, to] > 0

    @njit(cache=True, nogil=True, inline="always")
    def _val(xr, per_l, i):
        return per_l[xr[i]] if xr[i] >= 0 else 0.0

    @njit(cache=True, nogil=True, inline="always")
    def _swap_slots(l, x, present, node_cnt, node_of, has_nodes, r1, s1, r2, s2):
        """Exchange slots ``(r1, s1)`` and ``(r2, s2)`` of layer ``l`` (``r1 != r2``), keeping the
        presence table and node counts in step (:meth:`..slots.SlotState.swap`)."""
        S = x.shape[2]
        e1, e2 = x[l, r1, s1], x[l, r2, s2]
        x[l, r1, s1] = -1
        x[l, r2, s2] = -1
        present[l, r1, e1 + 1] = 0
        present[l, r2, e2 + 1] = 0
        for s in range(S):  # a rank may hold a second copy (a conflict not yet fixed)
            if x[l, r1, s] == e1:
                present[l, r1, e1 + 1] = 1
            if x[l, r2, s] == e2:
                present[l, r2, e2 + 1] = 1
        x[l, r1, s1] = e2
        x[l, r2, s2] = e1
        present[l, r1, e2 + 1] = 1
        present[l, r2, e1 + 1] = 1
        if has_nodes:
            m1, m2 = node_of[r1], node_of[r2]
            node_cnt[l, e1 + 1, m1] -= 1
            node_cnt[l, e2 + 1, m2] -= 1
            node_cnt[l, e2 + 1, m1] += 1
            node_cnt[l, e1 + 1, m2] += 1

    @njit(cache=True, nogil=True, inline="always")
    def _order_by_load(order, ld):
        """Ranks by (load, id), as the references' stable argsort: insertion sort from the last step's
        order, which a step's swaps only perturb."""
        for i in range(1, order.size):
            c = order[i]
            v = ld[c]
            j = i - 1
            while j >= 0 and (ld[order[j]] > v or (ld[order[j]] == v and order[j] > c)):
                order[j + 1] = order[j]
                j -= 1
            order[j + 1] = c

    @njit(cache=True, nogil=True)
    def _rank_sum(xr, per_l):
        """``np.where(x >= 0, per[x], 0.0).sum(-1)`` for one rank, bit for bit: numpy adds a row of
        at most 128 values in one block (:func:`_block_sum`), a longer one in halves (:func:`_long_sum`)."""
        S = xr.size
        return _block_sum(xr, per_l, 0, S) if S <= 128 else _long_sum(xr, per_l)

    @njit(cache=True, nogil=True)
    def _block_sum(xr, per_l, lo, n):
        """The values of slots ``lo:lo + n`` (``n <= 128``) of rank ``xr`` summed as numpy adds them:
        0 + (8 interleaved partial sums combined pairwise, then the rest)."""
        if n < 8:
            res = 0.0
            for i in range(lo, lo + n):
                res += _val(xr, per_l, i)
            return 0.0 + res
        r0, r1 = _val(xr, per_l, lo), _val(xr, per_l, lo + 1)
        r2, r3 = _val(xr, per_l, lo + 2), _val(xr, per_l, lo + 3)
        r4, r5 = _val(xr, per_l, lo + 4), _val(xr, per_l, lo + 5)
        r6, r7 = _val(xr, per_l, lo + 6), _val(xr, per_l, lo + 7)
        i = lo + 8
        end = lo + n - (n % 8)
        while i < end:
            r0 += _val(xr, per_l, i)
            r1 += _val(xr, per_l, i + 1)
            r2 += _val(xr, per_l, i + 2)
            r3 += _val(xr, per_l, i + 3)
            r4 += _val(xr, per_l, i + 4)
            r5 += _val(xr, per_l, i + 5)
            r6 += _val(xr, per_l, i + 6)
            r7 += _val(xr, per_l, i + 7)
            i += 8
        res = ((r0 + r1) + (r2 + r3)) + ((r4 + r5) + (r6 + r7))
        while i < lo + n:
            res += _val(xr, per_l, i)
            i += 1
        return 0.0 + res

    @njit(cache=True, nogil=True)
    def _long_sum(xr, per_l):
        """:func:`_rank_sum` of more than 128 slots as numpy adds them: split at half rounded down to
        a multiple of 8, the halves summed alike and added (numpy's recursion on an explicit stack:
        numba's cache cannot hold a self-recursive kernel). :func:`.jit_sums._sum_pairwise` does the
        same over a plain array; a kernel calls only kernels of its own file (module docstring)."""
        los = np.empty(64, np.int64)
        ns = np.empty(64, np.int64)
        stage = np.empty(64, np.int64)
        left = np.empty(64)
        top = 0
        los[0], ns[0], stage[0] = 0, xr.size, 0
        ret = 0.0
        while top >= 0:
            lo, m = los[top], ns[top]
            if m <= 128:
                ret = _block_sum(xr, per_l, lo, m)  # its 0.0 + x == x for x >= 0
                top -= 1
                continue
            m2 = m // 2
            m2 -= m2 % 8
            if stage[top] == 0:
                stage[top] = 1
                top += 1
                los[top], ns[top], stage[top] = lo, m2, 0
            elif stage[top] == 1:
                left[top] = ret
                stage[top] = 2
                top += 1
                los[top], ns[top], stage[top] = lo + m2, m - m2, 0
            else:
                ret = left[top] + ret
                top -= 1
        return 0.0 + ret

    @njit(cache=True, nogil=True)
    def _layer(l, x, present, node_cnt, node_of, has_nodes, per, per32, ld, target, orig, max_iters,
               k_narrow, k_extra, wide_search, maxes, fetched, swaps):
        """:func:`.refine.refine` for layer ``l`` (one heavy rank, ``k_narrow`` light ones, up to ``k_extra``
        extra ones), traced."""
        n, S = x.shape[1], x.shape[2]
        E = per.shape[1]
        inf = np.float32(np.inf)
        f = 0  # experts fetched: filled slots whose expert was not on that rank before
        # Per rank, its new slots (an expert fetched there, or empty), ascending: the extra partners' offer.
        loose = np.zeros(n, np.int64)
        nl = np.empty((n, S), np.int64)
        for r in range(n):
            for s in range(S):
                if orig[l, r, x[l, r, s] + 1] == 0:
                    nl[r, loose[r]] = s
                    loose[r] += 1
                    f += x[l, r, s] >= 0
        maxes[l, 0] = ld.max()
        fetched[l, 0] = f
        if n < 2:
            return 0
        tgt = target[l]
        active = ld.max() > tgt
        wide = False
        order = np.arange(n)
        cand = np.empty(n, np.int64)
        sel = np.empty(S, np.int64)
        fbs = np.empty(S, np.int8)
        away_idx = np.empty(S, np.int64)
        pa = np.empty(S, np.float32)
        pb = np.empty(S, np.float32)
        wa2 = np.empty(S, np.float32)
        wb2 = np.empty(S, np.float32)
        val = np.empty(S, np.float32)
        away = np.empty(S, np.int8)  # the heavy rank's slot held its expert before (it may go home)
        xl, pres, og, p32 = x[l], present[l], orig[l], per32[l]
        t = 0
        while active and t < max_iters:
            _order_by_load(order, ld)
            hi = order[n - 1]
            th = ld[hi]
            eps = np.float32(th * MIN_GAIN)  # a swap must gain more (refine.best_swaps)
            K = n - 1 if wide else k_narrow
            under = wide_search or wide  # the widened search: every rank under the target
            step = np.float32(2) * np.float32(th - ld[order[0]]) + np.float32(1)
            best = inf
            best_pen = inf
            bk = -1
            bsa = -1
            bsb = -1
            n_away = 0
            for s in range(S):
                ea = xl[hi, s]
                wa2[s] = np.float32(2) * p32[ea if ea >= 0 else E + ea]
                away[s] = np.int8(og[hi, ea + 1] == 0)
                if away[s] == 1:
                    away_idx[n_away] = s
                    n_away += 1
            nc = K
            for k in range(K):
                cand[k] = order[k]
            if not under:  # then the next ranks under the target that hold a new slot
                k = K
                while k < n - 1 and nc < K + k_extra and ld[order[k]] < tgt:
                    if loose[order[k]] > 0:
                        cand[nc] = order[k]
                        nc += 1
                    k += 1
            for k in range(nc):
                r = cand[k]
                if k == K and best_pen <= 0:
                    break  # the extra partners are there for free swaps: the light ranks gave one
                gap = np.float32(th - ld[r])
                if under and not ld[r] < tgt:
                    break  # ranks come lightest first: none after this one is under the target either
                if not th > tgt:
                    break
                if k >= K:
                    # An extra partner gives one of its new slots (an expert fetched there, or empty) for a
                    # new slot of the heavy rank, or, where that expert was on the heavy rank before, for
                    # any slot: such a swap fetches nothing on balance.
                    nb = 0
                    home = False
                    for j in range(loose[r]):
                        s = nl[r, j]
                        eb = xl[r, s]
                        vb = pres[hi, eb + 1] == 0
                        if vb and has_nodes:
                            vb = not _spread_loss(node_cnt, l, eb, node_of[r], node_of[hi])
                        if vb:
                            sel[nb] = s
                            fbs[nb] = np.int8(og[hi, eb + 1] == 0) - np.int8(1)
                            home = home or fbs[nb] < 0
                            nb += 1
                    for ia in range(0 if nb == 0 else (S if home else n_away)):
                        sa = ia if home else away_idx[ia]
                        ea = xl[hi, sa]
                        va = pres[r, ea + 1] == 0
                        if va and has_nodes:
                            va = not _spread_loss(node_cnt, l, ea, node_of[hi], node_of[r])
                        if not va:
                            continue
                        pas = step * np.float32(np.int8(og[r, ea + 1] == 0) - away[sa])
                        for i in range(nb):
                            if away[sa] == 0 and fbs[i] == 0:
                                continue
                            sb = sel[i]
                            eb = xl[r, sb]
                            pbs = step * np.float32(fbs[i])
                            sc = abs(gap - (wa2[sa] - np.float32(2) * p32[eb if eb >= 0 else E + eb])) - gap
                            if sc < -eps and sc + (pas + pbs) < best:
                                best, best_pen, bk, bsa, bsb = sc + (pas + pbs), pas + pbs, r, sa, sb
                    continue
                pa_min = inf
                for s in range(S):
                    ea = xl[hi, s]
                    va = pres[r, ea + 1] == 0
                    if va and has_nodes:
                        va = not _spread_loss(node_cnt, l, ea, node_of[hi], node_of[r])
                    fa = np.int8(og[r, ea + 1] == 0) - away[s]
                    pa[s] = step * np.float32(fa) if va else inf
                    pa_min = min(pa_min, pa[s])
                # Every pair with this rank has pen >= pa_min - step (fb >= -1; fb >= 0 without a new slot
                # here): skip the rank when that is a higher class than the best so far (or no slot of the
                # heavy rank may come here), or when even the best balance term (> -gap) cannot win.
                pb_lb = -step if loose[r] > 0 else np.float32(0)
                if pa_min == inf or pa_min - step > best_pen or -gap + (pa_min + pb_lb) >= best:
                    continue
                wb_min = inf
                for s in range(S):
                    eb = xl[r, s]
                    wb2[s] = np.float32(2) * p32[eb if eb >= 0 else E + eb]
                    vb = pres[hi, eb + 1] == 0
                    if vb and has_nodes:
                        vb = not _spread_loss(node_cnt, l, eb, node_of[r], node_of[hi])
                    fb = np.int8(og[hi, eb + 1] == 0) - np.int8(og[r, eb + 1] == 0)
                    pb[s] = step * np.float32(fb) if vb else inf
                    if pb[s] < inf:
                        wb_min = min(wb_min, wb2[s])
                # A pair's score is its penalty class pen = step * (fa + fb) (exact in float32) plus a
                # balance term in (-gap, 0), |gap| < step / 2: a pair of a higher class than the best so
                # far scores strictly more even after rounding, so it is skipped unevaluated (same argmin).
                # A row's scores are computed without branches (inf: useless or not allowed), then
                # scanned; higher-class pairs of a row that is kept lose to the best anyway.
                pb_min = pb.min()
                # sc >= -gap (rounding is monotone): no pair with this rank can beat the best so far.
                if -gap + (pa_min + pb_min) >= best:
                    continue
                for sa in range(S):
                    if pa[sa] == inf or pa[sa] + pb_min > best_pen:
                        continue
                    pas, was = pa[sa], wa2[sa]
                    # The row's best balance term: its largest d = wa - wb is was - wb_min; below gap, every
                    # d is, and the term is at least (gap - d_max) - gap (rounding is monotone).
                    d_max = was - wb_min
                    lb_sc = (gap - d_max) - gap if d_max <= gap else -gap
                    if lb_sc >= -eps or lb_sc + (pas + pb_min) >= best:
                        continue
                    for sb in range(S):
                        sc = abs(gap - (was - wb2[sb])) - gap
                        val[sb] = sc + (pas + pb[sb]) if sc < -eps else inf
                    for sb in range(S):
                        if val[sb] < best:
                            best, best_pen, bk, bsa, bsb = val[sb], pas + pb[sb], r, sa, sb
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
                _swap_slots(l, x, present, node_cnt, node_of, has_nodes, hi, bsa, bk, bsb)
                ld[hi] -= dl
                ld[bk] += dl
                for u, su, eo, en in ((hi, bsa, e1, e2), (bk, bsb, e2, e1)):  # the new-slot lists, sorted
                    was, now = orig[l, u, eo + 1] == 0, orig[l, u, en + 1] == 0
                    if was and not now:
                        j = 0
                        while nl[u, j] != su:
                            j += 1
                        for i in range(j, loose[u] - 1):
                            nl[u, i] = nl[u, i + 1]
                        loose[u] -= 1
                    elif now and not was:
                        j = loose[u]
                        while j > 0 and nl[u, j - 1] > su:
                            nl[u, j] = nl[u, j - 1]
                            j -= 1
                        nl[u, j] = su
                        loose[u] += 1
                swaps[l, t, 0], swaps[l, t, 1], swaps[l, t, 2], swaps[l, t, 3] = hi, bsa, bk, bsb
            mx = ld.max()
            active = active and mx > tgt
            t += 1
            maxes[l, t] = mx
            fetched[l, t] = f
        return t

    @njit(cache=True, nogil=True)
    def _refine_all(layers, x, present, node_cnt, node_of, has_nodes, per, per32, load, target, orig, max_iters,
                    k_narrow, k_extra, wide_search, maxes, fetched, swaps, nsteps):
        for i in range(layers.size):
            l = layers[i]
            nsteps[l] = _layer(l, x, present, node_cnt, node_of, has_nodes, per, per32, load[l], target, orig,
                               max_iters, k_narrow, k_extra, wide_search, maxes, fetched, swaps)

    @njit(cache=True, nogil=True)
    def _scratch_layer(l, x, present, node_cnt, node_of, has_nodes, per, per32, ld, target, max_iters, H, K):
        """:func:`.refine.refine` of a from-scratch placement (no ``orig_present``, ``widen=False``) for
        layer ``l``: each step, each of the ``H`` busiest ranks above the target makes its best swap with
        one of its ``K`` light ranks (heavy rank ``j`` gets the ``j``-th, ``j + H``-th, ... lightest), all
        at once; the layer stops when its busiest rank finds none or reaches the target."""
        n, S = x.shape[1], x.shape[2]
        E = per.shape[1]
        if n < 2:
            return
        inf = np.float32(np.inf)
        two = np.float32(2)
        tgt = target[l]
        active = ld.max() > tgt
        order = np.arange(n)
        wa2 = np.empty(S, np.float32)
        bk = np.empty(H, np.int64)
        bsa = np.empty(H, np.int64)
        bsb = np.empty(H, np.int64)
        xl, pres, p32 = x[l], present[l], per32[l]
        t = 0
        while active and t < max_iters:
            _order_by_load(order, ld)
            for j in range(H):
                bk[j] = -1
                hi = order[n - 1 - j]
                th = ld[hi]
                if not th > tgt:
                    continue
                eps = np.float32(th * MIN_GAIN)
                for s in range(S):
                    ea = xl[hi, s]
                    wa2[s] = two * p32[ea if ea >= 0 else E + ea]
                best = inf
                for k in range(K):
                    r = order[k * H + j]
                    gap = np.float32(th - ld[r])
                    for sa in range(S):
                        ea = xl[hi, sa]
                        if pres[r, ea + 1] != 0:
                            continue
                        if has_nodes and _spread_loss(node_cnt, l, ea, node_of[hi], node_of[r]):
                            continue
                        for sb in range(S):
                            eb = xl[r, sb]
                            if pres[hi, eb + 1] != 0:
                                continue
                            if has_nodes and _spread_loss(node_cnt, l, eb, node_of[r], node_of[hi]):
                                continue
                            sc = abs(gap - (wa2[sa] - two * p32[eb if eb >= 0 else E + eb])) - gap
                            if sc < -eps and sc < best:
                                best, bk[j], bsa[j], bsb[j] = sc, r, sa, sb
            for j in range(H):  # disjoint ranks: the swaps commute
                if bk[j] < 0:
                    continue
                hi, lo, sa, sb = order[n - 1 - j], bk[j], bsa[j], bsb[j]
                e1, e2 = xl[hi, sa], xl[lo, sb]
                dl = per[l, e1 if e1 >= 0 else E + e1] - per[l, e2 if e2 >= 0 else E + e2]
                _swap_slots(l, x, present, node_cnt, node_of, has_nodes, hi, sa, lo, sb)
                ld[hi] -= dl
                ld[lo] += dl
            active = bk[0] >= 0 and ld.max() > tgt
            t += 1

    @njit(cache=True, nogil=True)
    def _scratch_all(layers, x, present, node_cnt, node_of, has_nodes, per, per32, load, target, max_iters, H, K):
        for i in range(layers.size):
            l = layers[i]
            _scratch_layer(l, x, present, node_cnt, node_of, has_nodes, per, per32, load[l], target, max_iters, H, K)

    @njit(cache=True, nogil=True)
    def _conflicts_layer(l, x, present, node_cnt, node_of, has_nodes, per, max_iters, big):
        """:func:`.conflicts.fix_conflicts` for layer ``l``: the same conflicts in the same order (rank
        duplicates first, then node conflicts, each by slot), the same least-disturbing swaps."""
        n, S = x.shape[1], x.shape[2]
        M = node_cnt.shape[2]
        xl, pres = x[l], present[l]
        todo = np.empty(n * S, np.int64)
        nt = 0
        for p in (2, 1):  # the reference's stable order by descending priority
            for r in range(n):
                for s in range(S):
                    e = xl[r, s]
                    if e < 0:
                        continue
                    dup = False
                    for s2 in range(s):
                        if xl[r, s2] == e:
                            dup = True
                    node_bad = False
                    if has_nodes and node_cnt[l, e + 1, node_of[r]] > 1:
                        for m in range(M):
                            if node_cnt[l, e + 1, m] == 0:
                                node_bad = True
                    if (np.int64(dup or node_bad) + np.int64(dup)) == p:
                        todo[nt] = r * S + s
                        nt += 1
        for j in range(min(max_iters, nt)):
            r1, s1 = todo[j] // S, todo[j] % S
            e1 = xl[r1, s1]
            copies = 0
            for s in range(S):
                copies += xl[r1, s] == e1
            is_dup = copies > 1
            still = is_dup
            if has_nodes and not still and node_cnt[l, e1 + 1, node_of[r1]] > 1:
                for m in range(M):
                    if node_cnt[l, e1 + 1, m] == 0:
                        still = True
            if not still:
                continue
            best = np.inf
            br, bs = -1, -1
            for r2 in range(n):
                if r2 == r1 or pres[r2, e1 + 1] != 0:
                    continue
                for s2 in range(S):
                    e2 = xl[r2, s2]
                    if e2 < 0 or e2 == e1 or pres[r1, e2 + 1] != 0:
                        continue
                    cost = abs(per[l, e2] - per[l, e1])
                    if has_nodes:
                        n1, n2 = node_of[r1], node_of[r2]
                        to_lacking = n1 != n2 and node_cnt[l, e1 + 1, n2] == 0
                        e2_lacking = False
                        for m in range(M):
                            if node_cnt[l, e2 + 1, m] == 0:
                                e2_lacking = True
                        keeps_e2 = not _spread_loss(node_cnt, l, e2, n2, n1) and not (
                            node_cnt[l, e2 + 1, n1] > 0 and n1 != n2 and e2_lacking)
                        if not (is_dup or (to_lacking and keeps_e2)):
                            continue
                        cost = (cost + (0.0 if keeps_e2 else 2 * big)) + (0.0 if to_lacking else big)
                    if cost < best:
                        best, br, bs = cost, r2, s2
            if br < 0:
                continue
            _swap_slots(l, x, present, node_cnt, node_of, has_nodes, r1, s1, br, bs)

    @njit(cache=True, nogil=True)
    def _conflicts_all(layers, x, present, node_cnt, node_of, has_nodes, per, max_iters, big):
        for i in range(layers.size):
            _conflicts_layer(layers[i], x, present, node_cnt, node_of, has_nodes, per, max_iters, big)

    @njit(cache=True, nogil=True)
    def _assign_layer(l, per, counts, x):
        """:func:`.packing.scratch_assign` for layer ``l`` into ``x[l]``: the same rounds, merges (the
        two partials that spread most; ties to the first) and stable orders."""
        n, S = x.shape[1], x.shape[2]
        E = per.shape[1]
        p = per[l]
        order = np.argsort(-p, kind="mergesort")  # stable, as the reference
        items = np.empty(n * S, np.int64)
        k = 0
        for i in range(E):
            e = order[i]
            for _ in range(counts[l, e]):
                items[k] = e
                k += 1
        sums = np.empty((S, n))
        spread = np.empty(S)
        for q in range(S):
            for j in range(n):
                sums[q, j] = p[items[q * n + j]]
            spread[q] = sums[q].max() - sums[q].min()
        ha = np.empty(max(S - 1, 0), np.int64)
        hb = np.empty(max(S - 1, 0), np.int64)
        hpa = np.empty((max(S - 1, 0), n), np.int64)
        hpb = np.empty((max(S - 1, 0), n), np.int64)
        for t in range(S - 1):
            a = np.argmax(spread)
            spread[a] = -np.inf
            b = np.argmax(spread)
            pa = np.argsort(sums[a], kind="mergesort")  # lightest rank of a first ...
            pb = np.argsort(sums[b], kind="mergesort")[::-1]  # ... meets the heaviest of b
            merged = sums[a][pa] + sums[b][pb]
            sums[a] = merged
            spread[a] = merged.max() - merged.min()
            spread[b] = -np.inf
            ha[t], hb[t] = a, b
            hpa[t] = pa
            hpb[t] = pb
        rank = np.empty((S, n), np.int64)
        rank[np.argmax(spread)] = np.arange(n)
        for t in range(S - 2, -1, -1):
            after = rank[ha[t]].copy()
            for j in range(n):
                rank[ha[t], hpa[t, j]] = after[j]
                rank[hb[t], hpb[t, j]] = after[j]
        for q in range(S):
            for j in range(n):
                x[l, rank[q, j], q] = items[q * n + j]

    @njit(cache=True, nogil=True)
    def _assign_all(layers, per, counts, x):
        for i in range(layers.size):
            _assign_layer(layers[i], per, counts, x)

    @njit(cache=True, nogil=True)
    def _lpt_layer(i, per, counts, x):
        """:func:`.packing.lpt_assign_reference` for row ``i`` into ``x[i]``: replicas heaviest first
        (stable), each to the lightest rank with a free slot (ties: lower rank), slots filled in order."""
        n, S = x.shape[1], x.shape[2]
        E = per.shape[1]
        p = per[i]
        order = np.argsort(-p, kind="mergesort")
        load = np.zeros(n)
        fill = np.zeros(n, np.int64)
        k = 0
        for a in range(E):
            e = order[a]
            for _ in range(counts[i, e]):
                if S == 1:  # one item per pack: item k -> pack k (balanced_packing's shortcut)
                    x[i, k, 0] = e
                else:
                    r = np.argmin(load)
                    x[i, r, fill[r]] = e
                    load[r] += p[e]
                    fill[r] += 1
                    if fill[r] == S:
                        load[r] = np.inf
                k += 1

    @njit(cache=True, nogil=True)
    def _lpt_all(rows, per, counts, x):
        for j in range(rows.size):
            _lpt_layer(rows[j], per, counts, x)

    @njit(cache=True, nogil=True)
    def _rewind_all(x, swaps, nsteps, stop):
        for l in range(x.shape[0]):
            for t in range(nsteps[l] - 1, stop[l] - 1, -1):  # the swap of step t + 1, latest first
                r1, s1, r2, s2 = swaps[l, t, 0], swaps[l, t, 1], swaps[l, t, 2], swaps[l, t, 3]
                if r1 >= 0:
                    x[l, r1, s1], x[l, r2, s2] = x[l, r2, s2], x[l, r1, s1]

    # ----------------------------------------------------------------- the repair, one layer at a time

    @njit(cache=True, nogil=True)
    def _argmin_loss(loss, multi, m, skip):
        """np.argmin(loss) with ``loss[skip]`` taken as ``big``: only experts with two or more replicas
        (``multi[:m]``) have a loss below ``big``; with none, every entry is ``big`` and the first wins."""
        best = -1
        for i in range(m):
            e = multi[i]
            if e == skip:
                continue
            if best < 0 or loss[e] < loss[best] or (loss[e] == loss[best] and e < best):
                best = e
        return 0 if best < 0 else best

    @njit(cache=True, nogil=True)
    def _set_count(w, cl, gain, loss, multi, m, e, d, cap, big):
        """``cl[e] += d`` with its gain, loss and the ``multi`` list kept in step; returns the new length."""
        cl[e] += d
        c = cl[e]
        gain[e] = w[e] / c if c < cap else -1.0
        loss[e] = w[e] / max(c - 1, 1) if c > 1 else big
        if d > 0 and c == 2:
            multi[m] = e
            m += 1
        elif d < 0 and c == 1:
            for i in range(m):
                if multi[i] == e:
                    multi[i] = multi[m - 1]
                    m -= 1
                    break
        return m

    @njit(cache=True, nogil=True)
    def _counts_layer(w, cl, num_slots, cap, bound, big, gain, loss, multi):
        """:func:`.counts.replica_counts` with ``start`` (in ``cl``, clipped) and ``bound``, one layer.
        ``multi``: int64 scratch ``[E]``."""
        E = w.size
        m = 0
        for e in range(E):  # x / 1 == x exactly: most experts have one replica, skip their divisions
            c = cl[e]
            gain[e] = (w[e] if c == 1 else w[e] / c) if c < cap else -1.0
            loss[e] = (w[e] if c == 2 else w[e] / (c - 1)) if c > 1 else big
            if c > 1:
                multi[m] = e
                m += 1
        diff = cl.sum() - num_slots
        while diff != 0:
            if diff < 0:
                m = _set_count(w, cl, gain, loss, multi, m, np.argmax(gain), 1, cap, big)
                diff += 1
            else:
                m = _set_count(w, cl, gain, loss, multi, m, _argmin_loss(loss, multi, m, -1), -1, cap, big)
                diff -= 1
        for _ in range(E):
            hot = np.argmax(gain)
            hot_load = gain[hot]
            cold = _argmin_loss(loss, multi, m, hot)
            cold_load = loss[cold] if cold != hot else big
            if not (hot_load > bound * (1 + 1e-12) and cold_load < hot_load):
                break
            m = _set_count(w, cl, gain, loss, multi, m, hot, 1, cap, big)
            m = _set_count(w, cl, gain, loss, multi, m, cold, -1, cap, big)

    @njit(cache=True, nogil=True)
    def _drop_layer(xl, cl, per_l, rank_load, have, pos, key):
        """:func:`.repair.drop_surplus` for one layer: an expert's surplus replicas leave its busiest
        ranks first (ties: lowest slot first). ``have``: ``E + 1`` scratch; ``pos``, ``key``: ``n * S``."""
        n, S = xl.shape
        E = cl.size
        for r in range(n):
            rank_load[r] = _rank_sum(xl[r], per_l)
        have[:] = 0
        for r in range(n):
            for s in range(S):
                if xl[r, s] >= 0:
                    have[xl[r, s] + 1] += 1
        # Bucket the slots of experts with a surplus by expert (slot order), have[e + 1] -> bucket start.
        m = 0
        for e in range(E):
            c = have[e + 1]
            have[e + 1] = m if c > cl[e] else -1
            if c > cl[e]:
                m += c
        have[0] = m
        for r in range(n):
            k = rank_load[r]
            for s in range(S):
                e = xl[r, s]
                if e >= 0 and have[e + 1] >= 0:
                    j = have[e + 1]
                    key[j], pos[j] = k, r * S + s
                    have[e + 1] = j + 1
        # have[e + 1] is now each bucket's end; walk the buckets in expert order.
        start = 0
        for e in range(E):
            if have[e + 1] < 0:
                continue
            end = have[e + 1]
            for i in range(start + 1, end):  # busiest rank first, stable
                kk, pp = key[i], pos[i]
                j = i
                while j > start and key[j - 1] < kk:
                    key[j], pos[j] = key[j - 1], pos[j - 1]
                    j -= 1
                key[j], pos[j] = kk, pp
            for i in range(start, start + (end - start) - cl[e]):
                xl[pos[i] // S, pos[i] % S] = -1
            start = end

    @njit(cache=True, nogil=True)
    def _pool_layer(l, x, present, node_cnt, node_of, has_nodes, cl, per, ld, big, have, items, free):
        """:func:`.repair.place_pool` ``(pool_items(...))`` for layer ``l``; ``ld``: its rank loads (updated).
        Returns whether a replica went to a rank that holds its expert already."""
        n, S = x.shape[1], x.shape[2]
        E = cl.size
        M = node_cnt.shape[2]
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
            for _ in range(cl[e] - have[e]):
                j = w
                while j > 0 and -per[l, items[j - 1]] > -per[l, e]:
                    items[j] = items[j - 1]
                    j -= 1
                items[j] = e
                w += 1
        dup = False
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
                v = ld[r] + (0.0 if free[r] > 0 else np.inf)
                v = v + np.float64(present[l, r, e + 1]) * big
                if has_nodes:
                    v = v + (big / 4 if node_cnt[l, e + 1, node_of[r]] > 0 and lacks else 0.0)
                if r == 0 or v < best:
                    best, br = v, r
            si = 0
            for s in range(S):
                if x[l, br, s] < 0:
                    si = s
                    break
            dup = dup or present[l, br, e + 1] == 1
            x[l, br, si] = e
            present[l, br, e + 1] = 1
            if has_nodes:
                node_cnt[l, e + 1, node_of[br]] += 1
            ld[br] += per[l, e]
            free[br] -= 1
        return dup

    @njit(cache=True, nogil=True)
    def _node_conflict(l, x, node_cnt, node_of):
        """Whether a node holds two replicas of an expert that another node lacks in layer ``l``."""
        n, S = x.shape[1], x.shape[2]
        M = node_cnt.shape[2]
        for r in range(n):
            for s in range(S):
                e = x[l, r, s]
                if e >= 0 and node_cnt[l, e + 1, node_of[r]] > 1:
                    for m in range(M):
                        if node_cnt[l, e + 1, m] == 0:
                            return True
        return False

    @njit(cache=True, nogil=True)
    def _repair_refine_all(layers, w, cur, x, counts, per, per32, present, orig, node_cnt, node_of, has_nodes,
                           load, num_slots, cap, rep_bound, big, target, near_factor, aim_factor, aim, max_iters,
                           k_narrow, k_extra, wide_search, maxes, fetched, swaps, nsteps, flag):
        """From ``cur`` to the traced refinement, layer by layer (``from_current``'s steps up to the swaps).

        ``flag[l]``: 0 done; 1 stopped before the refinement with conflicts to fix; 2 stopped before
        it because the layer is within ``near_factor`` above its target (``_already_there`` decides).
        """
        L, n, S = x.shape
        E = w.shape[1]
        gain = np.empty(E)
        loss = np.empty(E)
        multi = np.empty(E, np.int64)
        have = np.zeros(E + 1, np.int64)
        pos = np.empty(n * S, np.int64)
        key = np.empty(n * S)
        items = np.empty(n * S, np.int64)
        free = np.empty(n, np.int64)
        for i in range(layers.size):
            l = layers[i]
            xl, cl, ld = x[l], counts[l], load[l]
            # (Tables are zeroed through flat views: a contiguous 1-D fill compiles to memset.)
            # The current placement's presence; a later copy of an expert on a rank is dropped
            # (:func:`.slots.drop_duplicates`); the replicas that survive (orphans get one), the counts.
            orig.reshape(-1)[l * n * (E + 1):(l + 1) * n * (E + 1)] = 0
            cl[:] = 0
            for r in range(n):
                for s in range(S):
                    e = cur[l, r, s]
                    if e >= 0 and orig[l, r, e + 1] == 0:
                        orig[l, r, e + 1] = 1
                        cl[e] += 1
                        xl[r, s] = e
                    else:
                        xl[r, s] = -1
            for e in range(E):
                cl[e] = min(max(cl[e], 1), cap)
            _counts_layer(w[l], cl, num_slots, cap, rep_bound[l], big, gain, loss, multi)
            for e in range(E):
                per[l, e] = w[l, e] if cl[e] == 1 else w[l, e] / cl[e]  # x / 1 == x exactly
                per32[l, e] = np.float32(per[l, e])
            _drop_layer(xl, cl, per[l], ld, have, pos, key)
            # the slot indexes of the dropped state and its rank loads
            present.reshape(-1)[l * n * (E + 1):(l + 1) * n * (E + 1)] = 0
            if has_nodes:
                node_cnt[l] = 0
            for r in range(n):
                ld[r] = _rank_sum(xl[r], per[l])
                for s in range(S):
                    e = xl[r, s]
                    if e >= 0:
                        present[l, r, e + 1] = 1
                        if has_nodes:
                            node_cnt[l, e + 1, node_of[r]] += 1
            # :func:`.conflicts.fix_conflicts` has work where a rank holds an expert twice (only the
            # pool can place one there: the copy and the drop leave none) or nodes are unevenly spread.
            dup = _pool_layer(l, x, present, node_cnt, node_of, has_nodes, cl, per, ld, big, have, items, free)
            if dup or (has_nodes and _node_conflict(l, x, node_cnt, node_of)):
                flag[l] = 1
                continue
            for r in range(n):
                ld[r] = _rank_sum(xl[r], per[l])
            got = ld.max()
            if got > target[l] and got <= target[l] * near_factor:
                flag[l] = 2
                continue
            flag[l] = 0
            aim[l] = target[l] * aim_factor
            swaps[l] = -1
            nsteps[l] = _layer(l, x, present, node_cnt, node_of, has_nodes, per, per32, ld, aim, orig,
                               max_iters, k_narrow, k_extra, wide_search, maxes, fetched, swaps)

    @njit(cache=True, nogil=True)
    def _recount_per_load(xl, w_l, c, per, load):
        """Counts, load per replica (``0`` for an expert without one) and rank loads of one layer."""
        n, S = xl.shape
        c[:] = 0
        for r in range(n):
            for s in range(S):
                if xl[r, s] >= 0:
                    c[xl[r, s]] += 1
        for e in range(w_l.size):
            per[e] = w_l[e] / c[e] if c[e] > 0 else 0.0
        for r in range(n):
            load[r] = _rank_sum(xl[r], per)

    @njit(cache=True, nogil=True)
    def _place_orphans_layer(w_l, xl, c, per, load, top1, top1r, top2):
        """:func:`.recount.place_orphans` for one layer, in place; ``False`` where an orphan found no slot."""
        n, S = xl.shape
        E = w_l.size
        _recount_per_load(xl, w_l, c, per, load)
        norph = 0
        for e in range(E):
            norph += c[e] == 0
        if norph == 0:
            return True
        orphans = np.empty(norph, np.int64)
        k = 0
        for e in range(E):
            if c[e] == 0:
                orphans[k] = e
                k += 1
        order = np.argsort(-w_l[orphans], kind="mergesort")  # stable: heaviest first, then by id
        for t in range(norph):
            f = orphans[order[t]]
            if t:
                _recount_per_load(xl, w_l, c, per, load)
            top1[:] = -np.inf
            top2[:] = -np.inf
            top1r[:] = -1
            for j in range(n * S):  # the busiest holder of each expert (first in slot order), the next
                e = xl[j // S, j % S]
                if e >= 0:
                    h = load[j // S]
                    if h > top1[e]:
                        top2[e] = top1[e]
                        top1[e] = h
                        top1r[e] = j // S
                    elif h > top2[e]:
                        top2[e] = h
            best, bj = np.inf, -1
            for j in range(n * S):
                r = j // S
                e = xl[r, j % S]
                if e < 0:
                    score = load[r] - 0.0 + w_l[f]
                elif c[e] >= 2:
                    other = top2[e] if top1r[e] == r else top1[e]
                    rise = w_l[e] / max(c[e] - 1, 1) - per[e]
                    score = max(load[r] - per[e] + w_l[f], other + rise)
                else:
                    continue
                if score < best:
                    best, bj = score, j
            if bj < 0:
                return False
            e = xl[bj // S, bj % S]
            if e >= 0:
                c[e] -= 1
            c[f] += 1
            xl[bj // S, bj % S] = f
        return True

    @njit(cache=True, nogil=True, inline="always")
    def _trade_top(xl, w_l, c, per, load, hold, by_load, first, holders, j, g, fetch, best, busiest, limit):
        """The busiest rank after slot ``j`` changes to expert ``g`` (:func:`.recount.trade_counts`'s
        ``new.max(1)``, the same floats): the busiest rank untouched by the trade (``by_load``: ranks
        busiest first), and the new loads of the slot's rank and of the holders of its expert and of
        ``g`` (``holders[first[e]:first[e + 1]]``). ``inf`` as soon as the first two show that the
        trade cannot be picked: not under ``limit``, or its key (``fetch * 10 + top / busiest``, which
        only grows with ``top``) not under ``best``."""
        n, S = xl.shape
        r = j // S
        e = xl[r, j % S]
        d_e = w_l[e] / max(c[e] - 1, 1) - per[e] if e >= 0 else 0.0
        cg = w_l[g] / (c[g] + 1)
        d_g = cg - per[g]
        top = load[r] - (per[e] if e >= 0 else 0.0) + cg
        for i in range(n):
            q = by_load[i]
            if q != r and not (e >= 0 and hold[q, e + 1]) and not hold[q, g + 1]:
                if load[q] > top:
                    top = load[q]
                break
        if not top < limit or fetch * 10.0 + top / busiest > best:
            return np.inf
        if e >= 0:
            for i in range(first[e], first[e + 1]):
                q = holders[i]
                if q != r:
                    v = load[q] + d_e
                    if hold[q, g + 1]:
                        v = v + d_g
                    if v > top:
                        top = v
        for i in range(first[g], first[g + 1]):
            q = holders[i]
            if not (e >= 0 and hold[q, e + 1]):
                v = load[q] + d_g
                if v > top:
                    top = v
        return top

    @njit(cache=True, nogil=True, inline="always")
    def _blocking(load, by_load, hi, hold, g, f, best, top, limit, skip_holders):
        """Ranks other than ``hi`` that alone keep a trade of fetch ``f`` from beating ``best`` (their load
        is at least the busiest rank the trade may leave): with ``skip_holders``, those that do not
        hold ``g``. Returns ``(how many, the first)``, counting to 2 at most."""
        cnt, first_q = 0, -1
        for i in range(load.size):
            q = by_load[i]
            if q == hi:
                continue
            if load[q] < limit and not f * 10.0 + load[q] / top > best:
                break  # ranks come busiest first: the rest are lighter
            if skip_holders and hold[q, g + 1]:
                continue
            cnt += 1
            if cnt == 1:
                first_q = q
            else:
                break
        return cnt, first_q

    @njit(cache=True, nogil=True)
    def _trade_eval(xl, w_l, c, per, load, hold, by_load, first, holders, orig_l, j, g, f, top, limit, idx, st):
        """One candidate of fetch ``f`` (others are ignored) against the best so far ``st = [key, index,
        slot, expert]``: taken where its key is lower, or equal with a lower index in the reference's order."""
        S = xl.shape[1]
        r = j // S
        e = xl[r, j % S]
        if e == g or hold[r, g + 1] or (e >= 0 and c[e] < 2):
            return
        if (0 if orig_l[r, g + 1] else 1) - (1 if e >= 0 and not orig_l[r, e + 1] else 0) != f:
            return
        t = _trade_top(xl, w_l, c, per, load, hold, by_load, first, holders, j, g, f, st[0], top, limit)
        if not t < limit:
            return
        key = f * 10.0 + t / top
        if key < st[0] or (key == st[0] and idx < st[1]):
            st[0], st[1], st[2], st[3] = key, idx, j, g

    @njit(cache=True, nogil=True)
    def _free_trade(xl, w_l, c, per, load, hold, by_load, first, holders, orig_l, hi, top, limit, st):
        """The best trade that fetches nothing (or sends an expert home), into ``st``: only candidates
        that can be one are visited. A slot of the busiest rank whose expert it fetched may take any
        expert; one it held before, only an expert it held before. Any slot whose expert was fetched
        may take an expert of the busiest rank; a slot of a rank that held that expert before, too."""
        n, S = xl.shape
        E = w_l.size
        for f in (-1, 0):
            st[0], st[1], st[2] = np.inf, np.inf, -1
            for a in range(S):
                j = hi * S + a
                e = xl[hi, a]
                for g in range(E):
                    if e == g or hold[hi, g + 1] or (e >= 0 and c[e] < 2):
                        continue
                    if (0 if orig_l[hi, g + 1] else 1) - (1 if e >= 0 and not orig_l[hi, e + 1] else 0) == f:
                        _trade_eval(xl, w_l, c, per, load, hold, by_load, first, holders, orig_l, j, g, f, top,
                                    limit, a * E + g, st)
            k = -1
            for a in range(S):
                g = xl[hi, a]
                if g < 0:
                    continue
                k += 1
                for j in range(n * S):
                    r = j // S
                    e = xl[r, j % S]
                    if e == g or hold[r, g + 1] or (e >= 0 and c[e] < 2):
                        continue
                    if (0 if orig_l[r, g + 1] else 1) - (1 if e >= 0 and not orig_l[r, e + 1] else 0) == f:
                        _trade_eval(xl, w_l, c, per, load, hold, by_load, first, holders, orig_l, j, g, f, top,
                                    limit, S * E + k * n * S + j, st)
            if st[2] >= 0:
                return

    @njit(cache=True, nogil=True)
    def _trade_counts_layer(w_l, xl, orig_l, aim, max_trades, c, per, load, hold, by_load, first, holders):
        """:func:`.recount.trade_counts` for one layer, in place; returns the trades made.

        The reference's pick is the first minimum of ``fetch * 10 + top / busiest`` with ``top /
        busiest < 1``: a candidate that fetches less always wins. So the candidates are searched by
        fetch (-1, 0, then 1) and the first fetch with a candidate decides. Within one, a candidate
        is skipped where a lower bound of the busiest rank it leaves already loses to the best so
        far: the busiest rank's own new load (experts tried lightest replica first, so the rest of a
        slot's list is skipped at once), and every other rank at least that busy must be lowered by
        the trade (hold the expert it gains a replica of, or give the slot). The pick is the
        reference's (ties: the lower index in its order)."""
        n, S = xl.shape
        E = w_l.size
        done = 0
        cg_all = np.empty(E)
        by_cg = np.empty(E, np.int64)
        st = np.empty(4)
        for _ in range(max_trades):
            _recount_per_load(xl, w_l, c, per, load)
            hi = 0
            for r in range(1, n):
                if load[r] > load[hi]:
                    hi = r
            top = load[hi]
            if not top > aim:
                break
            hold[:] = False
            for r in range(n):
                for s in range(S):
                    if xl[r, s] >= 0:
                        hold[r, xl[r, s] + 1] = True
            by_load[:] = np.argsort(-load, kind="mergesort")
            first[0] = 0
            for e in range(E):
                first[e + 1] = first[e] + c[e]
            fill = first[:E].copy()
            for r in range(n):
                for s in range(S):
                    e = xl[r, s]
                    if e >= 0:
                        holders[fill[e]] = r
                        fill[e] += 1
            for g in range(E):
                cg_all[g] = w_l[g] / (c[g] + 1)
            by_cg[:] = np.argsort(cg_all, kind="mergesort")
            limit = top * (1 - 1e-12)
            _free_trade(xl, w_l, c, per, load, hold, by_load, first, holders, orig_l, hi, top, limit, st)
            bj, bg = int(st[2]), int(st[3])
            # No free trade: the best that fetches one expert. Its two hot loops write the candidate's
            # test out (as _trade_eval does) with the best kept in locals. Measured on Qwen3-sized
            # layers: through _trade_eval and its state array 18 -> 29 ms; through an inlined helper
            # returning the key (best in locals) 18 -> 130 ms.
            if bj < 0:
                f = 1
                best, bi = np.inf, -1
                # (a) a slot of the busiest rank, any expert g (candidate index a * E + g)
                for a in range(S):
                    j = hi * S + a
                    e = xl[hi, a]
                    if e >= 0 and c[e] < 2:
                        continue
                    base = load[hi] - (per[e] if e >= 0 else 0.0)
                    cnt, q = _blocking(load, by_load, hi, hold, 0, f, best, top, limit, False)
                    m = S if cnt > 0 else E  # a busy second rank must hold g: its experts only
                    for i in range(m):
                        if cnt > 0:
                            g = xl[q, i]
                            if g < 0:
                                continue
                        else:
                            g = by_cg[i]
                            own = base + cg_all[g]
                            if not own < limit or f * 10.0 + own / top > best:
                                break  # the rest of the list is heavier
                        if e == g or hold[hi, g + 1]:
                            continue
                        fetch = (0 if orig_l[hi, g + 1] else 1) - (1 if e >= 0 and not orig_l[hi, e + 1] else 0)
                        if fetch != f:
                            continue
                        t = _trade_top(xl, w_l, c, per, load, hold, by_load, first, holders, j, g, f, best, top,
                                       limit)
                        if not t < limit:
                            continue
                        key = f * 10.0 + t / top
                        idx = a * E + g
                        if key < best or (key == best and idx < bi):
                            best, bi, bj, bg = key, idx, j, g
                # (b) any slot, an expert g of the busiest rank (index S * E + k * n * S + slot)
                k = -1
                for a in range(S):
                    g = xl[hi, a]
                    if g < 0:
                        continue
                    k += 1
                    lb = load[hi] + (cg_all[g] - per[g])  # the busiest rank keeps g less its drop
                    if not lb < limit or f * 10.0 + lb / top > best:
                        continue
                    # Ranks busiest first, so that a good trade found early rules out the rest: a busy
                    # rank without g that is not the slot's stays as busy.
                    for i in range(n):
                        r = by_load[i]
                        if r == hi or hold[r, g + 1]:
                            continue
                        cnt, q = _blocking(load, by_load, hi, hold, g, f, best, top, limit, True)
                        if cnt > 1 or (cnt == 1 and q != r):
                            break
                        for s in range(S):
                            j = r * S + s
                            e = xl[r, s]
                            if e == g or (e >= 0 and c[e] < 2):
                                continue
                            fetch = (0 if orig_l[r, g + 1] else 1) - (1 if e >= 0 and not orig_l[r, e + 1] else 0)
                            if fetch != f:
                                continue
                            t = _trade_top(xl, w_l, c, per, load, hold, by_load, first, holders, j, g, f, best, top,
                                           limit)
                            if not t < limit:
                                continue
                            key = f * 10.0 + t / top
                            idx = S * E + k * n * S + j
                            if key < best or (key == best and idx < bi):
                                best, bi, bj, bg = key, idx, j, g
            if bj < 0:
                break
            xl[bj // S, bj % S] = bg
            done += 1
        return done

    @njit(cache=True, nogil=True)
    def _recount_all(layers, w, x, cur, aim, orphans_first, max_trades, ok, counts, per, per32, present, orig, load):
        """:func:`.recount.recount` over ``layers`` (``x``, the start, changed in place), then the arrays
        the refinement starts from, as :func:`.repair_jit.recount_refine` documents them."""
        L, n, S = x.shape
        E = w.shape[1]
        c = np.empty(E, np.int64)
        p = np.empty(E)
        ld = np.empty(n)
        top1, top2 = np.empty(E), np.empty(E)
        top1r = np.empty(E, np.int64)
        hold = np.zeros((n, E + 1), np.bool_)
        by_load = np.empty(n, np.int64)
        first = np.empty(E + 1, np.int64)
        holders = np.empty(n * S, np.int64)
        for i in range(layers.size):
            l = layers[i]
            ok[l] = True
            orig[l] = 0  # the current placement's presence: trades count fetches against it
            for r in range(n):
                for s in range(S):
                    if cur[l, r, s] >= 0:
                        orig[l, r, cur[l, r, s] + 1] = 1
            if orphans_first and not _place_orphans_layer(w[l], x[l], c, p, ld, top1, top1r, top2):
                ok[l] = False
            else:
                _trade_counts_layer(w[l], x[l], orig[l], aim[l], max_trades, c, p, ld, hold, by_load, first, holders)
                for r in range(n):
                    for s in range(S):
                        if x[l, r, s] < 0:
                            ok[l] = False
            # counts (an expert without a replica divides by 1), loads per replica, presence, rank loads
            counts[l] = 0
            for r in range(n):
                for s in range(S):
                    if x[l, r, s] >= 0:
                        counts[l, x[l, r, s]] += 1
            for e in range(E):
                per[l, e] = w[l, e] / max(counts[l, e], 1)
                per32[l, e] = np.float32(per[l, e])
            present[l] = 0
            for r in range(n):
                for s in range(S):
                    if x[l, r, s] >= 0:
                        present[l, r, x[l, r, s] + 1] = 1
                load[l, r] = _rank_sum(x[l, r], per[l])
