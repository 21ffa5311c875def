"""`sglang-elastic plan`: unreadable inputs named safely, outputs checked up front and written
atomically (all or none), sizes checked before work, `--json -`, `--version`."""
import json
import os

import numpy as np
import pytest
import torch

import sglang_elastic
from sglang_elastic.cli import main
from sglang_elastic.cli import plan as plan_mod
from sglang_elastic.cli.outputs import strict_json

L, E, R, S = 4, 16, 4, 6
SMALL = ["--ranks", str(R), "--slots-per-rank", str(S)]
UNSAFE_ADVICE = ("weights_only", "allow_pickle", "pickle.load", "trust")


def _run(capsys, *argv):
    rc = main(["plan", *map(str, argv)])
    out, err = capsys.readouterr()
    return rc, out, err


def _one_line_error(rc, out, err, rc_want=2):
    assert rc == rc_want, (out, err)
    assert err.startswith("sglang-elastic plan: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in out + err
    assert not any(a in err for a in UNSAFE_ADVICE), err
    return err


@pytest.fixture
def w(tmp_path):
    p = tmp_path / "w.npy"
    np.save(p, np.random.default_rng(0).integers(1, 100, (L, E)).astype(np.float64))
    return ["--load", str(p), *SMALL]


# ---------------------------------------------------------------------------- unreadable inputs
def test_corrupt_current_pt_is_one_line_naming_the_file(capsys, tmp_path, w):
    bad = tmp_path / "x.pt"
    bad.write_bytes(np.random.default_rng(1).bytes(3000))
    err = _one_line_error(*_run(capsys, *w, "--current", bad))
    assert f"{bad}: cannot read as .pt (not a PyTorch file" in err


def test_empty_pt_has_a_reason(capsys, tmp_path):
    (tmp_path / "e.pt").write_bytes(b"")
    err = _one_line_error(*_run(capsys, "--load", tmp_path / "e.pt", *SMALL))
    assert "e.pt: cannot read as .pt (the file is empty, 0 bytes)" in err


@pytest.mark.parametrize("flag", ["--load", "--current"])
def test_binary_json_is_named(capsys, tmp_path, w, flag):
    bad = tmp_path / "b.json"
    bad.write_bytes(b"\x00\xff\xfe binary")
    argv = ["--load", bad, *SMALL] if flag == "--load" else [*w, "--current", bad]
    err = _one_line_error(*_run(capsys, *argv))
    assert f"{bad}: cannot read as .json (binary data at byte" in err


def test_python_objects_are_refused_without_the_unsafe_advice(capsys, tmp_path):
    torch.save({"logical_count": torch.ones(L, E), "meta": np.float64(1.0)}, tmp_path / "obj.pt")
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    for name in ("obj.pt", "obj.npy"):
        err = _one_line_error(*_run(capsys, "--load", tmp_path / name, *SMALL))
        assert f"{name}: cannot read as" in err and "so they are not loaded" in err


def test_load_folder_says_folder(capsys, tmp_path):
    (tmp_path / "rec.pt").mkdir()
    err = _one_line_error(*_run(capsys, "--load", tmp_path / "rec.pt", *SMALL))
    assert f"{tmp_path / 'rec.pt'}: is a folder, not a file" in err


def test_negative_seed_names_seed(capsys):
    err = _one_line_error(*_run(capsys, "--synthetic", "hot", "--seed", "-1"))
    assert "argument --seed: expected a non-negative integer, got '-1'" in err


def test_huge_expert_count_is_refused_up_front_with_the_memory_it_needs(capsys, monkeypatch):
    called = []
    monkeypatch.setattr(plan_mod, "synthetic_load", lambda *a, **k: called.append(a))
    err = _one_line_error(*_run(capsys, "--synthetic", "lognormal1", "--experts", "1000000"))
    assert "planning 58 layers x 1000000 experts on 32 ranks x 35157 slots needs about" in err
    assert "TiB of memory" in err and "is available" in err
    assert not called  # nothing generated or planned


# ---------------------------------------------------------------------------- outputs
def test_two_outputs_on_one_path_are_refused_before_work(capsys, tmp_path, w):
    err = _one_line_error(*_run(capsys, *w, "--output", tmp_path / "x.pt", "--json", tmp_path / "x.pt"))
    assert f"--output and --json both write {tmp_path / 'x.pt'}" in err
    assert not (tmp_path / "x.pt").exists()


@pytest.mark.parametrize("argv, message", [
    (["--json", "{d}/nodir/r.json"], "--json {d}/nodir/r.json: folder '{d}/nodir' does not exist"),
    (["--json", "{d}"], "--json {d}: is a folder; give a file name"),
    (["--plot", "{d}/p.nosuchformat"], "format 'nosuchformat' is not supported"),
])
def test_bad_output_paths_are_refused_before_work(capsys, tmp_path, w, monkeypatch, argv, message):
    monkeypatch.setattr(plan_mod, "rebalance", lambda *a, **k: pytest.fail("planned before checking outputs"))
    err = _one_line_error(*_run(capsys, *w, *(a.format(d=tmp_path) for a in argv)))
    assert message.format(d=tmp_path) in err


def test_failing_plot_leaves_no_output_and_keeps_an_old_one(capsys, tmp_path, w, monkeypatch):
    out = tmp_path / "plan.pt"
    out.write_bytes(b"previous plan")

    def no_space(path, *a, **k):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(plan_mod, "_plot", no_space)
    err = _one_line_error(*_run(capsys, *w, "--output", out, "--json", tmp_path / "r.json",
                                "--plot", tmp_path / "p.png"))
    assert f"--plot {tmp_path / 'p.png'}: [Errno 28] No space left on device" in err
    assert out.read_bytes() == b"previous plan"
    assert sorted(os.listdir(tmp_path)) == ["plan.pt", "w.npy"]  # no temp file, no json, no plot


def test_non_finite_report_is_refused_and_leaves_no_output(capsys, tmp_path, w, monkeypatch):
    monkeypatch.setattr(plan_mod, "balancedness", lambda *a, **k: float("nan"))
    err = _one_line_error(*_run(capsys, *w, "--output", tmp_path / "p.json", "--json", tmp_path / "r.json"))
    assert "the report's balancedness_before is not a finite number" in err
    assert sorted(os.listdir(tmp_path)) == ["w.npy"]


def test_strict_json_names_the_field():
    with pytest.raises(ValueError, match=r"the report's a.b\[1\] is not a finite number"):
        strict_json({"a": {"b": [1.0, float("inf")]}})
    assert json.loads(strict_json({"x": np.float64(0.5), "y": np.arange(2)})) == {"x": 0.5, "y": [0, 1]}


def test_plot_without_suffix_reports_the_real_file(capsys, tmp_path, w):
    rc, out, err = _run(capsys, *w, "--plot", tmp_path / "p")
    assert rc == 0, err
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"
    assert f"plot          {tmp_path / 'p.png'}" in out


def test_json_dash_is_standard_output(capsys, tmp_path, w, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rc, out, err = _run(capsys, *w, "--json", "-")
    assert rc == 0, err
    rep = json.loads(out)  # stdout is the JSON alone
    assert rep["ranks"] == R and "balancedness" in err
    assert not (tmp_path / "-").exists()


def test_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"sglang-elastic {sglang_elastic.__version__}"
