"""The numba kernels of the targets, ``choose_stops``' search and the output check (see :mod:`.jit_kernels`).

Self-contained for numba's cache (a kernel here only calls kernels of this module). Float sums are
added in numpy's order (pairwise blocks of 8, halving above 128), so every float is the numpy
reference's (``test/test_eplb_jit.py``).
"""
from __future__ import annotations

import numpy as np

from .jit_kernels import AVAILABLE

if AVAILABLE:
    from numba import njit

    # ----------------------------------------------------------------- choose_stops' search for lam

    @njit(cache=True, nogil=True)
    def _sum_block(v, n):
        """``v[:n].sum()`` bit for bit as numpy adds at most 128 values: 0 + (8 interleaved partial
        sums combined pairwise, then the rest) (:func:`.jit_kernels._rank_sum` does the same)."""
        if n < 8:
            res = 0.0
            for i in range(n):
                res += v[i]
            return 0.0 + res
        r0, r1, r2, r3, r4, r5, r6, r7 = v[0], v[1], v[2], v[3], v[4], v[5], v[6], v[7]
        i = 8
        while i < n - (n % 8):
            r0 += v[i]
            r1 += v[i + 1]
            r2 += v[i + 2]
            r3 += v[i + 3]
            r4 += v[i + 4]
            r5 += v[i + 5]
            r6 += v[i + 6]
            r7 += v[i + 7]
            i += 8
        res = ((r0 + r1) + (r2 + r3)) + ((r4 + r5) + (r6 + r7))
        while i < n:
            res += v[i]
            i += 1
        return 0.0 + res

    @njit(cache=True, nogil=True)
    def _pick(mm, c_none, lam, k):
        """``k[:] = (mm * lam + c_none).argmin(0)`` (first minimum)."""
        K2, L = mm.shape
        for j in range(L):
            best = mm[0, j] * lam + c_none[0, j]
            bi = 0
            for i in range(1, K2):
                v = mm[i, j] * lam + c_none[i, j]
                if v < best:
                    best, bi = v, i
            k[j] = bi

    @njit(cache=True, nogil=True)
    def _total(m, k, cols, buf):
        for i in range(cols.size):
            buf[i] = m[k[cols[i]], cols[i]]
        return _sum_pairwise(buf)

    @njit(cache=True, nogil=True)
    def _stops_search(mm, c_none, m, cols, budget, k_lo, k_hi):
        """:func:`.repair.choose_stops`' search for the smallest ``lam`` whose picks keep the sum of
        busiest ranks over ``cols`` within ``budget``: fills ``k_lo`` / ``k_hi`` with the
        picks at the bracket's ends; returns False when even the most balanced points miss (``k_hi``)."""
        buf = np.empty(cols.size)
        k_mid = np.empty_like(k_hi)
        lo, hi = 0.0, 1.0
        _pick(mm, c_none, hi, k_hi)
        while _total(m, k_hi, cols, buf) > budget and hi < 1e12:
            hi *= 4.0
            _pick(mm, c_none, hi, k_hi)
        if _total(m, k_hi, cols, buf) > budget:
            return False
        for _ in range(30):
            mid = (lo + hi) / 2
            _pick(mm, c_none, mid, k_mid)
            if _total(m, k_mid, cols, buf) > budget:
                lo = mid
            else:
                hi = mid
        _pick(mm, c_none, lo, k_lo)
        _pick(mm, c_none, hi, k_hi)
        return True

    @njit(cache=True, nogil=True)
    def _choose_stops(maxes, fetched, target, missed, fresh_max, fresh_cost, k, use_fresh):
        """:func:`.repair.choose_stops` whole: fills ``k``
        (int64 ``[L]``) and ``use_fresh`` (bool ``[M]``) with exactly the numpy reference's picks."""
        K1, L = maxes.shape
        m = np.empty((K1 + 1, L))
        c = np.empty((K1 + 1, L))
        for i in range(K1):
            for j in range(L):
                m[i, j] = maxes[i, j]
                c[i, j] = fetched[i, j]
        for j in range(L):
            m[K1, j] = np.inf
            c[K1, j] = 0.0
        for i in range(missed.size):
            m[K1, missed[i]] = fresh_max[i]
            c[K1, missed[i]] = fresh_cost[i]
        n_fin = 0
        for j in range(L):
            if np.isfinite(target[j]):
                n_fin += 1
        cols = np.empty(n_fin, np.int64)
        buf = np.empty(max(n_fin, 1))
        n_fin = 0
        for j in range(L):
            if np.isfinite(target[j]):
                cols[n_fin] = j
                buf[n_fin] = target[j]
                n_fin += 1
        for j in range(L):
            k[j] = K1 - 1
        if n_fin == 0:
            for i in range(missed.size):
                use_fresh[i] = False
            return
        budget = _sum_pairwise(buf)
        scale = -np.inf
        for i in range(K1 + 1):
            for j in cols:
                if np.isfinite(m[i, j]):
                    scale = max(scale, abs(m[i, j]))
        mm = np.empty((K1 + 1, L))
        c_none = np.empty((K1 + 1, L))
        for i in range(K1 + 1):
            for j in range(L):
                if np.isfinite(m[i, j]):
                    mm[i, j] = m[i, j] / scale
                    c_none[i, j] = c[i, j]
                else:
                    mm[i, j] = 0.0
                    c_none[i, j] = np.inf
        k_lo = np.empty(L, np.int64)
        k_hi = np.empty(L, np.int64)
        if _stops_search(mm, c_none, m, cols, budget, k_lo, k_hi):
            # Layers alike switch at the same lam: switch only as many as the sum needs, cheapest
            # transfers per unit of balance first.
            nd = 0
            for j in cols:
                if k_lo[j] != k_hi[j]:
                    nd += 1
            d = np.empty(nd, np.int64)
            dm = np.empty(nd)
            ratio = np.empty(nd)
            nd = 0
            for j in cols:
                if k_lo[j] != k_hi[j]:
                    d[nd] = j
                    dm[nd] = m[k_lo[j], j] - m[k_hi[j], j]
                    ratio[nd] = (c[k_hi[j], j] - c[k_lo[j], j]) / max(dm[nd], 1e-300)
                    nd += 1
            for j in range(L):
                k[j] = k_hi[j]
            if nd:
                order = np.argsort(ratio, kind="mergesort")
                for i in range(n_fin):
                    buf[i] = m[k_lo[cols[i]], cols[i]]
                need = (_sum_pairwise(buf) - budget) * (1 - 1e-12)
                cnt = nd
                acc = 0.0
                for i in range(nd):  # searchsorted(cumsum(dm[order]), need) + 1
                    acc += dm[order[i]]
                    if acc >= need:
                        cnt = i
                        break
                cnt += 1
                for j in range(L):
                    k[j] = k_lo[j]
                for i in range(min(cnt, nd)):
                    k[d[order[i]]] = k_hi[d[order[i]]]
        else:
            for j in range(L):
                k[j] = k_hi[j]
        for j in range(L):
            if not np.isfinite(target[j]):
                k[j] = K1 - 1
        for i in range(missed.size):
            use_fresh[i] = k[missed[i]] == K1
        for j in range(L):
            if k[j] == K1:
                k[j] = K1 - 1

    # ----------------------------------------------------------------- from scratch: node order

    @njit(cache=True, nogil=True)
    def _node_order_all(x, node_of, node_ranks, M, out):
        """:func:`.packing.order_ranks_by_node_reference` into ``out`` (int64 ``[L, n, S]``): each rank's
        content, in rank order, to the node with room holding fewest of its experts (clashes counted
        per slot, an expert counted once per content, as numpy's ``+=`` does; ties: the node with
        most room, then the lower node); contents bound for a node fill its ranks in order."""
        L, n, S = x.shape
        E1 = 0
        for v in x.ravel():
            E1 = max(E1, v + 2)
        big = np.iinfo(np.int64).max
        node_cnt = np.zeros((E1, M), np.int64)
        room0 = np.zeros(M, np.int64)
        for r in range(n):
            room0[node_of[r]] += 1
        room = np.empty(M, np.int64)
        dest = np.empty(n, np.int64)
        for l in range(L):
            node_cnt[:] = 0
            room[:] = room0
            for j in range(n):
                best, m_best = big, 0
                for m in range(M):
                    if room[m] > 0:
                        clash = 0
                        for s in range(S):
                            clash += node_cnt[x[l, j, s] + 1, m]
                        score = clash * (n + 1) - room[m]
                    else:
                        score = big
                    if score < best:
                        best, m_best = score, m
                dest[j] = m_best
                room[m_best] -= 1
                for s in range(S):
                    v = x[l, j, s] + 1
                    seen = False
                    for t in range(s):
                        if x[l, j, t] + 1 == v:
                            seen = True
                            break
                    if not seen:
                        node_cnt[v, m_best] += 1
            k = 0  # contents grouped by node (a stable order), node m's to its ranks in order
            for m in range(M):
                for j in range(n):
                    if dest[j] == m:
                        out[l, node_ranks[k]] = x[l, j]
                        k += 1

    # ----------------------------------------------------------------- the output check

    @njit(cache=True, nogil=True)
    def _valid(x, E, live, allow_duplicates):
        """Whether ``x`` (int64 ``[L, R, S]``) passes :meth:`..placement.Placement.validate` with the
        live mask ``live``: ids in ``[-1, E)``, live ranks full and dead ones empty, every expert placed
        in every layer, no expert twice on a rank (unless allowed). False: validate says what is wrong."""
        L, R, S = x.shape
        stamp = np.full(E, -1, np.int64)  # the last (layer, rank) that held each expert
        for l in range(L):
            placed = 0
            for r in range(R):
                tag = l * R + r
                for s in range(S):
                    e = x[l, r, s]
                    if e < -1 or e >= E or (e < 0) == live[r]:
                        return False
                    if e < 0:
                        continue
                    if stamp[e] < l * R:  # first replica of e in this layer
                        placed += 1
                    elif stamp[e] == tag and not allow_duplicates:
                        return False
                    stamp[e] = tag
            if placed != E:
                return False
        return True

    # ----------------------------------------------------------------- targets and replica bounds

    @njit(cache=True, nogil=True)
    def _sum_pairwise(v):
        """``v.sum()`` bit for bit as numpy adds it: blocks of at most 128 (:func:`_sum_block`), longer
        ranges split at half rounded down to a multiple of 8 and the halves added (numpy's recursion,
        unrolled onto a stack: numba's cache cannot hold self-recursive kernels)."""
        n = v.size
        if n <= 128:
            return _sum_block(v, n)
        m2 = n // 2
        m2 -= m2 % 8
        if n - m2 <= 128:  # one split into two blocks (E = 256: no stack to allocate)
            return 0.0 + (_sum_block(v[:m2], m2) + _sum_block(v[m2:], n - m2))
        los = np.empty(64, np.int64)
        ns = np.empty(64, np.int64)
        stage = np.empty(64, np.int64)
        left = np.empty(64)
        top = 0
        los[0], ns[0], stage[0] = 0, n, 0
        ret = 0.0
        while top >= 0:
            lo, m = los[top], ns[top]
            if m <= 128:
                ret = _sum_block(v[lo:lo + m], m)  # its 0.0 + x == x for x >= 0
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
    def _greedy_layer(w, num_slots, cap, c, gain, cand):
        """:func:`.counts.greedy_counts` for one layer into ``c``. Only the ``D = num_slots - E`` heaviest
        experts (ties: lower id) can be picked in ``D`` steps (each heavier one must be picked first),
        so the argmax runs over them; ``cand``: int64 scratch ``[E]``."""
        E = w.size
        D = min(max(num_slots - E, 0), E)
        m = 0
        for e in range(E if D > 0 else 0):  # the D heaviest, heaviest first, ties by id (insertion; D is small)
            if m < D or w[e] > w[cand[m - 1]]:
                j = m if m < D else D - 1
                while j > 0 and w[cand[j - 1]] < w[e]:
                    cand[j] = cand[j - 1]
                    j -= 1
                cand[j] = e
                m = min(m + 1, D)
        for e in range(E):
            c[e] = 1
            gain[e] = w[e]
        for _ in range(num_slots - E):
            b = cand[0]
            for i in range(1, m):
                e = cand[i]
                if gain[e] > gain[b] or (gain[e] == gain[b] and e < b):
                    b = e
            c[b] += 1
            gain[b] = w[b] / c[b] if c[b] < cap else -1.0

    @njit(cache=True, nogil=True)
    def _fill(w, c, k, small):
        """The ``k`` lightest of ``w / c`` summed lightest first; also returns the heaviest ``w / c``."""
        m = 0
        top = -np.inf
        for e in range(w.size):
            p = w[e] if c[e] == 1 else w[e] / c[e]
            top = max(top, p)
            if k > 0 and (m < k or p < small[m - 1]):
                j = m if m < k else k - 1
                while j > 0 and small[j - 1] > p:
                    small[j] = small[j - 1]
                    j -= 1
                small[j] = p
                m = min(m + 1, k)
        return (_sum_pairwise(small[:k]) if k > 0 else 0.0), top

    @njit(cache=True, nogil=True)
    def _greedy_busiest_layer(w, n, S, c, gain, cand, per, key, per2, key2, cnt, load, val, left, tree,
                              replicated=False):
        """:func:`.counts.greedy_busiest` for one layer. Scratch: ``c, gain, cand`` ``[E]`` (replication:
        :func:`_greedy_layer` with no effective cap, as upstream's; ``replicated``: the caller's ``c`` and
        ``gain`` hold it already, e.g. a capped replication whose cap no expert reached); ``per, key,
        per2, key2`` ``[n * S]`` (float64, uint32); ``cnt`` int64 ``[256]``; ``load, val`` float64 and
        ``left`` int64 ``[2 n]``; ``tree`` int64 ``[4 n]``.

        Replicas are ordered by their float32 value, as upstream sorts them (a stable LSD radix sort of
        the bit patterns, which order like the positive floats: ~4x numba's quicksort here)."""
        E = w.size
        if not replicated:
            _greedy_layer(w, n * S, n * S + 1, c, gain, cand)  # upstream's replication: no cap per rank
        f32 = gain[:E].astype(np.float32)  # each expert's replica
        bits = f32.view(np.uint32)
        k = 0
        for e in range(E):
            for _ in range(c[e]):
                per[k] = gain[e]
                key[k] = bits[e]
                k += 1
        a, va, b2, vb = key, per, key2, per2
        for sh in range(0, 32, 8):
            cnt[:] = 0
            for i in range(k):
                cnt[(a[i] >> sh) & 255] += 1
            tot = 0
            for d in range(256):
                x = cnt[d]
                cnt[d] = tot
                tot += x
            for i in range(k):
                d = (a[i] >> sh) & 255
                j = cnt[d]
                b2[j] = a[i]
                vb[j] = va[i]
                cnt[d] = j + 1
            a, b2 = b2, a
            va, vb = vb, va
        # Heaviest first, each onto the least loaded rank with room (ties: lower id), as upstream (which
        # may put two replicas of an expert on one rank). A tournament tree over the ranks (each node
        # keeps its subtree's least loaded rank with room) answers in O(1), updates in O(log n).
        N = 1
        while N < n:
            N *= 2
        for r in range(N):
            val[r] = 0.0 if r < n else np.inf
            load[r] = 0.0
            tree[N + r] = r
        for v in range(N - 1, 0, -1):
            a0, a1 = tree[2 * v], tree[2 * v + 1]
            tree[v] = a1 if val[a1] < val[a0] else a0
        for r in range(n):
            left[r] = S
        for i in range(k - 1, -1, -1):
            r = tree[1]
            load[r] += va[i]
            left[r] -= 1
            val[r] = load[r] if left[r] > 0 else np.inf
            v = (N + r) >> 1
            while v >= 1:
                a0, a1 = tree[2 * v], tree[2 * v + 1]
                tree[v] = a1 if val[a1] < val[a0] else a0
                v >>= 1
        best = load[0]
        for r in range(1, n):
            best = max(best, load[r])
        return best

    @njit(cache=True, nogil=True)
    def _targets_all(layers, weight, w, n, S, min_balance, slack, greedy_ref, keep, target, rep_bound):
        """:func:`.elasticity_aware.balance_target` and ``from_current``'s replica bound (with ``keep``,
        ``0`` for none), per layer."""
        E = weight.shape[1]
        c = np.empty(E, np.int64)
        gain = np.empty(E)
        cand = np.empty(E, np.int64)
        k = min(S - 1, E - 1) if S > 1 else 0
        small = np.empty(max(k, 1))
        per, per2 = np.empty(n * S), np.empty(n * S)
        key, key2 = np.empty(n * S, np.uint32), np.empty(n * S, np.uint32)
        cnt = np.empty(256, np.int64)
        load, val, left = np.empty(2 * n), np.empty(2 * n), np.empty(2 * n, np.int64)
        tree = np.empty(4 * n, np.int64)
        for i in range(layers.size):
            l = layers[i]
            wl = weight[l]
            _greedy_layer(wl, n * S, n, c, gain, cand)
            fill, top = _fill(wl, c, k, small)
            mean = _sum_pairwise(wl) / n
            if wl.max() <= wl.min():
                target[l] = np.inf
                rep_bound[l] = np.inf
                continue
            bound = max(mean, top + fill)
            # Below the per-rank cap everywhere, the capped replication above is upstream's too.
            greedy = _greedy_busiest_layer(wl, n, S, c, gain, cand, per, key, per2, key2, cnt, load, val, left, tree,
                                           c.max() < n)
            if greedy_ref:  # the real placement's busiest rank (no slack), or the bound below it
                bound = max(bound, greedy)
            else:  # the bound is below what our from-scratch placement reaches, but no looser than upstream's
                bound = max(bound, min(bound * slack, greedy))
            target[l] = bound / min_balance
            _greedy_layer(w[l], n * S, n, c, gain, cand)
            fill, top = _fill(w[l], c, k, small)
            rep_bound[l] = min(max(top / min_balance, keep[l]), target[l] - 2 * fill)
