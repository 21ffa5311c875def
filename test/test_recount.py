"""The count-changing start of the movement-aware EPLB (eplb/algorithms/recount.py): its choices
against brute force, its invariants, the compiled kernel against the numpy reference, and what it
buys on a small problem."""
import os

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from sglang_elastic.eplb import rebalance
from sglang_elastic.eplb.algorithms import recount, repair, repair_jit
from sglang_elastic.eplb.algorithms.slots import drop_duplicates
from sglang_elastic.eplb.metrics import balancedness, movement
from sglang_elastic.eplb.synthetic import synthetic_load

EXAMPLES = int(os.environ.get("SGLE_HYPOTHESIS_EXAMPLES", "100"))


def _layer(seed: int, n: int, S: int, E: int, dead: int):
    """A load ``[E]`` and a layer ``[n, S]`` (no expert twice on a rank) with rank ``dead``'s slots empty."""
    rng = np.random.default_rng(seed)
    w = rng.lognormal(0.0, float(rng.choice([0.5, 1.0, 2.0])), E)
    if seed % 4 == 0:
        w = np.round(w) + 1.0  # ties
    x = np.stack([rng.permutation(E)[:S] if S <= E else np.r_[rng.permutation(E), -np.ones(S - E, int)]
                  for _ in range(n)]).astype(np.int64)
    x[dead % n] = -1
    return w, x


def _loads(w, x):
    c = np.bincount(x[x >= 0], minlength=w.size)
    per = np.where(c > 0, w / np.maximum(c, 1), 0.0)
    return np.where(x >= 0, per[np.maximum(x, 0)], 0.0).sum(-1), c


@settings(max_examples=EXAMPLES, deadline=None)
@given(st.integers(0, 2**16), st.integers(2, 7), st.integers(1, 6), st.integers(1, 30), st.integers(0, 6))
def test_each_orphan_takes_the_slot_that_leaves_its_ranks_lowest(seed, n, S, E, dead):
    w, x = _layer(seed, n, S, E, dead)
    E = w.size
    before = x.copy()
    ok = recount.place_orphans(w, x)
    _, c = _loads(w, x)
    if not ok:  # every remaining slot held an expert's only replica
        return
    assert (c > 0).all(), "every expert has a replica"
    for r in range(n):
        held = x[r][x[r] >= 0]
        assert held.size == np.unique(held).size, "no expert twice on a rank"
    # Replay with brute force: each orphan (heaviest first) landed where the busiest of the ranks it
    # touches (the slot's, and the other holders of the expert it replaced) ends lowest. An orphan's
    # slot is never taken again (it is its only replica), so the state before orphan k is the start
    # with the earlier orphans in their final slots.
    y = before.copy()
    c0 = np.bincount(y[y >= 0], minlength=E)
    for f in sorted(np.flatnonzero(c0 == 0), key=lambda e: (-w[e], e)):
        scores = {}
        cnt = np.bincount(y[y >= 0], minlength=E)
        for r in range(n):
            for s in range(S):
                e = y[r, s]
                if e >= 0 and cnt[e] < 2:
                    continue
                z = y.copy()
                z[r, s] = f
                new, _ = _loads(w, z)
                others = [q for q in range(n) if q != r and e >= 0 and (z[q] == e).any()]
                scores[r, s] = new[[r] + others].max()
        (r, s), = zip(*np.nonzero(x == f))
        assert scores[r, s] <= min(scores.values()) * (1 + 1e-12), (f, scores[r, s], min(scores.values()))
        y[r, s] = f
    np.testing.assert_array_equal(x, y)


@settings(max_examples=EXAMPLES, deadline=None)
@given(st.integers(0, 2**16), st.integers(2, 7), st.integers(1, 6), st.integers(1, 30), st.floats(0.0, 1.2))
def test_count_trades_lower_the_busiest_rank_and_keep_every_expert(seed, n, S, E, aim_frac):
    w, x = _layer(seed, n, S, E, dead=n)  # nobody dead: the layer as it is
    E = w.size
    orig = np.zeros((n, E + 1), dtype=bool)
    orig[np.arange(n)[:, None], x + 1] = True
    orig[:, 0] = False
    aim = aim_frac * w.sum() / n
    tops = [_loads(w, x)[0].max()]
    counts0 = np.bincount(x[x >= 0], minlength=E)
    k = 0
    while recount.trade_counts(w, x, orig, aim, 1):  # one trade at a time
        k += 1
        load, c = _loads(w, x)
        assert load.max() < tops[-1], "each trade lowers the busiest rank"
        tops.append(load.max())
        assert (c[counts0 > 0] > 0).all(), "a trade never takes an expert's last replica"
        for r in range(n):
            held = x[r][x[r] >= 0]
            assert held.size == np.unique(held).size
        assert k <= n * S * 4
    # It stopped at the aim, or where no trade lowers the busiest rank (fetching at most one expert).
    assert tops[-1] <= aim or recount.trade_counts(w, x.copy(), orig, aim, 1) == 0


@settings(max_examples=EXAMPLES, deadline=None)
@given(st.integers(0, 2**16), st.integers(1, 4), st.integers(2, 8), st.integers(1, 7), st.integers(1, 40),
       st.booleans(), st.floats(0.0, 1.1))
def test_compiled_recount_is_the_reference(seed, L, n, S, E, orphans_first, aim_frac):
    rng = np.random.default_rng(seed)
    layers = [_layer(seed + l, n, S, E, int(rng.integers(0, n + 1))) for l in range(L)]
    w = np.stack([lw for lw, _ in layers])
    x = drop_duplicates(np.stack([lx for _, lx in layers]))
    aim = aim_frac * w.sum(1) / n
    want, ok_want = recount.recount(w, x, x, aim, orphans_first, n * S)
    rp, ok = repair_jit.recount_refine(w, x, x, 0, aim, orphans_first, n * S)
    np.testing.assert_array_equal(rp.x, want)
    np.testing.assert_array_equal(ok, ok_want)
    # The arrays the compiled swaps start from are the reference's (counts, per replica, rank loads).
    counts = np.stack([np.bincount(want[l][want[l] >= 0], minlength=w.shape[1]) for l in range(L)])
    per = w / np.maximum(counts, 1)
    np.testing.assert_array_equal(rp.per, per)
    np.testing.assert_array_equal(rp.load, np.where(want >= 0, per[np.arange(L)[:, None, None], want], 0.0).sum(-1))


def test_small_problems_also_try_changed_replica_counts(monkeypatch):
    # The 10x7 toy with a hot expert and one dead rank: the count-changing candidate finds a placement
    # with fewer transfers at the same promise (99 % of upstream's balance), as the exact solutions do.
    w = synthetic_load("hot", 4, 48, seed=0)
    p = rebalance(w, 10, 7)
    live = np.ones(10, dtype=bool)
    live[1] = False
    fresh = balancedness(w, rebalance(w, 10, 7, live_ranks=live, algorithm="deepseek"))
    with_counts = rebalance(w, 10, 7, live_ranks=live, current=p)
    monkeypatch.setattr(repair, "_RECOUNT", False)
    without = rebalance(w, 10, 7, live_ranks=live, current=p)
    assert balancedness(w, with_counts) >= 0.99 * fresh * (1 - 1e-12)
    assert movement(p, with_counts) < movement(p, without)
    monkeypatch.setattr(repair, "USE_JIT", False)  # the numpy path makes the same placement
    monkeypatch.setattr(repair, "_RECOUNT", True)
    np.testing.assert_array_equal(rebalance(w, 10, 7, live_ranks=live, current=p).phy2log.numpy(),
                                  with_counts.phy2log.numpy())
