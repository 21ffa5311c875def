"""plan_transfers: live sources only, local first, same node next, spread, orphans exact (pure)."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sglang_elastic.eplb import rebalance
from sglang_elastic.location import plan_transfers


@st.composite
def changes(draw):
    nodes, per_node = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    R = nodes * per_node
    S = draw(st.integers(1, 4))
    E = draw(st.integers(1, R * S))
    L = draw(st.integers(1, 3))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    old = rng.integers(-1, E, size=(L, R * S))
    live = rng.random(R) < 0.7
    new = rng.integers(0, E, size=(L, R * S))
    new.reshape(L, R, S)[:, ~live] = -1
    return old, new, live, S, per_node if draw(st.booleans()) else None


@settings(max_examples=300, deadline=None)
@given(changes())
def test_plan_covers_every_changed_slot_from_live_holders(case):
    old, new, live, S, rpn = case
    plan = plan_transfers(old, new, live, S, ranks_per_node=rpn)
    L, P = new.shape
    rank = np.arange(P) // S
    needed = {(l, p) for l in range(L) for p in range(P)
              if new[l, p] >= 0 and new[l, p] != old[l, p] and live[rank[p]]}
    got = [(int(l), int(p)) for l, _, _, _, p in plan.transfers.tolist()]
    got += [(int(l), int(p)) for l, _, _, p in plan.orphans.tolist()]
    assert sorted(got) == sorted(needed), "each changed slot exactly once"
    for (l, src, dst, e, p), s_slot in zip(plan.transfers.tolist(), plan.src_slots.tolist()):
        assert live[src] and s_slot // S == src and old[l, s_slot] == e, "source must be a live holder"
        assert dst == p // S and new[l, p] == e
        holders = {q // S for q in np.flatnonzero(old[l] == e) if live[q // S]}
        if dst in holders:
            assert src == dst, "local copy first"
        elif rpn is not None and any(h // rpn == dst // rpn for h in holders):
            assert src // rpn == dst // rpn, "same node next"
    for l, dst, e, p in plan.orphans.tolist():
        assert not any(live[q // S] for q in np.flatnonzero(old[l] == e)), "orphan only without a live holder"


def test_sends_are_spread_over_holders():
    # Expert 0 lives on ranks 0 and 1; ranks 2..5 all need it: two sends each, not four from one.
    old = np.array([[0, 1, 0, 2, 3, 4, 5, 6, 7, 8, 9, 10]])
    new = np.array([[0, 1, 0, 2, 0, 4, 0, 6, 0, 8, 0, 10]])
    plan = plan_transfers(old, new, np.ones(6, bool), 2)
    srcs = plan.transfers[:, 1].tolist()
    assert sorted(srcs) == [0, 0, 1, 1]


def test_dead_source_is_not_used_and_live_replica_is_not_an_orphan():
    """Regression for upstream SGLang: an expert whose chosen source died was reported missing and
    reloaded from disk although another live rank held it."""
    # Expert 3 on rank 1 (dies) and rank 2 (lives); rank 0 needs it.
    old = np.array([[0, 1, 3, 2, 3, 4]])
    new = np.array([[0, 3, -1, -1, 3, 4]])
    plan = plan_transfers(old, new, [1, 0, 1], 2)
    assert plan.orphans.numel() == 0
    rows = plan.transfers.tolist()
    assert [0, 2, 0, 3, 1] in rows  # from live rank 2, not dead rank 1
    assert all(r[1] != 1 for r in rows)


def test_orphans_after_failover_match_the_metric():
    from sglang_elastic.eplb import orphans
    from sglang_elastic.eplb.synthetic import synthetic_load

    w = synthetic_load("lognormal1", 4, 64, seed=1)
    p = rebalance(w, 8, 12)
    live = np.ones(8, bool)
    live[[1, 6]] = False
    q = rebalance(w, 8, 12, live_ranks=live, current=p)
    plan = plan_transfers(p, q, live, 12)
    lost = orphans(p, live)
    assert sorted({(l, e) for l, _, e, _ in plan.orphans.tolist()}) == sorted(map(tuple, lost.nonzero().tolist()))
    # Movement as the metric counts it = remote copies + restores (local copies are free).
    from sglang_elastic.eplb import movement
    assert movement(p, q) == plan.num_remote() + plan.orphans.shape[0]


def test_for_layers_and_bad_input():
    old = np.array([[0, 1, 2, 3], [0, 1, 2, 3]])
    new = np.array([[1, 0, 3, 2], [0, 1, 3, 2]])
    plan = plan_transfers(old, new, [1, 1], 2)
    assert plan.layers() == [0, 1]
    assert set(plan.for_layers([1]).transfers[:, 0].tolist()) == {1}
    with pytest.raises(ValueError, match="both be"):
        plan_transfers(old, new[:1], [1, 1], 2)
    with pytest.raises(ValueError, match="whole number of ranks"):
        plan_transfers(old, new, [1, 1], 3)
    with pytest.raises(ValueError, match="dead rank 1"):
        plan_transfers(old, new, [1, 0], 2)
    with pytest.raises(ValueError, match="one entry per rank"):
        plan_transfers(old, new, [1, 1, 1], 2)
