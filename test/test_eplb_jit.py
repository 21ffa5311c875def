"""The compiled swap refinement (eplb/algorithms/refine_jit.py) makes exactly the numpy reference's decisions."""
import os

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from sglang_elastic.eplb import rebalance
from sglang_elastic.eplb.algorithms import refine_jit, repair
from sglang_elastic.eplb.synthetic import SYNTHETIC_LOADS, drift, synthetic_load

from test_elasticity_aware import problems

EXAMPLES = int(os.environ.get("SGLE_HYPOTHESIS_EXAMPLES", "100"))


def both(*args, **kwargs):
    """``rebalance(*args, **kwargs)`` with the numpy reference and with the compiled refinement."""
    assert refine_jit.AVAILABLE, "numba is a dependency: the compiled refinement must be importable"
    old = repair.USE_JIT
    try:
        repair.USE_JIT = False
        ref = rebalance(*args, **kwargs).phy2log.numpy()
        repair.USE_JIT = True
        jit = rebalance(*args, **kwargs).phy2log.numpy()
    finally:
        repair.USE_JIT = old
    return ref, jit


@pytest.mark.parametrize("family", sorted(SYNTHETIC_LOADS))
def test_same_placements_on_bench_families(family):
    # DS-V3 EP32x9 (16 of its 58 layers, to stay fast): dead ranks, a dead node, drift, both searches.
    w = synthetic_load(family, 16, 256, seed=0)
    cur = rebalance(w, 32, 9)
    for dead, rpn, search in (([1, 17], None, "both"), ([1, 17, 30], None, "wide"), ([8, 9], 2, "both"),
                              ([2, 5], None, "narrow"), ([3, 20], 4, "wide")):
        live = np.ones(32, dtype=bool)
        live[dead] = False
        ref, jit = both(w, 32, 9, live_ranks=live, ranks_per_node=rpn, current=cur, search=search)
        np.testing.assert_array_equal(ref, jit, err_msg=f"{family} dead={dead} rpn={rpn} {search}")
    ref, jit = both(drift(w, 0.3), 32, 9, current=cur)  # periodic rebalance: min_balance 1.0
    np.testing.assert_array_equal(ref, jit)


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems(with_current=True), st.sampled_from([None, 0.9, 0.95, 0.99, 0.998, 1.0]),
       st.sampled_from(["narrow", "wide", "both", "both, every layer"]), st.sampled_from([None, 0, 1, 3]))
def test_same_placements_property(prob, min_balance, search, max_swaps):
    assume(prob["current"] is not None)  # its current placement fits its live set
    gates = repair._SMALL, repair._FEW_RANKS, repair._RETRY
    try:
        if search == "both, every layer":  # the large problems' path (wide again) on every layer
            search, (repair._SMALL, repair._FEW_RANKS, repair._RETRY) = "both", (0, 0, -1)
        ref, jit = both(prob["load"], prob["num_ranks"], prob["slots_per_rank"], live_ranks=prob["live_ranks"],
                        ranks_per_node=prob["ranks_per_node"], current=prob["current"], min_balance=min_balance,
                        search=search, max_swaps=max_swaps)
    finally:
        repair._SMALL, repair._FEW_RANKS, repair._RETRY = gates
    np.testing.assert_array_equal(ref, jit)


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems())
def test_same_placements_from_scratch_property(prob):
    """From scratch (no ``current``): the compiled conflict removal and short refinement swap as numpy does."""
    ref, jit = both(prob["load"], prob["num_ranks"], prob["slots_per_rank"], live_ranks=prob["live_ranks"],
                    ranks_per_node=prob["ranks_per_node"])
    np.testing.assert_array_equal(ref, jit)


@pytest.mark.parametrize("rpn", [None, 2, 3])
@pytest.mark.parametrize("seed", range(4))
def test_compiled_conflict_removal_is_the_reference(rpn, seed):
    """Random assignments full of rank duplicates and node conflicts: the kernel makes numpy's swaps."""
    from sglang_elastic.eplb.algorithms.conflicts import fix_conflicts_reference
    from sglang_elastic.eplb.algorithms.refine_jit import fix_conflicts_compiled
    from sglang_elastic.eplb.algorithms.slots import SlotState

    rng = np.random.default_rng(seed)
    L, n, S, E = 6, 6, 4, 9
    x = rng.integers(0, E, size=(L, n, S))  # ~2 repeats a rank, most experts doubled on a node
    per = rng.lognormal(0, 1, size=(L, E))
    per[:, 0] = per[:, 1]  # equal costs: the first of tied candidates must win in both
    node_of = None if rpn is None else np.arange(n) // rpn
    a, b = SlotState(x.copy(), per, node_of), SlotState(x.copy(), per, node_of)
    assert a.duplicates().any()
    fix_conflicts_reference(a, n * S)
    fix_conflicts_compiled(b, n * S)
    np.testing.assert_array_equal(a.x, b.x)
    np.testing.assert_array_equal(a.present, b.present)
    if node_of is not None:
        np.testing.assert_array_equal(a.node_cnt, b.node_cnt)
    assert (b.x != x).any() and b.duplicates().sum() < SlotState(x, per, None).duplicates().sum()


@settings(max_examples=EXAMPLES, deadline=None)
@given(st.integers(1, 5), st.integers(1, 12), st.integers(1, 6), st.integers(0, 2**16), st.booleans())
def test_compiled_packings_are_the_reference(L, n, S, seed, ties):
    """Differencing and LPT from scratch: the kernels assign as numpy does, ties in loads included."""
    from sglang_elastic.eplb.algorithms.counts import replica_counts
    from sglang_elastic.eplb.algorithms.packing import lpt_assign_reference, scratch_assign_reference
    from sglang_elastic.eplb.algorithms.refine_jit import lpt_assign_compiled, scratch_assign_compiled

    rng = np.random.default_rng(seed)
    E = int(rng.integers(S, n * S + 1))  # a rank never needs an expert twice
    w = rng.integers(1, 4, size=(L, E)).astype(float) if ties else rng.lognormal(0, 1.5, size=(L, E))
    counts = replica_counts(w, n * S, n)
    per = w / counts
    np.testing.assert_array_equal(scratch_assign_reference(per, counts, n, S), scratch_assign_compiled(per, counts, n, S))
    np.testing.assert_array_equal(lpt_assign_reference(per, counts, n, S), lpt_assign_compiled(per, counts, n, S))


@settings(max_examples=EXAMPLES, deadline=None)
@given(st.integers(1, 4), st.integers(1, 20), st.integers(1, 8), st.integers(1, 8), st.integers(0, 2**16),
       st.booleans())
def test_compiled_node_order_is_the_reference(L, n, S, nodes, seed, empty):
    """The from-scratch node order: the kernel sends each rank's content where numpy does, with
    experts twice on a rank (counted once per content, as numpy's ``+=``) and empty slots."""
    from sglang_elastic.eplb.algorithms.packing import order_ranks_by_node_reference
    from sglang_elastic.eplb.algorithms.refine_jit import order_ranks_by_node_compiled

    rng = np.random.default_rng(seed)
    E = int(rng.integers(1, 2 * n * S + 1))
    x = rng.integers(-1 if empty else 0, E, size=(L, n, S))
    node_of = np.unique(rng.integers(0, min(nodes, n), n), return_inverse=True)[1].astype(np.int64)
    np.testing.assert_array_equal(order_ranks_by_node_reference(x, node_of), order_ranks_by_node_compiled(x, node_of))


def test_warm_up_compiles_then_placements_are_unchanged():
    from sglang_elastic.eplb import warm_up, warm_up_in_background
    from sglang_elastic.eplb.algorithms import jit_kernels

    t = warm_up_in_background("test-warm-up")
    assert t.daemon and t.name == "test-warm-up"
    t.join(timeout=600)
    assert not t.is_alive()
    # every kernel a rebalance runs, from scratch and from a current placement, is ready
    for k in ("_repair_refine_all", "_refine_all", "_scratch_all", "_conflicts_all", "_assign_all",
              "_lpt_all"):
        assert getattr(jit_kernels, k).signatures, k
    assert warm_up() >= 0.0
    w = synthetic_load("hot", 9, 48, seed=3)
    cur = rebalance(w, 10, 7)
    ref, jit = both(w, 10, 7, live_ranks=[r for r in range(10) if r != 4], current=cur)
    np.testing.assert_array_equal(ref, jit)


@settings(max_examples=EXAMPLES, deadline=None)
@given(st.integers(1, 140), st.integers(0, 40), st.integers(0, 2**16), st.floats(0.0, 1.2),
       st.sampled_from([0.0, 0.2]))
def test_choose_stops_compiled_search_is_the_reference(L, K, seed, slack, p_inf):
    """choose_stops' compiled bisection picks exactly what the numpy loop picks (sums added as numpy
    adds them); over 128 finite layers both run numpy."""
    from sglang_elastic.eplb.algorithms.repair import choose_stops

    rng = np.random.default_rng(seed)
    maxes = np.sort(rng.uniform(1.0, 2.0, size=(K + 1, L)), axis=0)[::-1]
    maxes[:, rng.random(L) < 0.2] = np.round(maxes[:, :1], 2)  # ties: alike layers
    fetched = np.cumsum(rng.integers(-1, 3, size=(K + 1, L)), axis=0)
    missed = np.flatnonzero(rng.random(L) < 0.3)
    fresh_max = rng.uniform(1.0, 2.0, size=missed.size)
    fresh_cost = rng.integers(0, 50, size=missed.size)
    target = np.full(L, maxes.min(0).mean() + slack * (maxes[0].mean() - maxes.min(0).mean()))
    target[rng.random(L) < p_inf] = np.inf
    old = repair.USE_JIT
    try:
        repair.USE_JIT = False
        ref = choose_stops(maxes, fetched, target, missed, fresh_max, fresh_cost)
        repair.USE_JIT = True
        jit = choose_stops(maxes, fetched, target, missed, fresh_max, fresh_cost)
    finally:
        repair.USE_JIT = old
    np.testing.assert_array_equal(ref[0], jit[0])
    np.testing.assert_array_equal(ref[1], jit[1])


@settings(max_examples=EXAMPLES, deadline=None)
@given(st.integers(1, 5), st.integers(2, 6), st.integers(1, 4), st.integers(0, 2**16),
       st.sampled_from(["none", "dup", "missing", "live_empty", "dead_used", "range", "dead_rank"]),
       st.booleans())
def test_compiled_output_check_agrees_with_validate(L, R, S, seed, defect, allow_dup):
    """rebalance's compiled output check passes exactly the placements Placement.validate passes."""
    import torch

    from sglang_elastic.eplb import Placement, PlacementError
    from sglang_elastic.eplb.algorithms import repair_jit

    rng = np.random.default_rng(seed)
    live = np.ones(R, dtype=bool)
    if R > 2:
        live[rng.integers(R)] = False
    E = max(1, int(live.sum()) * S - int(rng.integers(0, S + 1)))
    x = np.full((L, R, S), -1, dtype=np.int64)
    for l in range(L):
        ids = np.concatenate([rng.permutation(E), rng.integers(0, E, size=int(live.sum()) * S - E)])
        x[l, live] = ids.reshape(-1, S)
    l, r, s = rng.integers(L), rng.choice(np.flatnonzero(live)), rng.integers(S)
    if defect == "dup" and S > 1:
        x[l, r, s] = x[l, r, (s + 1) % S]
    elif defect == "missing":
        x[l, live] = np.where(x[l, live] == x[l, r, s], (x[l, r, s] + 1) % E, x[l, live]) if E > 1 else x[l, live]
    elif defect == "live_empty":
        x[l, r, s] = -1
    elif defect == "dead_used" and not live.all():
        x[l, np.flatnonzero(~live)[0], 0] = 0
    elif defect == "range":
        x[l, r, s] = E
    elif defect == "dead_rank":
        x[:, r] = -1
    p = Placement(torch.from_numpy(x.reshape(L, R * S)), R, E)
    try:
        p.validate(live, allow_duplicates=allow_dup)
        ok = True
    except PlacementError:
        ok = False
    assert repair_jit.valid(p.phy2log.numpy(), R, E, live, allow_dup) == ok


def test_same_placements_from_a_current_placement_with_duplicates():
    # A foreign placement may hold an expert twice on a rank: the later copy is dropped on both paths.
    w = synthetic_load("lognormal1", 12, 64, seed=5)
    cur = rebalance(w, 8, 10).phy2log.numpy().copy().reshape(12, 8, 10)
    cur[:, 2, 3] = cur[:, 2, 7]
    cur[::2, 5, 0] = cur[::2, 5, 9]
    for dead in ([], [4]):
        live = np.ones(8, dtype=bool)
        live[dead] = False
        cur_d = cur.copy()
        cur_d[:, ~live] = -1
        ref, jit = both(w, 8, 10, live_ranks=live, current=cur_d.reshape(12, 80))
        np.testing.assert_array_equal(ref, jit)


@settings(max_examples=EXAMPLES, deadline=None)
@given(st.integers(1, 6), st.sampled_from([7, 48, 128, 129, 256, 384, 1000]), st.integers(1, 40),
       st.one_of(st.integers(1, 12), st.sampled_from([127, 128, 129, 200, 300])),
       st.sampled_from(sorted(SYNTHETIC_LOADS) + ["zero", "flat"]), st.sampled_from([0.9, 0.99, 1.0]),
       st.integers(0, 2**16), st.sampled_from(["greedy", "bound"]), st.booleans())
def test_compiled_targets_are_the_reference(L, E, n, S, family, min_balance, seed, reference, with_keep):
    """balance_target and replica_bound, compiled: the same floats (sums in numpy's order), with
    either balance reference (the greedy one: the same packing, sorted by a radix sort), with and
    without the survivors' heaviest replica (``keep``)."""
    from sglang_elastic.eplb.algorithms import repair_jit
    from sglang_elastic.eplb.algorithms.elasticity_aware import _SCRATCH_SLACK, balance_target
    from sglang_elastic.eplb.algorithms.inputs import scale_to_unit
    from sglang_elastic.eplb.algorithms.repair import replica_bound

    S = min(S, E)
    assume(n * S >= E)
    if family == "zero":
        weight = np.zeros((L, E))
    elif family == "flat":
        weight = np.full((L, E), 3.0)
    else:
        weight = scale_to_unit(np.asarray(synthetic_load(family, L, E, seed=seed), dtype=np.float64))
    w = weight + (weight.sum(1, keepdims=True) / (E * 1e9) + 1e-300)
    # keep: around each layer's heaviest replica, so that it binds in some layers and not in others
    keep = w.max(1) / n * np.random.default_rng(seed).uniform(0.5, 3.0, L) if with_keep else None
    target = balance_target(weight, n, S, min_balance, reference)
    bound = replica_bound(w, n, S, target, min_balance, keep)
    t_jit, b_jit = repair_jit.targets(weight, w, n, S, min_balance, 1 + _SCRATCH_SLACK, reference, keep)
    np.testing.assert_array_equal(target, t_jit)
    np.testing.assert_array_equal(bound, b_jit)


def test_compiled_sums_add_as_numpy_does():
    """The kernels' float sums are numpy's, bit for bit (pairwise blocks of 8, halving above 128)."""
    from sglang_elastic.eplb.algorithms.jit_kernels import _rank_sum
    from sglang_elastic.eplb.algorithms.jit_sums import _sum_pairwise

    rng = np.random.default_rng(0)
    for n in list(range(1, 300)) + [383, 384, 385, 512, 1000, 1024, 4097]:
        v = rng.lognormal(size=(4, n)) * rng.random((4, 1))
        assert [_sum_pairwise(row) for row in v] == v.sum(1).tolist(), n
        ids = np.where(rng.random(n) < 0.2, -1, rng.integers(0, n, size=n))
        assert _rank_sum(ids, v[0]) == np.where(ids >= 0, v[0][np.maximum(ids, 0)], 0.0).sum(), n


@pytest.mark.parametrize("L, E, R, S, dead, rpn", [(3, 260, 3, 130, [1], None), (2, 600, 2, 300, [], None),
                                                   (3, 400, 4, 140, [0], 2)])
def test_ranks_of_more_than_128_slots_are_compiled_as_the_reference(L, E, R, S, dead, rpn):
    """Ranks of more than 128 slots (e.g. 512 experts over 4 ranks): rank loads and the lightest
    replicas' sums add in numpy's halves above 128, so the kernels run there too (before, such
    shapes took the numpy path: EP4 x 130 after a failure 263 ms, now 9 ms), with the same placements
    from scratch, after a failure (every search) and for a periodic rebalance."""
    for family in ("lognormal1", "zipf1.2", "hot"):
        w = synthetic_load(family, L, E, seed=1)
        ref, jit = both(w, R, S, ranks_per_node=rpn)
        np.testing.assert_array_equal(ref, jit)
        cur = rebalance(w, R, S, ranks_per_node=rpn)
        live = np.ones(R, dtype=bool)
        live[dead] = False
        for search in ("both", "narrow", "wide"):
            ref, jit = both(w, R, S, live_ranks=live, ranks_per_node=rpn, current=cur, search=search)
            np.testing.assert_array_equal(ref, jit, err_msg=f"{family} {search}")
        ref, jit = both(drift(w, 0.3), R, S, ranks_per_node=rpn, current=cur)
        np.testing.assert_array_equal(ref, jit)


@pytest.mark.parametrize("family", ["lognormal0.5", "lognormal1", "dirichlet0.3"])
@pytest.mark.parametrize("n, S, E", [(30, 9, 256), (15, 10, 128), (9, 7, 48)])
def test_greedy_reference_is_upstreams_busiest_rank(family, n, S, E):
    """The greedy balance reference is the busiest rank of DeepSeek's greedy placement (our rewrite,
    slot for slot upstream's), compiled or not."""
    from sglang_elastic.eplb import rebalance
    from sglang_elastic.eplb.algorithms import repair_jit
    from sglang_elastic.eplb.algorithms.counts import greedy_busiest
    from sglang_elastic.eplb.metrics import rank_load

    w = np.asarray(synthetic_load(family, 6, E, seed=3), dtype=np.float64)
    up = rebalance(w, n, S, algorithm="deepseek")
    ref = greedy_busiest(w, n, S)
    np.testing.assert_allclose(ref, rank_load(w, up).max(1), rtol=1e-12)
    target, _ = repair_jit.targets(w, w, n, S, 1.0, 1.0, "greedy")
    np.testing.assert_array_equal(target, np.maximum(ref, target))  # the bound may be above it, never below
