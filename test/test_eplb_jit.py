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
    for dead, rpn, search in (([1, 17], None, "narrow"), ([1, 17, 30], None, "wide"), ([8, 9], 2, "narrow"),
                              ([3, 20], 4, "wide")):
        live = np.ones(32, dtype=bool)
        live[dead] = False
        ref, jit = both(w, 32, 9, live_ranks=live, ranks_per_node=rpn, current=cur, search=search)
        np.testing.assert_array_equal(ref, jit, err_msg=f"{family} dead={dead} rpn={rpn} {search}")
    ref, jit = both(drift(w, 0.3), 32, 9, current=cur)  # periodic rebalance: min_balance 1.0
    np.testing.assert_array_equal(ref, jit)


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems(with_current=True), st.sampled_from([None, 0.9, 0.95, 0.99, 0.998, 1.0]),
       st.sampled_from(["narrow", "wide"]), st.sampled_from([None, 0, 1, 3]))
def test_same_placements_property(prob, min_balance, search, max_swaps):
    assume(prob["current"] is not None)  # its current placement fits its live set
    ref, jit = both(prob["load"], prob["num_ranks"], prob["slots_per_rank"], live_ranks=prob["live_ranks"],
                    ranks_per_node=prob["ranks_per_node"], current=prob["current"], min_balance=min_balance,
                    search=search, max_swaps=max_swaps)
    np.testing.assert_array_equal(ref, jit)


def test_warm_up_compiles_then_placements_are_unchanged():
    from sglang_elastic.eplb import warm_up

    assert warm_up() >= 0.0
    w = synthetic_load("hot", 9, 48, seed=3)
    cur = rebalance(w, 10, 7)
    ref, jit = both(w, 10, 7, live_ranks=[r for r in range(10) if r != 4], current=cur)
    np.testing.assert_array_equal(ref, jit)
