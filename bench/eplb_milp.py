"""How far ours is from the fewest transfers any placement needs, layer by layer: an exact model (MILP).

Analysis, not a benchmark of ours. For one failure cell of ``bench_eplb.py`` and some of its layers,
it asks: with no live rank above the busiest rank *our* placement has on that layer, how few slots
must change? The model is exact for the bench's metrics:

* any replica counts (at least one replica of every expert), every live slot filled;
* an expert may sit twice on a rank (the bench accepts upstream's placements, which do that);
* a replica carries ``load / count`` (the metric's even split);
* a slot is free when its expert was on that rank before (``metrics.movement``), else fetched.

HiGHS (``highspy``) searches it under a time limit, starting from our placement, and reports the best placement found
(checked again here, outside the solver) and a proven bound: no placement has fewer transfers at
that busiest rank. ``--relaxed`` also solves a smaller relaxation (the fetched replicas of experts
lighter than ``--weigh`` x the busiest rank weigh nothing and take no slot), whose optimum is a
bound too and often is reached in seconds.

    python bench/eplb_milp.py ds3-ep32 zipf1.2 "2 dead" --layers 0 --time-limit 400
    python bench/eplb_milp.py ds3-ep32 hot "2 dead" --layers 3 --time-limit 400 --relaxed

Layers trade balance in the target (a sum over layers), so a per-layer bound bounds the cell only
where every layer is held at our busiest rank. ``--cell M1,M2,...`` bounds a whole cell whose layers
are alike (the same problem up to names, e.g. zipf loads): layer 0 is solved at busiest ranks of
``M x`` the layer mean, and a layer whose busiest rank lies in ``[T_k, T_k+1)`` is charged the bound
at ``T_k+1`` for a budget of ``T_k``; the cheapest split of the target's budget over the layers (the
lower convex envelope of those points) times the layers bounds the cell:

    python bench/eplb_milp.py ds3-ep32 zipf1.2 "2 dead" --cell 1.01,1.02,1.03,1.04,1.05,1.08,1.1,1.13 --jobs 2

See docs/results.md ("Session 29") for what it was used to show.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import List, Optional

import numpy as np
import scipy.sparse as sp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


@dataclass
class LayerResult:
    """What the model says about one layer at busiest rank ``T``.

    ``best``: transfers of the best placement found (``None``: none found in time); ``bound``: no
    placement has fewer; ``placement``: ``[n, S]`` experts of the best one (``None`` if none)."""

    best: Optional[int]
    bound: float
    placement: Optional[np.ndarray]
    seconds: float
    status: str


def transfers(before: np.ndarray, after: np.ndarray) -> int:
    """Slots of ``after`` (``[n, S]``) whose expert was nowhere on that rank in ``before`` (``[n, S]``)."""
    return int(sum(int(np.isin(after[r], before[r][before[r] >= 0], invert=True).sum()) for r in range(after.shape[0])))


def busiest(w: np.ndarray, x: np.ndarray) -> float:
    """Busiest rank of ``x`` (``[n, S]``, every slot filled) under load ``w`` (``[E]``) split evenly over replicas."""
    cnt = np.bincount(x.ravel(), minlength=w.size)
    return float((w[x] / cnt[x]).sum(1).max())


def min_transfers(w: np.ndarray, before: np.ndarray, T: float, time_limit: float,
                  weigh: Optional[np.ndarray] = None, duplicates: bool = True,
                  start: Optional[np.ndarray] = None) -> LayerResult:
    """Fewest transfers of one layer with no rank above ``T``.

    Parameters:
        w: float64 ``[E]`` load of the layer (any positive scale). before: int64 ``[n, S]`` experts on
            the live ranks before (``-1`` empty). T: the busiest rank allowed, in the units of ``w``.
        time_limit: seconds for HiGHS. weigh: bool ``[E]``: experts whose fetched replicas are placed
            with their load; ``None`` (all): the exact model. With a subset, the others' fetched
            replicas are dropped (a relaxation: its optimum bounds the exact one from below).
        duplicates: whether a rank may hold an expert twice (the bench's metric allows it; our
            placements never do it).
        start: int64 ``[n, S]``, a placement with no rank above ``T`` for the solver to start from
            (ours): the best found is then never worse than it.

    Returns:
        :class:`LayerResult`; ``placement`` only for the exact model.
    """
    E = w.size
    n, S = before.shape
    N = n * S
    weigh = np.ones(E, dtype=bool) if weigh is None else weigh
    exact = bool(weigh.all())
    t0 = time.perf_counter()
    kmin = np.maximum(1, np.ceil(w / T * (1 - 1e-12))).astype(np.int64)  # a replica alone must fit a rank
    slack = N - int(kmin.sum())
    if slack < 0:
        return LayerResult(None, np.inf, None, 0.0, "infeasible: the heaviest experts need more slots than there are")
    ks = np.arange(slack + 1)
    # columns: y[e, j] (expert e has kmin[e] + j replicas), then f (kept: e was on r), then g (fetched)
    ny = E * (slack + 1)
    old = [np.unique(before[r][before[r] >= 0]) for r in range(n)]
    f_r = np.concatenate([np.full(o.size, r) for r, o in enumerate(old)]).astype(np.int64)
    f_e = np.concatenate(old).astype(np.int64)
    heavy = np.flatnonzero(weigh)
    g_r = np.repeat(np.arange(n), heavy.size)
    g_e = np.tile(heavy, n)
    pr = np.concatenate([f_r, g_r])  # (rank, expert) pairs, f pairs first
    pe = np.concatenate([f_e, g_e])
    P = pr.size
    col_pair = ny + np.arange(P)[:, None] * (slack + 1) + ks[None, :]  # [P, slack+1]
    col_y = np.arange(E)[:, None] * (slack + 1) + ks[None, :]  # [E, slack+1]
    nv = ny + P * (slack + 1)
    k_of = (kmin[:, None] + ks[None, :]).astype(np.float64)  # [E, slack+1]
    cost = np.zeros(nv)
    cost[col_pair[: f_r.size].ravel()] = -1.0
    blocks, lo, hi = [], [], []

    def add(m: sp.spmatrix, low, high) -> None:
        blocks.append(sp.csr_matrix(m, shape=(m.shape[0], nv)))
        lo.append(np.broadcast_to(np.asarray(low, np.float64), m.shape[0]))
        hi.append(np.broadcast_to(np.asarray(high, np.float64), m.shape[0]))

    # one count per expert; counts fill every live slot
    add(sp.csr_matrix((np.ones(ny), (np.repeat(np.arange(E), slack + 1), col_y.ravel())), shape=(E, nv)), 1, 1)
    add(sp.csr_matrix((k_of.ravel(), (np.zeros(ny, np.int64), col_y.ravel())), shape=(1, nv)), N, N)
    # replicas of (e, k) on all ranks == k * y[e, k] (<= for experts whose fetched replicas are dropped)
    rows = (pe[:, None] * (slack + 1) + ks[None, :]).ravel()
    link = sp.csr_matrix(
        (np.concatenate([np.ones(P * (slack + 1)), -k_of.ravel()]),
         (np.concatenate([rows, np.arange(ny)]), np.concatenate([col_pair.ravel(), col_y.ravel()]))),
        shape=(ny, nv))
    eq_rows = np.repeat(weigh, slack + 1)
    add(link[eq_rows], 0, 0)
    if (~eq_rows).any():
        add(link[~eq_rows], -np.inf, 0)
    # per rank: load <= T, slots <= S
    per = (w[pe][:, None] / k_of[pe]).ravel()
    rank_rows = np.repeat(pr, slack + 1)
    add(sp.csr_matrix((per, (rank_rows, col_pair.ravel())), shape=(n, nv)), -np.inf, T)
    add(sp.csr_matrix((np.ones(per.size), (rank_rows, col_pair.ravel())), shape=(n, nv)), -np.inf, S)
    if not duplicates:  # at most one replica of an expert per rank, whatever its count
        pair_of = np.unique(pr * E + pe, return_inverse=True)[1].ravel()  # [P] -> distinct (rank, expert)
        add(sp.csr_matrix((np.ones(per.size), (np.repeat(pair_of, slack + 1), col_pair.ravel()))), -np.inf, 1)
    x0 = None
    if start is not None:
        x0 = np.zeros(nv)
        cnt = np.bincount(start.ravel(), minlength=E)
        j = cnt - kmin
        x0[col_y[np.arange(E), j]] = 1.0
        on = np.zeros((n, E), np.int64)
        np.add.at(on, (np.repeat(np.arange(n), S), start.ravel()), 1)
        # kept pairs come first: a (rank, expert) present before is an f column, else a g column if weighed
        first = np.full(n * E, -1, np.int64)
        keys, at = np.unique(pr * E + pe, return_index=True)
        first[keys] = at
        first = first.reshape(n, E)
        for r, e in zip(*np.nonzero(on)):
            i = first[r, e]
            if i >= 0:
                x0[col_pair[i, j[e]]] = on[r, e]
    x, fun, dual, status = _solve(cost, sp.vstack(blocks).tocsc(), np.concatenate(lo), np.concatenate(hi), time_limit, x0)
    seconds = time.perf_counter() - t0
    if status == "Infeasible":  # proven: no placement at all has every rank under T
        return LayerResult(None, np.inf, None, seconds, status)
    bound = max(float(N + dual), 0.0) if np.isfinite(dual) else 0.0
    if x is None:
        return LayerResult(None, bound, None, seconds, status)
    x = np.round(x).astype(np.int64)
    best = int(round(N + fun))
    placement = None
    if exact:
        reps = x[col_pair].sum(1)  # replicas per (rank, expert) pair
        ranks = [np.repeat(pe[pr == r], reps[pr == r]) for r in range(n)]
        placement = np.stack(ranks)
        # check outside the solver: shape, every expert, the busiest rank, the transfers
        assert placement.shape == (n, S), placement.shape
        assert (np.bincount(placement.ravel(), minlength=E) > 0).all()
        assert busiest(w, placement) <= T * (1 + 1e-9)
        best = transfers(before, placement)
    return LayerResult(best, bound, placement, seconds, status)


def _solve(cost: np.ndarray, A: sp.csc_matrix, lo: np.ndarray, hi: np.ndarray, time_limit: float,
           x0: Optional[np.ndarray]):
    """Minimise ``cost @ x`` over integers ``x >= 0`` with ``lo <= A x <= hi`` (HiGHS; ``x0`` a start).
    Returns ``(x or None, objective, proven lower bound of the objective, status)``."""
    import highspy

    h = highspy.Highs()
    h.setOptionValue("output_flag", False)
    h.setOptionValue("time_limit", float(time_limit))
    h.setOptionValue("threads", 1)
    inf = highspy.kHighsInf
    lp = highspy.HighsLp()
    nv = cost.size
    lp.num_col_, lp.num_row_ = nv, A.shape[0]
    lp.col_cost_ = cost
    lp.col_lower_ = np.zeros(nv)
    lp.col_upper_ = np.full(nv, inf)
    lp.row_lower_ = np.where(np.isfinite(lo), lo, -inf)
    lp.row_upper_ = np.where(np.isfinite(hi), hi, inf)
    lp.a_matrix_.format_ = highspy.MatrixFormat.kColwise
    lp.a_matrix_.start_ = A.indptr
    lp.a_matrix_.index_ = A.indices
    lp.a_matrix_.value_ = A.data
    lp.integrality_ = [highspy.HighsVarType.kInteger] * nv
    h.passModel(lp)
    if x0 is not None:
        sol = highspy.HighsSolution()
        sol.col_value = list(x0)
        sol.value_valid = True
        h.setSolution(sol)
    h.run()
    info = h.getInfo()
    status = h.modelStatusToString(h.getModelStatus())
    dual = info.mip_dual_bound
    if info.primal_solution_status == 0:  # no feasible point
        return None, np.inf, dual, status
    return np.asarray(h.getSolution().col_value), info.objective_function_value, dual, status


def _show(w: np.ndarray, before: np.ndarray, x: np.ndarray) -> None:
    """Per rank: load (busiest = 1), experts fetched and dropped with their per-replica load."""
    cnt = np.bincount(x.ravel(), minlength=w.size)
    top = busiest(w, x)
    for r in range(x.shape[0]):
        old = set(before[r][before[r] >= 0].tolist())
        got = [e for e in x[r].tolist() if e not in old]
        gone = sorted(old - set(x[r].tolist()))
        fmt = lambda es: " ".join(f"{e}({w[e] / max(cnt[e], 1) / top:.2f})" for e in es)  # noqa: E731
        print(f"      rank {r:2d} load {(w[x[r]] / cnt[x[r]]).sum() / top:.3f}  in: {fmt(got) or '-'}  out: {fmt(gone) or '-'}")


def alike(w: np.ndarray, before: np.ndarray, dead: np.ndarray) -> bool:
    """Whether every layer is the same problem up to expert and rank names: per layer, the multiset of
    live ranks' (sorted) expert loads and of the dead ranks' ones. ``before``: ``[L, R, S]`` all ranks;
    ``dead``: bool ``[R]``. Exact where distinct experts have distinct loads (zipf)."""
    def sig(l: int) -> tuple:
        ranks = lambda mask: tuple(sorted(tuple(sorted(w[l][before[l, r]].round(12))) for r in np.flatnonzero(mask)))  # noqa: E731
        return ranks(~dead), ranks(dead)
    distinct = all(np.unique(w[l]).size == w.shape[1] for l in range(w.shape[0]))
    return distinct and all(sig(l) == sig(0) for l in range(1, w.shape[0]))


def cheapest_split(points_T: np.ndarray, points_cost: np.ndarray, budget: float) -> float:
    """Lower bound of one layer's transfers when layers may share a busiest-rank budget: the lower
    convex envelope of ``(T_k, cost_k)`` at ``budget`` (an LP over mixtures; ``inf`` costs, i.e. no
    placement there, are left out; ``inf`` if nothing fits)."""
    from scipy.optimize import linprog

    ok = np.isfinite(points_cost)  # an infeasible busiest rank is no option at any price
    K = int(ok.sum())
    if K == 0:
        return np.inf
    res = linprog(points_cost[ok], A_ub=points_T[ok][None, :], b_ub=[budget], A_eq=np.ones((1, K)), b_eq=[1.0],
                  bounds=(0, None), method="highs")
    return float(res.fun) if res.status == 0 else np.inf


def _cell_bound(args, cell) -> int:
    """``--cell``: a bound of the whole cell's transfers at the target's balance, for alike layers."""
    w, before, mine, shape, sc = cell.w, cell.before, cell.mine, cell.shape, cell.scenario
    o, u, allowed = cell.ours, cell.upstream, cell.allowed
    # the signature needs the dead ranks' experts too: the current placement, all ranks
    if not alike(w, cell.current.by_rank().numpy(), ~sc.after):
        print(f"error: the layers of {shape.name} / {sc.name} / {cell.family} differ; "
              "--cell needs alike layers (e.g. zipf loads)", file=sys.stderr)
        return 2
    n = before.shape[1]
    mean = 1.0 / n
    mults = np.array(sorted(float(m) for m in args.cell.split(",")))
    budget = mean / (0.99 * u.balancedness)  # per layer: every layer carries the same tokens
    per_layer_floor = o.lower / shape.layers  # orphans to place: any busiest rank
    Ts = mults * mean * (1 + 1e-9)
    starts = [mine[0] if busiest(w[0], mine[0]) <= T else None for T in Ts]
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        runs = list(pool.map(min_transfers, [w[0]] * Ts.size, [before[0]] * Ts.size, Ts,
                             [args.time_limit] * Ts.size, [None] * Ts.size, [not args.no_duplicates] * Ts.size, starts))
    bounds = [r.bound for r in runs]
    for m, r in zip(mults, runs):
        print(f"  busiest rank {m:.4f} x mean: none below {r.bound:.1f}, best found "
              f"{r.best if r.best is not None else 'none'} ({r.seconds:.0f} s, {r.status})", flush=True)
    # a layer whose busiest rank lies in [T_k, T_k+1) uses >= T_k of the budget and needs >= bound(T_k+1)
    pts_T = np.concatenate([[mean], mults * mean])
    pts_cost = np.concatenate([bounds, [per_layer_floor]])
    one = cheapest_split(pts_T, pts_cost, budget)
    print(f"  budget {budget / mean:.4f} x mean a layer (bal >= {0.99 * u.balancedness:.4f}): the cell needs "
          f">= {shape.layers * one:.0f} transfers (ours {o.movement}, the target allows {allowed:.0f})")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    import bench_eplb as B

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("shape", choices=sorted(B.SHAPES))
    ap.add_argument("family")
    ap.add_argument("scenario", choices=list(B.FAILURES))
    ap.add_argument("--layers", default="0", help="layers to solve, e.g. 0-3 (default 0)")
    ap.add_argument("--time-limit", type=float, default=60.0, help="seconds per layer and model")
    ap.add_argument("--relaxed", action="store_true", help="also solve the relaxation (a bound, often fast)")
    ap.add_argument("--weigh", type=float, default=0.1,
                    help="the relaxation weighs fetched replicas of experts above this x the busiest rank")
    ap.add_argument("--no-duplicates", action="store_true",
                    help="one replica of an expert per rank at most, as our placements keep it")
    ap.add_argument("--show", action="store_true", help="print each rank's fetched and dropped experts, ours and the model's")
    ap.add_argument("--cell", metavar="M1,M2,...",
                    help="bound the whole cell where its layers are alike: layer 0 solved at these busiest ranks "
                         "(multiples of the layer mean), then the cheapest split of the balance budget over layers")
    ap.add_argument("--jobs", type=int, default=1, help="--cell: solves run at once (one thread each)")
    args = ap.parse_args(argv)

    cell = B.cell_from_args(args)
    if cell is None:
        return 2
    w, before, mine = cell.w, cell.before, cell.mine
    print(f"{cell.header()} ({cell.allowed / cell.shape.layers:.1f} a layer on average)")
    if args.cell:
        return _cell_bound(args, cell)
    for l in B.layer_list(args.layers):
        T = busiest(w[l], mine[l]) * (1 + 1e-9)
        r = min_transfers(w[l], before[l], T, args.time_limit, duplicates=not args.no_duplicates, start=mine[l])
        dups = "" if r.placement is None else f", {sum(r.placement.shape[1] - np.unique(p).size for p in r.placement)} duplicates"
        line = (f"  layer {l}: ours {transfers(before[l], mine[l])}; exact model: best found "
                f"{r.best if r.best is not None else 'none'}{dups}, none below {r.bound:.1f} ({r.seconds:.0f} s, {r.status})")
        if args.relaxed:
            heavy = w[l] >= args.weigh * T
            rr = min_transfers(w[l], before[l], T, args.time_limit, weigh=heavy, duplicates=not args.no_duplicates)
            line += f"; relaxation: none below {rr.bound:.1f} ({rr.seconds:.0f} s)"
        print(line, flush=True)
        if args.show:
            for name, x in (("ours", mine[l]), ("model", r.placement)):
                if x is not None:
                    print(f"    {name}:")
                    _show(w[l], before[l], x)
    return 0


if __name__ == "__main__":
    sys.exit(main())
