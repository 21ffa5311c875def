"""`sglang-elastic plan`: inputs, report, output files, plot, and one-line errors for every bad input."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from sglang_elastic.cli import DEEPSEEK_V3_EXPERT_BYTES, main
from sglang_elastic.eplb import (
    Placement,
    balancedness,
    load_placement_file,
    movement,
    orphans,
    rebalance,
    save_placement_file,
)
from sglang_elastic.eplb.io import load_expert_load

L, E, R, S = 4, 16, 4, 6  # small shapes keep every run in milliseconds
SMALL = ["--ranks", str(R), "--slots-per-rank", str(S)]


def _run(capsys, *argv):
    rc = main(["plan", *map(str, argv)])
    out, err = capsys.readouterr()
    return rc, out, err


def _load(seed=0, steps=None):
    shape = (L, E) if steps is None else (steps, L, E)
    return np.random.default_rng(seed).integers(0, 1000, size=shape).astype(np.float64)


def _live(dead):
    live = np.ones(R, dtype=bool)
    live[list(dead)] = False
    return live


# ---------------------------------------------------------------------------- the built-in example
def test_builtin_example(capsys, tmp_path):
    rc, out, err = _run(capsys, "--json", tmp_path / "r.json")
    assert rc == 0, err
    first = out.splitlines()[0]
    assert "built-in example" in first and "58 layers x 256 experts" in first and "ranks 5 and 17 dead" in first
    for word in ("balancedness", "before", "after", "movement", "GB", "orphans", "rebalance", "ms", "elasticity_aware"):
        assert word in out
    rep = json.loads((tmp_path / "r.json").read_text())
    assert (rep["layers"], rep["experts"], rep["ranks"], rep["slots_per_rank"], rep["ranks_per_node"]) == (58, 256, 32, 9, 8)
    assert rep["dead_ranks"] == [5, 17] and rep["live_ranks"] == 30 and rep["current"] == "healthy"
    assert rep["algorithm"] == "elasticity_aware" and rep["expert_bytes"] == DEEPSEEK_V3_EXPERT_BYTES == 44040192
    # A healthy placement loses two ranks: orphans exist; the plan restores balance, moving a fraction of slots.
    assert rep["orphans"] > 0
    assert rep["balancedness_before"] > 0.99 and rep["balancedness_after"] > 0.98
    assert rep["balancedness_masked"] < rep["balancedness_after"]
    assert rep["orphans"] <= rep["movement_slots"] < 0.5 * 58 * 30 * 9
    assert rep["movement_bytes"] == rep["movement_slots"] * 44040192
    assert rep["rebalance_ms"] < 2000


def _console_command():
    script = Path(sys.executable).parent / "sglang-elastic"
    return [str(script)] if script.exists() else [sys.executable, "-m", "sglang_elastic.cli"]


def test_console_script_builtin_example():
    # Exactly the README's command (when the console script is installed next to the interpreter).
    res = subprocess.run([*_console_command(), "plan"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "built-in example" in res.stdout and "balancedness" in res.stdout
    assert "Traceback" not in res.stderr


def test_python_m_bad_input_is_one_line_exit_2(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a torch file")
    res = subprocess.run([sys.executable, "-m", "sglang_elastic.cli", "plan", "--load", str(bad)],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2
    assert res.stderr.startswith("sglang-elastic plan: error: ") and res.stderr.count("\n") == 1, res.stderr
    assert "bad.pt" in res.stderr and "Traceback" not in res.stderr


# ---------------------------------------------------------------------------- input formats
def test_sglang_recording_pt_and_output_round_trip(capsys, tmp_path):
    counts = torch.from_numpy(_load(steps=3)).to(torch.int64)  # as SGLang's stat-mode recorder dumps it
    rec = tmp_path / "expert_distribution_recorder_1700000000.0.pt"
    torch.save({"rank": 0, "logical_count": counts, "average_utilization_rate_over_window": None}, rec)
    w = load_expert_load(rec)
    assert w.dtype == np.float64 and w.shape == (L, E)
    np.testing.assert_array_equal(w, counts.sum(0).double().numpy())

    out_file, rep_file = tmp_path / "plan.json", tmp_path / "report.json"
    rc, out, err = _run(capsys, "--load", rec, *SMALL, "--dead", "2", "--output", out_file, "--json", rep_file)
    assert rc == 0, err
    assert "--init-expert-location" in out
    live = _live([2])
    got = load_placement_file(out_file, R, E, live_ranks=live).validate(live)
    want = rebalance(w, R, S, live_ranks=live)
    torch.testing.assert_close(got.phy2log, want.phy2log)
    rep = json.loads(rep_file.read_text())
    assert rep["balancedness_after"] == pytest.approx(balancedness(w, got))
    assert rep["current"] == "trivial"
    trivial = Placement.trivial(L, E, R, S)
    assert rep["balancedness_before"] == pytest.approx(balancedness(w, trivial))
    assert rep["orphans"] == int(orphans(trivial, live).sum())
    assert rep["movement_slots"] == movement(trivial, got)


def test_output_pt_round_trip(capsys, tmp_path):
    np.save(tmp_path / "w.npy", _load())
    rc, _, err = _run(capsys, "--load", tmp_path / "w.npy", *SMALL, "--dead", "0", "--output", tmp_path / "p.pt")
    assert rc == 0, err
    data = torch.load(tmp_path / "p.pt", weights_only=True)
    assert list(data) == ["physical_to_logical_map"]  # SGLang passes the keys to init_by_mapping
    live = _live([0])
    got = load_placement_file(tmp_path / "p.pt", R, E, live_ranks=live)
    torch.testing.assert_close(got.phy2log, rebalance(_load(), R, S, live_ranks=live).phy2log)


@pytest.mark.parametrize("steps", [None, 5])
def test_npy_input(capsys, tmp_path, steps):
    np.save(tmp_path / "w.npy", _load(steps=steps))
    want = _load(steps=steps)
    np.testing.assert_array_equal(load_expert_load(tmp_path / "w.npy"), want if steps is None else want.sum(0))
    rc, out, err = _run(capsys, "--load", tmp_path / "w.npy", *SMALL)
    assert rc == 0, err
    assert f"{L} layers x {E} experts" in out and "built-in" not in out


@pytest.mark.parametrize("as_dict", [False, True])
def test_json_input(capsys, tmp_path, as_dict):
    w = _load()
    (tmp_path / "w.json").write_text(json.dumps({"logical_count": w.tolist()} if as_dict else w.tolist()))
    np.testing.assert_array_equal(load_expert_load(tmp_path / "w.json"), w)
    rc, _, err = _run(capsys, "--load", tmp_path / "w.json", *SMALL, "--dead", "1,3", "--slots-per-rank", "8")
    assert rc == 0, err


def test_synthetic_and_deepseek_options(capsys, tmp_path):
    rc, out, err = _run(capsys, "--synthetic", "zipf1.2", "--layers", L, "--experts", E, "--seed", 3, *SMALL,
                        "--ranks-per-node", 2, "--algorithm", "deepseek", "--num-groups", 4, "--json", tmp_path / "r.json")
    assert rc == 0, err
    assert "deepseek (num_groups=4)" in out and "synthetic zipf1.2 (seed 3)" in out
    assert json.loads((tmp_path / "r.json").read_text())["options"] == {"num_groups": 4}


def test_current_file_movement_and_orphans(capsys, tmp_path):
    w = _load()
    healthy = rebalance(w, R, S)
    save_placement_file(healthy, tmp_path / "cur.json")
    np.save(tmp_path / "w.npy", w)
    rc, _, err = _run(capsys, "--load", tmp_path / "w.npy", "--ranks", R, "--current", tmp_path / "cur.json",
                      "--dead", 1, "--balance-tolerance", 0.05, "--expert-bytes", 1000, "--json", tmp_path / "r.json")
    assert rc == 0, err  # --slots-per-rank comes from the current placement
    rep = json.loads((tmp_path / "r.json").read_text())
    live = _live([1])
    want = rebalance(w, R, S, live_ranks=live, current=healthy, balance_tolerance=0.05)
    assert rep["slots_per_rank"] == S and rep["options"] == {"balance_tolerance": 0.05}
    assert rep["orphans"] == int(orphans(healthy, live).sum()) > 0
    assert rep["movement_slots"] == movement(healthy, want) and rep["movement_bytes"] == 1000 * rep["movement_slots"]
    assert rep["balancedness_after"] == pytest.approx(balancedness(w, want))
    # --current healthy computes the same starting point itself.
    rc, _, err = _run(capsys, "--load", tmp_path / "w.npy", *SMALL, "--current", "healthy", "--dead", 1,
                      "--balance-tolerance", 0.05, "--json", tmp_path / "r2.json")
    assert rc == 0, err
    rep2 = json.loads((tmp_path / "r2.json").read_text())
    assert rep2["movement_slots"] == rep["movement_slots"] and rep2["orphans"] == rep["orphans"]


def test_min_balance_is_passed_to_the_algorithm(capsys, tmp_path):
    """--min-balance reaches elasticity_aware as min_balance; the healthy "before" plan ignores it."""
    w = _load()
    np.save(tmp_path / "w.npy", w)
    rc, _, err = _run(capsys, "--load", tmp_path / "w.npy", *SMALL, "--current", "healthy", "--dead", 1,
                      "--min-balance", 0.9, "--json", tmp_path / "r.json")
    assert rc == 0, err
    rep = json.loads((tmp_path / "r.json").read_text())
    healthy = rebalance(w, R, S)
    want = rebalance(w, R, S, live_ranks=_live([1]), current=healthy, min_balance=0.9)
    assert rep["options"] == {"min_balance": 0.9}
    assert rep["movement_slots"] == movement(healthy, want)
    assert rep["balancedness_after"] == pytest.approx(balancedness(w, want))


@pytest.mark.parametrize("search", ["narrow", "wide", "both"])
def test_search_is_passed_to_the_algorithm(capsys, tmp_path, search):
    """--search reaches elasticity_aware as search=...; the healthy "before" plan ignores it."""
    w = _load()
    np.save(tmp_path / "w.npy", w)
    rc, _, err = _run(capsys, "--load", tmp_path / "w.npy", *SMALL, "--current", "healthy", "--dead", 1,
                      "--search", search, "--json", tmp_path / "r.json")
    assert rc == 0, err
    rep = json.loads((tmp_path / "r.json").read_text())
    healthy = rebalance(w, R, S)
    want = rebalance(w, R, S, live_ranks=_live([1]), current=healthy, search=search)
    assert rep["options"] == {"search": search}
    assert rep["movement_slots"] == movement(healthy, want)


def test_balance_reference_is_passed_to_the_algorithm(capsys, tmp_path):
    """--balance-reference bound reaches elasticity_aware; after a failure the default is greedy."""
    w = _load()
    np.save(tmp_path / "w.npy", w)
    healthy = rebalance(w, R, S)
    for ref in ("bound", None):
        args = ["--balance-reference", ref] if ref else []
        rc, _, err = _run(capsys, "--load", tmp_path / "w.npy", *SMALL, "--current", "healthy", "--dead", 1,
                          *args, "--json", tmp_path / "r.json")
        assert rc == 0, err
        rep = json.loads((tmp_path / "r.json").read_text())
        want = rebalance(w, R, S, live_ranks=_live([1]), current=healthy, balance_reference=ref or "greedy")
        assert rep["options"] == ({"balance_reference": ref} if ref else {})
        assert rep["movement_slots"] == movement(healthy, want)


def test_plot_writes_png(capsys, tmp_path):
    np.save(tmp_path / "w.npy", _load())
    rc, out, err = _run(capsys, "--load", tmp_path / "w.npy", *SMALL, "--dead", 2, "--current", "healthy",
                        "--plot", tmp_path / "ranks.png")
    assert rc == 0, err
    assert (tmp_path / "ranks.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_help_lists_every_option(capsys):
    assert main(["plan", "--help"]) == 0
    out = capsys.readouterr().out
    for opt in ("--load", "--synthetic", "--layers", "--experts", "--seed", "--ranks", "--slots-per-rank",
                "--ranks-per-node", "--dead", "--current", "--algorithm", "--balance-tolerance", "--num-groups",
                "--expert-bytes", "--output", "--plot", "--json"):
        assert opt in out


# ---------------------------------------------------------------------------- bad input
def _files(d: Path):
    """Malformed inputs, written once per test."""
    torch.save({"rank": 0, "counts": torch.ones(L, E)}, d / "wrong_keys.pt")
    np.save(d / "one_dim.npy", np.ones(E))
    np.save(d / "four_dim.npy", np.ones((2, 2, L, E)))
    np.save(d / "negative.npy", -_load())
    nan = _load()
    nan[1, 2] = np.nan
    np.save(d / "nan.npy", nan)
    (d / "junk.pt").write_bytes(b"\x00garbage")
    (d / "junk.npy").write_bytes(b"garbage")
    (d / "broken.json").write_text("{[1, 2")
    (d / "ragged.json").write_text("[[1, 2], [3]]")
    (d / "strings.json").write_text('[["a", "b"]]')
    (d / "empty.json").write_text("[]")
    (d / "w.csv").write_text("1,2\n")
    np.save(d / "w.npy", _load())
    healthy = rebalance(_load(), R, S)
    save_placement_file(Placement(healthy.phy2log[:2], R, E), d / "two_layers.json")
    (d / "big_ids.json").write_text(json.dumps({"physical_to_logical_map": (healthy.phy2log + 100).tolist()}))
    (d / "no_map.json").write_text(json.dumps({"logical_count": _load().tolist()}))
    missing = healthy.phy2log.clone()
    missing[missing == 7] = 8
    (d / "missing_expert.json").write_text(json.dumps({"physical_to_logical_map": missing.tolist()}))


W = ["--load", "{d}/w.npy", *SMALL]
BAD = [
    (["--load", "{d}/wrong_keys.pt"], "expected a 'logical_count' entry"),
    (["--load", "{d}/one_dim.npy"], "load must be [layers, experts] or [steps, layers, experts]"),
    (["--load", "{d}/four_dim.npy"], "load must be [layers, experts] or [steps, layers, experts]"),
    (["--load", "{d}/negative.npy"], "negative"),
    (["--load", "{d}/nan.npy"], "NaN"),
    (["--load", "{d}/junk.pt"], "junk.pt: cannot read as .pt"),
    (["--load", "{d}/junk.npy"], "junk.npy: cannot read as .npy"),
    (["--load", "{d}/broken.json"], "broken.json: cannot read as .json"),
    (["--load", "{d}/ragged.json"], "not a rectangular numeric array"),
    (["--load", "{d}/strings.json"], "not a rectangular numeric array"),
    (["--load", "{d}/empty.json"], "load must be [layers, experts]"),
    (["--load", "{d}/w.csv"], "unknown load file type '.csv'"),
    (["--load", "{d}/absent.npy"], "no such file"),
    ([*W, "--current", "{d}/two_layers.json"], "placement has shape [2, 24], expected [4, 24]"),
    ([*W, "--current", "{d}/big_ids.json"], "but the load has 16 experts"),
    ([*W, "--current", "{d}/no_map.json"], "expected a 'physical_to_logical_map' entry"),
    ([*W, "--current", "{d}/missing_expert.json"], "logical expert 7 has no replica"),
    ([*W, "--current", "{d}/absent.json"], "cannot read placement file"),
    ([*W, "--current", "{d}/w.npy"], "placement files must end in .json or .pt"),
    ([*W, "--dead", "4"], "dead rank 4 is out of range: ranks are 0..3"),
    ([*W, "--dead", "-1"], "dead rank -1 is out of range"),
    ([*W, "--dead", "1;2"], "argument --dead: expected a comma-separated list"),
    ([*W, "--dead", "0,1"], "2 live ranks x 6 slots = 12 slots cannot hold 16 logical experts"),
    ([*W, "--dead", "0,1,2,3"], "0 live ranks"),
    (["--load", "{d}/w.npy", "--ranks", "2", "--slots-per-rank", "4"], "2 ranks x 4 slots = 8 slots cannot hold 16"),
    ([*W, "--slots-per-rank", "17"], "exceeds the number of logical experts"),
    ([*W, "--ranks-per-node", "3"], "--ranks-per-node (3) must divide --ranks (4)"),
    ([*W, "--algorithm", "nope"], "argument --algorithm: invalid choice: 'nope'"),
    (["--synthetic", "nope"], "argument --synthetic: invalid choice: 'nope'"),
    ([*W, "--algorithm", "deepseek", "--balance-tolerance", "0.1"], "--balance-tolerance is not an option of the deepseek"),
    ([*W, "--num-groups", "4"], "--num-groups is not an option of the elasticity_aware"),
    ([*W, "--algorithm", "deepseek", "--num-groups", "3"], "num_groups (3) must divide"),
    ([*W, "--current", "healthy", "--dead", "1", "--balance-tolerance", "-1"], "balance_tolerance must be"),
    ([*W, "--balance-tolerance", "x"], "argument --balance-tolerance: invalid float value"),
    ([*W, "--min-balance", "0"], "argument --min-balance: expected a number in (0, 1], got '0'"),
    ([*W, "--min-balance", "1.5"], "argument --min-balance: expected a number in (0, 1], got '1.5'"),
    ([*W, "--min-balance", "nan"], "argument --min-balance: expected a number in (0, 1], got 'nan'"),
    ([*W, "--min-balance", "x"], "argument --min-balance: expected a number in (0, 1], got 'x'"),
    ([*W, "--min-balance", "0.9", "--balance-tolerance", "0.1"], "give --min-balance or --balance-tolerance, not both"),
    ([*W, "--algorithm", "deepseek", "--min-balance", "0.9"], "--min-balance is not an option of the deepseek"),
    ([*W, "--search", "deep"], "argument --search: invalid choice: 'deep'"),
    ([*W, "--algorithm", "deepseek", "--search", "wide"], "--search is not an option of the deepseek"),
    ([*W, "--balance-reference", "best"], "argument --balance-reference: invalid choice: 'best'"),
    ([*W, "--algorithm", "deepseek", "--balance-reference", "bound"],
     "--balance-reference is not an option of the deepseek"),
    ([*W, "--output", "{d}/plan.yaml"], "--output must end in .json or .pt"),
    ([*W, "--output", "{d}/absent_dir/plan.json"], "--output {d}/absent_dir/plan.json: "),
    ([*W, "--json", "{d}/absent_dir/r.json"], "--json {d}/absent_dir/r.json: "),
    ([*W, "--plot", "{d}/plot.nosuchformat"], "is not supported"),
    ([*W, "--layers", "3"], "--layers only go with --synthetic"),
    (["--experts", "3", "--seed", "1"], "--experts/--seed only go with --synthetic"),
    (["--load", "{d}/w.npy", "--synthetic", "hot"], "not allowed with argument --load"),
    ([*W, "--ranks", "0"], "argument --ranks: expected a positive integer, got '0'"),
    ([*W, "--expert-bytes", "-5"], "argument --expert-bytes: expected a non-negative integer"),
    ([*W, "--bogus"], "unrecognized arguments: --bogus"),
]


@pytest.fixture(scope="module")
def bad_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    _files(d)
    return d


@pytest.mark.parametrize("argv,message", BAD, ids=[" ".join(a).replace("{d}/", "") for a, _ in BAD])
def test_bad_input_one_line_exit_2(capsys, bad_dir, argv, message):
    rc, out, err = _run(capsys, *(a.format(d=bad_dir) for a in argv))
    assert rc == 2
    assert err.startswith("sglang-elastic plan: error: "), err
    assert err.count("\n") == 1 and err.endswith("\n"), err  # exactly one line
    assert message.format(d=bad_dir) in err
    assert "Traceback" not in err + out


def test_no_subcommand_is_one_line_exit_2(capsys):
    assert main([]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sglang-elastic: error: ") and err.count("\n") == 1
