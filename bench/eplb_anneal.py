"""How far a much slower search gets on one bench cell: simulated annealing from our placement.

Analysis, not a benchmark of ours: it asks whether the failure cells that miss issue 16's movement
target are one search rule away. Start: our placement (``elasticity_aware`` with ``current=``) on a
cell of ``bench_eplb.py``. Moves: swap two slots of different ranks, or give a slot of an expert with
>= 2 replicas to another expert (counts change); never an expert twice on a rank. Acceptance:
Metropolis on transfers (temperature ``--t0`` down to 0.03). Constraint, hard:

* default: the busiest ranks summed over layers stay under what 99 % of upstream's balancedness in
  the same run allows (the target's own balance), so layers may trade balance as ours do;
* ``--layers``: each listed layer alone, no rank above that layer's busiest rank in our placement.

Prints ours, what the target allows, and the best transfers found per seed (or per layer).

    python bench/eplb_anneal.py ds3-ep32 hot "2 dead" --moves 3e7 --layers 0-13
    python bench/eplb_anneal.py tiny hot "1 dead" --moves 2e7 --seeds 3
    python bench/eplb_anneal.py s12x64 lognormal1 "1 dead" --moves 1e6 --seeds 3
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import List, Optional

import numba as nb
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_eplb as B  # noqa: E402


@nb.njit(cache=True)
def _busiest(x, w, cnt):
    n, S = x.shape
    top = 0.0
    for r in range(n):
        s = 0.0
        for i in range(S):
            s += w[x[r, i]] / cnt[x[r, i]]
        top = max(top, s)
    return top


@nb.njit(cache=True)
def anneal(x, orig, w, budget, moves, t0, t1, seed):
    """Best transfers found, and that placement. x: int64 [L, n, S] (changed in place); orig: int8
    [L, n, E] (1: the rank held the expert before); w: float64 [L, E]; budget: bound of the busiest
    ranks summed over layers."""
    np.random.seed(seed)
    L, n, S = x.shape
    E = w.shape[1]
    cnt = np.zeros((L, E), np.int64)
    pres = np.zeros((L, n, E), np.int8)
    fetched = 0
    for l in range(L):
        for r in range(n):
            for i in range(S):
                e = x[l, r, i]
                cnt[l, e] += 1
                pres[l, r, e] = 1
                fetched += orig[l, r, e] == 0
    M = np.zeros(L)
    for l in range(L):
        M[l] = _busiest(x[l], w[l], cnt[l])
    total = M.sum()
    best, best_x = fetched, x.copy()
    for it in range(moves):
        temp = t0 * (t1 / t0) ** (it / moves)
        l = np.random.randint(L)
        a = np.random.randint(n)
        i = np.random.randint(S)
        e = x[l, a, i]
        if np.random.randint(3) < 2:  # swap with a slot of another rank
            b = np.random.randint(n)
            j = np.random.randint(S)
            f = x[l, b, j]
            if b == a or f == e or pres[l, a, f] or pres[l, b, e]:
                continue
            d = (orig[l, a, f] == 0) + (orig[l, b, e] == 0) - (orig[l, a, e] == 0) - (orig[l, b, f] == 0)
            x[l, a, i], x[l, b, j] = f, e
            m = _busiest(x[l], w[l], cnt[l])
            if total - M[l] + m <= budget and (d <= 0 or np.random.random() < np.exp(-d / temp)):
                pres[l, a, e], pres[l, a, f], pres[l, b, f], pres[l, b, e] = 0, 1, 0, 1
                total += m - M[l]
                M[l] = m
                fetched += d
            else:
                x[l, a, i], x[l, b, j] = e, f
        else:  # give e's slot to another expert f (counts change)
            f = np.random.randint(E)
            if cnt[l, e] < 2 or pres[l, a, f]:
                continue
            d = (orig[l, a, f] == 0) - (orig[l, a, e] == 0)
            x[l, a, i] = f
            cnt[l, e] -= 1
            cnt[l, f] += 1
            m = _busiest(x[l], w[l], cnt[l])
            if total - M[l] + m <= budget and (d <= 0 or np.random.random() < np.exp(-d / temp)):
                pres[l, a, e], pres[l, a, f] = 0, 1
                total += m - M[l]
                M[l] = m
                fetched += d
            else:
                x[l, a, i] = e
                cnt[l, e] += 1
                cnt[l, f] -= 1
        if fetched < best:
            best = fetched
            best_x[:] = x
    return best, best_x


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("shape", choices=sorted(B.SHAPES))
    ap.add_argument("family")
    ap.add_argument("scenario", choices=list(B.FAILURES))
    ap.add_argument("--moves", type=float, default=1e6, help="annealing moves (per layer with --layers)")
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--t0", type=float, default=0.5, help="start temperature (in transfers)")
    ap.add_argument("--layers", help="anneal these layers alone, e.g. 0-13 (each under its own busiest rank)")
    args = ap.parse_args(argv)

    cell = B.cell_from_args(args)
    if cell is None:
        return 2
    x0, before, w, o, u, allowed = cell.mine, cell.before, cell.w, cell.ours, cell.upstream, cell.allowed
    L, E = w.shape
    n = x0.shape[1]
    orig = np.zeros((L, n, E), np.int8)
    for l in range(L):
        for r in range(n):
            orig[l, r, before[l, r][before[l, r] >= 0]] = 1
    print(f"{cell.header()}; lower bound {o.lower}")
    moves = int(args.moves)
    if args.layers:
        tot_o = tot_a = 0
        for l in B.layer_list(args.layers):
            xl = x0[l:l + 1].copy()
            cnt = np.bincount(xl.ravel(), minlength=E)
            top = max((w[l][xl[0, r]] / cnt[xl[0, r]]).sum() for r in range(n))
            f0 = int((orig[l][np.arange(n)[:, None], xl[0]] == 0).sum())
            t = time.perf_counter()
            best, _ = anneal(xl, orig[l:l + 1], w[l:l + 1], top * (1 + 1e-12), moves, args.t0, 0.03, 0)
            print(f"  layer {l}: ours {f0}, annealing {best} ({time.perf_counter() - t:.0f} s)", flush=True)
            tot_o, tot_a = tot_o + f0, tot_a + best
        print(f"  layers {args.layers}: ours {tot_o}, annealing {tot_a}")
        return 0
    budget = L * (1.0 / n) / (0.99 * u.balancedness) * (1 - 1e-12)  # sum of busiest ranks, w normalised
    for seed in range(args.seeds):
        t = time.perf_counter()
        best, _ = anneal(x0.copy(), orig, w, budget, moves, args.t0, 0.03, seed)
        print(f"  seed {seed}: annealing {best} ({time.perf_counter() - t:.1f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
