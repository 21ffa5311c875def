"""rebalance()'s Python API checks: live ranks as mask or ids, load types, degenerate and huge loads."""
import os

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
import torch

from sglang_elastic.eplb import balancedness, layer_balancedness, movement, orphans, rebalance
from sglang_elastic.eplb.synthetic import synthetic_load


def test_int_live_ranks_are_rank_ids_and_bools_are_a_mask():
    w = synthetic_load("lognormal1", 2, 8, seed=1)
    # On 2 ranks, [0, 1] is both ranks alive (ids), never "rank 0 dead" (a 0/1 mask).
    both = rebalance(w, 2, 4, live_ranks=[0, 1])
    assert both.live_ranks.tolist() == [True, True]
    assert rebalance(w, 2, 8, live_ranks=[1]).live_ranks.tolist() == [False, True]
    assert rebalance(w, 2, 8, live_ranks=[False, True]).live_ranks.tolist() == [False, True]
    assert rebalance(w, 2, 8, live_ranks=torch.tensor([True, False])).live_ranks.tolist() == [True, False]
    assert rebalance(w, 2, 8, live_ranks=np.array([1])).live_ranks.tolist() == [False, True]
    assert rebalance(w, 2, 8, live_ranks=torch.tensor([0])).live_ranks.tolist() == [True, False]


@pytest.mark.parametrize("live, exc, message", [
    ([0, 0], ValueError, "lists rank 0 twice"),
    ([-1], ValueError, "rank id -1 outside"),
    ([True], ValueError, "one entry per rank"),
    ([[0, 1]], ValueError, "must be 1-D"),
    (["a"], TypeError, "bool mask or integer rank ids"),
])
def test_bad_live_ranks(live, exc, message):
    with pytest.raises(exc, match=message):
        rebalance(np.ones((1, 4)), 2, 4, live_ranks=live)


@pytest.mark.parametrize("load, exc, message", [
    (None, TypeError, "load is required, got None"),
    (True, TypeError, "real token counts"),
    (np.ones((2, 4), dtype=complex), TypeError, "real token counts"),
    (torch.ones(2, 4, dtype=torch.complex64), TypeError, "real token counts"),
    ([[1, 2], [3]], TypeError, "rectangular"),
    (np.array([["a", "b"]]), TypeError, "real token counts"),
    (np.full((2, 4), np.inf), ValueError, "NaN or infinite"),
])
def test_bad_load_types(load, exc, message):
    with pytest.raises(exc, match=message):
        rebalance(load, 2, 4)


def test_int_and_bfloat16_loads_are_accepted():
    w = np.arange(16).reshape(2, 8)
    a = rebalance(w, 2, 4)
    b = rebalance(torch.from_numpy(w).to(torch.bfloat16), 2, 4)
    assert torch.equal(a.phy2log, b.phy2log)


@pytest.mark.parametrize("value", [0.0, 1.0, 1e308])
def test_no_signal_moves_nothing_but_orphans(value):
    w = np.full((4, 64), value)
    healthy = rebalance(w, 8, 12)
    live = np.ones(8, dtype=bool)
    live[[2, 5]] = False
    p = rebalance(w, 8, 12, live_ranks=live, current=healthy)
    assert movement(healthy, p) == int(orphans(healthy, live).sum()) > 0
    # Same live set, no signal: nothing moves at all.
    assert movement(p, rebalance(w, 8, 12, live_ranks=live, current=p)) == 0


def test_huge_finite_loads_keep_metrics_finite_and_placement_scale_free():
    w = synthetic_load("lognormal1", 3, 32, seed=2)
    big = w / w.max() * 1.5e308
    p, q = rebalance(w, 4, 10), rebalance(big, 4, 10)
    assert torch.equal(p.phy2log, q.phy2log)  # scaled by a power of two or not: same decisions
    assert np.isfinite(balancedness(big, q)) and np.isfinite(layer_balancedness(big, q)).all()
    steps = np.stack([np.full((3, 32), 1e308)] * 3)  # summing steps would overflow without scaling
    r = rebalance(steps, 4, 10)
    assert balancedness(steps, r) == pytest.approx(balancedness(np.ones((3, 32)), r))


def test_metrics_never_nan_for_finite_input():
    p = rebalance(np.ones((2, 8)), 2, 4)
    for w in (np.zeros((2, 8)), np.full((2, 8), 1e308), np.eye(2, 8) * 1e308):
        assert np.isfinite(balancedness(w, p)) and np.isfinite(layer_balancedness(w, p)).all()


def _plugin_flags(monkeypatch):
    """The plugin's options module and an argparse parser with its flags, no option set in the env."""
    import argparse

    from sglang_elastic.sglang_plugin import options

    for k in list(os.environ):
        if k.startswith(options.ENV_PREFIX):
            monkeypatch.delenv(k)
    p = argparse.ArgumentParser()
    options.add_cli_args(p)
    return options, p


def test_plugin_min_balance_flag(monkeypatch):
    """--eplb-min-balance: parsed into PluginOptions; bad values (outside (0, 1], NaN) give one line."""
    options, p = _plugin_flags(monkeypatch)
    ns = p.parse_args(["--eplb-min-balance", "0.95"])
    assert options.export_from_namespace(ns) == {"SGLANG_ELASTIC_EPLB_MIN_BALANCE": "0.95"}
    assert options.current().eplb_min_balance == 0.95
    for bad in ("0", "1.5", "nan", "-0.2"):
        monkeypatch.setenv("SGLANG_ELASTIC_EPLB_MIN_BALANCE", bad)
        with pytest.raises(ValueError) as ei:
            options.current()
        assert str(ei.value) == (f"SGLANG_ELASTIC_EPLB_MIN_BALANCE={bad!r} (from --eplb-min-balance): "
                                 f"expected a number in (0, 1], got {bad!r}")
    monkeypatch.setenv("SGLANG_ELASTIC_EPLB_MIN_BALANCE", "0.9")
    monkeypatch.setenv("SGLANG_ELASTIC_EPLB_BALANCE_TOLERANCE", "0.1")
    with pytest.raises(ValueError, match="give --eplb-min-balance or --eplb-balance-tolerance, not both"):
        options.current()


def test_plugin_balance_reference_flag(monkeypatch):
    """--eplb-balance-reference: greedy or bound, into PluginOptions; anything else gives one line."""
    options, p = _plugin_flags(monkeypatch)
    ns = p.parse_args(["--eplb-balance-reference", "bound"])
    assert options.export_from_namespace(ns) == {"SGLANG_ELASTIC_EPLB_BALANCE_REFERENCE": "bound"}
    assert options.current().eplb_balance_reference == "bound"
    monkeypatch.setenv("SGLANG_ELASTIC_EPLB_BALANCE_REFERENCE", "upstream")
    with pytest.raises(ValueError) as ei:
        options.current()
    assert str(ei.value) == ("SGLANG_ELASTIC_EPLB_BALANCE_REFERENCE='upstream' (from --eplb-balance-reference): "
                             "expected greedy or bound, got 'upstream'")


def test_balance_reference_option_is_checked():
    w = synthetic_load("lognormal1", 2, 16, seed=1)
    cur = rebalance(w, 4, 6)
    with pytest.raises(ValueError, match=r"^balance_reference must be one of greedy, bound, got 'best'$"):
        rebalance(w, 4, 6, current=cur, balance_reference="best")


@settings(max_examples=200, deadline=None)
@given(st.integers(-1074, 1023), st.integers(0, 2**16))
def test_scale_to_unit_is_ldexp_at_every_magnitude(exp, seed):
    """The multiply path and ldexp give the same bits, subnormal and near-overflow tops included."""
    from sglang_elastic.eplb.algorithms.inputs import scale_to_unit

    rng = np.random.default_rng(seed)
    top = np.ldexp(1.0, exp) * rng.uniform(1.0, 1.999)
    w = rng.random((3, 7)) * top
    w[rng.integers(3), rng.integers(7)] = top
    want = np.ldexp(w, -np.frexp(w.max())[1])
    np.testing.assert_array_equal(scale_to_unit(w), want)
    assert 0.5 <= scale_to_unit(w).max() < 1.0
