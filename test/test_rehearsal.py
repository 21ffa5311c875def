"""`sglang-elastic rehearse`: config errors before anything starts, the default scenario end to end
on real processes (torch and NIXL transports), a frozen rank, and no child process outliving the
command, also after SIGINT."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from _logs import log_tail

from sglang_elastic.rehearsal.config import ConfigError, load_config, parse_scenario

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "sglang_elastic.cli", "rehearse"]


def _children(pid: int) -> set:
    """All descendants of ``pid`` (from /proc)."""
    kids, frontier = set(), {pid}
    while frontier:
        nxt = set()
        for d in os.listdir("/proc"):
            if not d.isdigit():
                continue
            try:
                stat = Path(f"/proc/{d}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            if ppid in frontier and int(d) not in kids:
                nxt.add(int(d))
        kids |= nxt
        frontier = nxt
    return kids


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _write(tmp_path, name, text):
    p = tmp_path / name
    p.write_bytes(text if isinstance(text, bytes) else text.encode())
    return str(p)


# ----------------------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("args, files, match", [
    (["--transport", "carrier-pigeon"], {}, "invalid choice: 'carrier-pigeon'"),
    (["--config", "{c}", "--scenario", "{s}"],
     {"c": "model: {experts: 8}\n", "s": "steps: 10\nevents:\n  - {step: 1, action: kill, rank: 0}\n"
      "  - {step: 2, action: kill, rank: 1}\n  - {step: 3, action: kill, rank: 2}\n"
      "  - {step: 4, action: kill, rank: 3}\n"}, "kill rank 3 leaves no live rank"),
    (["--scenario", "{s}"], {"s": "steps: 10\nevents:\n  - {step: 1, action: kill, rank: 0}\n"
                                  "  - {step: 2, action: kill, rank: 1}\n"}, "live slots < 32 experts"),
    (["--ranks", "2"], {}, "2 ranks x 12 slots = 24 live slots < 32 experts"),
    (["--scenario", "{s}"], {"s": "steps: 10\nevents: [ {step: 1, action: kill\n"}, "is not valid YAML"),
    (["--scenario", "{s}"], {"s": "steps: 10\nevents:\n  - {step: 1, action: explode, rank: 0}\n"},
     "unknown action 'explode'"),
    (["--scenario", "{s}"], {"s": "steps: 10\nevents:\n  - {step: 12, action: kill, rank: 0}\n"},
     r"step must be an integer in \[0, 10\)"),
    (["--scenario", "{s}"], {"s": "steps: 10\nevents:\n  - {step: 1, action: join, rank: 9}\n"},
     "rank ids are 0..3"),
    (["--scenario", "/nonexistent/scenario.yaml"], {}, "cannot read scenario file"),
    (["--config", "{c}"], {"c": "model: {experts: 0}\n"}, "model.experts must be >= 1"),
    (["--config", "{c}"], {"c": "cluster: {transport: 3}\n"}, "cluster.transport must be str"),
    # issue 19's list: phases, soak arguments, NaN/inf and absurd sizes, kill+join of one rank in a step,
    # duplicate keys, binary / non-UTF-8 files (named), unwritable outputs (before the run)
    (["--scenario", "{s}"], {"s": "steps: 10\nevents:\n  - {step: 1, action: kill, rank: 0, phase: dinner}\n"},
     "unknown phase 'dinner'; choose one of dispatch, combine, transfer, vote, rehome, fill, between"),
    (["--scenario", "{s}"], {"s": "steps: 10\nevents:\n  - {step: 1, action: join, rank: 0, phase: vote}\n"},
     "join takes no phase or layer"),
    (["--soak", "0"], {}, r"--soak: expected minutes in \(0, 1440\], got '0'"),
    (["--soak", "nan"], {}, r"--soak: expected minutes in \(0, 1440\], got 'nan'"),
    (["--soak", "1e9"], {}, r"--soak: expected minutes in \(0, 1440\]"),
    (["--soak", "1", "--seed", "-1"], {}, "--seed: expected a non-negative integer, got '-1'"),
    (["--seed", "3"], {}, "--seed goes with --soak"),
    (["--metrics-port", "70000"], {}, r"--metrics-port: expected a TCP port number in \[1, 65535\]"),
    (["--config", "{c}"], {"c": "cluster: {timeout_s: .nan}\n"}, "cluster.timeout_s must be a finite number, got nan"),
    (["--config", "{c}"], {"c": "cluster: {heartbeat_timeout_s: .inf}\n"},
     "cluster.heartbeat_timeout_s must be a finite number, got inf"),
    (["--config", "{c}"], {"c": "model: {hidden: 1000000000}\n"}, "model.hidden = 1000000000 is absurd"),
    (["--config", "{c}"], {"c": "model: {hidden: 16384, ffn: 16384}\n"}, "model too large for a local rehearsal"),
    (["--config", "{c}"], {"c": "cluster: {max_ranks: 5}\nscenario:\n  steps: 9\n  events:\n"
                                "    - {step: 2, action: kill, rank: 3}\n    - {step: 5, action: kill, rank: 2}\n"
                                "    - {step: 5, action: join, rank: 2}\n"},
     "step 5: rank 2 has two events"),
    (["--scenario", "{s}"], {"s": "steps: 10\nevents: []\nsteps: 40\n"},
     r"scenario file .*s.yaml: duplicate key 'steps' \(lines 1 and 3\)"),
    (["--scenario", "{s}"], {"s": b"steps: 10\x00\x01\x02"}, r"scenario file .*s.yaml is binary"),
    (["--config", "{c}"], {"c": b"model: {seed: 1}  # caf\xe9\n"}, r"config file .*c.yaml is not UTF-8 text"),
    (["--json", "/nonexistent/folder/out.json"], {}, "--json /nonexistent/folder/out.json: folder /nonexistent/folder does not exist"),
    (["--plot", "{d}"], {}, "--plot .*: is a folder, not a file"),
    (["--json", "{d}/x", "--plot", "{d}/x"], {}, "--json and --plot name the same file"),
    # --ranks keeps the config's max_ranks: rank ids stay 0..4 (the message says so), not 0..2
    (["--ranks", "3", "--config", "{c}"], {"c": "model: {experts: 8}\ncluster: {ranks: 4, max_ranks: 5}\n"
                                                  "scenario: {steps: 5, events: [{step: 1, action: join, rank: 5}]}\n"},
     "rank ids are 0..4"),
])
def test_bad_input_is_one_line_before_anything_starts(tmp_path, capsys, monkeypatch, args, files, match):
    """In-process (fast): the CLI's own main; nothing may start (Orchestrator.run would)."""
    import re

    from sglang_elastic.cli import main
    from sglang_elastic.rehearsal.orchestrator import Orchestrator

    def refuse(self):
        raise AssertionError("the rehearsal started")

    monkeypatch.setattr(Orchestrator, "run", refuse)
    paths = {k: _write(tmp_path, f"{k}.yaml", v) for k, v in files.items()}
    paths["d"] = str(tmp_path)
    argv = ["rehearse"] + [a.format(**paths) for a in args]
    assert main(argv) == 2
    out, err = capsys.readouterr()
    err = [l for l in err.splitlines() if l.strip()]
    assert len(err) == 1 and re.search(match, err[0]), err
    assert "rank log" not in out  # nothing ran


def test_scenario_parsing():
    s = parse_scenario({"steps": 5, "events": [{"step": 3, "action": "rebalance"}, {"step": 1, "action": "kill", "rank": 1}]})
    assert [(e.step, e.action, e.rank) for e in s.events] == [(1, "kill", 1), (3, "rebalance", None)]
    with pytest.raises(ConfigError, match="rebalance takes no rank"):
        parse_scenario({"steps": 5, "events": [{"step": 1, "action": "rebalance", "rank": 0}]})
    with pytest.raises(ConfigError, match="join rank 1, which is already live"):
        load_config(overrides=None, scenario=None).__class__.from_dict(
            {"scenario": {"steps": 5, "events": [{"step": 1, "action": "join", "rank": 1}]}})
    cfg = load_config()
    assert cfg.cluster.ranks == 4 and {e.action for e in cfg.scenario.events} >= {"rebalance", "kill", "join", "leave"}


# ----------------------------------------------------------------------------------------- end to end

def _rehearse(tmp_path, *extra, timeout=300):
    out, log = tmp_path / "r.json", tmp_path / "ranks.log"
    p = subprocess.Popen(CLI + ["--json", str(out), "--quiet", "--log", str(log), *extra], cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen = set()
    deadline = time.monotonic() + timeout
    while p.poll() is None and time.monotonic() < deadline:
        seen |= _children(p.pid)
        time.sleep(0.5)
    if p.poll() is None:
        p.kill()
    text = p.stdout.read()
    assert p.returncode == 0, text[-4000:] + log_tail(log)
    time.sleep(0.5)
    assert not [k for k in seen if _alive(k)], "a rank process outlived the command"
    return json.loads(out.read_text()), text, seen


@pytest.mark.parametrize("transport", ["torch", "nixl"])
def test_default_scenario_end_to_end(tmp_path, transport):
    data, text, seen = _rehearse(tmp_path, "--transport", transport)
    v = data["verdict"]
    assert v["mismatches"] == 0 and v["lost_requests"] == 0 and v["unrecovered_failures"] == 0
    assert v["degraded_mismatches"] == 0
    assert len(v["failover_interruption_s"]) == 1 and v["failover_interruption_s"][0] > 0
    assert len(v["scale_up_s"]) == 1 and v["scale_up_s"][0] > 0
    assert len(seen) >= 5  # 4 ranks and the joiner (plus multiprocessing helpers)
    phases = {r["phase"] for r in data["phases"]}
    assert {"warm-up", "rebalance", "failover", "scale-up", "scale-down", "steady"} <= phases
    steps = data["steps"]
    # Load balancing matters and the rebalance improves it.
    bal = [s["balancedness"] for s in steps]
    assert max(bal[8:12]) > bal[0] + 0.1
    # The killed rank's step had retried batches, served again in the next step.
    assert sum(s["batches_retried"] for s in steps) >= 1
    assert data["verdict"]["requests"] == sum(s["batches_done"] for s in steps)
    # Live ranks follow the scenario: 4 -> 3 (kill) -> 4 (join) -> 3 (leave).
    lives = [len(s["live"]) for s in steps]
    assert lives[0] == 4 and min(lives[12:22]) == 3 and lives[25] == 4 and lives[-1] == 3
    assert "results per phase" in text


def test_frozen_rank_is_found_by_timeouts(tmp_path):
    scen = _write(tmp_path, "freeze.yaml", "steps: 8\nevents:\n  - {step: 2, action: freeze, rank: 1}\n")
    data, text, _ = _rehearse(tmp_path, "--scenario", scen)
    v = data["verdict"]
    assert v["mismatches"] == 0 and v["lost_requests"] == 0 and v["unrecovered_failures"] == 0
    assert len(v["failover_interruption_s"]) == 1
    assert [len(s["live"]) for s in data["steps"]][-1] == 3


def test_sigint_stops_every_child(tmp_path):
    p = subprocess.Popen(CLI, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen = set()
    lines = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        line = p.stdout.readline()
        lines.append(line)
        seen |= _children(p.pid)
        if "step   2" in line:
            break
    assert len(seen) >= 4, "".join(lines)
    p.send_signal(signal.SIGINT)
    p.wait(timeout=60)
    rest = p.stdout.read()
    assert p.returncode == 130, rest
    assert "interrupted" in rest
    time.sleep(1.0)
    assert not [k for k in seen if _alive(k)], "a rank process outlived Ctrl-C"


def test_report_and_plot_without_processes(tmp_path):
    """The report's units, events, degraded modes and verdict; the plot's integer live-rank ticks and
    its verdict title (from records alone, no cluster)."""
    pytest.importorskip("matplotlib")
    from sglang_elastic.rehearsal import report
    from sglang_elastic.rehearsal.tracking import StepRecord

    recs = [StepRecord(step=i, phase="steady", live=[0, 1, 2] if i < 3 else [0, 1], t_start=float(i),
                       t_end=i + 0.5, tokens=64, batches_done=2, degraded_tokens=3 * (i == 3),
                       bytes_moved=2 ** 20 * i, latencies=[0.1]) for i in range(6)]
    summary = dict(failures=[dict(rank=2, kind="kill", phase="combine", interruption_s=0.25)],
                   events=[dict(step=3, action="kill", rank=2, phase="combine", armed_step=3)],
                   degraded_modes={"backups_uncovered": 4}, recoveries={}, requests=12, lost_requests=0,
                   log_path="/tmp/x.log")
    text = report.format_report(recs, summary, "t")
    assert "moved MiB" in text and "moved                15.0 MiB" in text
    assert "events executed      step 3: kill 2 @combine" in text
    assert "degraded modes       backups_uncovered 4" in text and "verdict              PASS" in text
    data = report.to_json(recs, summary, {})
    assert data["verdict"]["moved_mib"] == 15.0 and "bytes_moved" not in data["phases"][0]
    out = tmp_path / "p.png"
    import matplotlib.pyplot as plt

    seen = {}
    orig = plt.Figure.savefig

    def grab(fig, *a, **k):
        seen["title"] = fig._suptitle.get_text()
        seen["ticks"] = list(fig.axes[3].get_yticks())
        seen["labels"] = [ax.get_ylabel() for ax in fig.axes]
        return orig(fig, *a, **k)

    plt.Figure.savefig = grab
    try:
        report.plot_timeline(recs, summary, out)
    finally:
        plt.Figure.savefig = orig
    assert out.stat().st_size > 0 and not list(tmp_path.glob(".*tmp*"))
    assert seen["title"].startswith("sglang-elastic rehearse: PASS") and "degraded tokens 3" in seen["title"]
    assert all(float(t).is_integer() for t in seen["ticks"])
    assert "degraded tokens" in seen["labels"] and "live ranks" in seen["labels"]


def test_watched_updater_is_freed_without_a_garbage_collection():
    """FaultInjector.watch_updater marks where an updater is (its own calls included) without making
    the updater reference itself: an updater replaced on a join (backup rows, staging, threads' store
    connections) is freed when the rank drops it, not at a rare full garbage collection."""
    import gc
    import weakref

    from sglang_elastic.rehearsal.faults import FaultInjector

    fi = FaultInjector(0, None, lambda: 0)
    seen = []

    class Updater:
        def __init__(self):
            self.rows = bytearray(1 << 20)

        def step(self):
            seen.append(("step", fi._where))
            self.set_live([0])  # an internal call goes through the wrapper too
            return self

        def set_live(self, live):
            seen.append(("set_live", fi._where))

    u = fi.watch_updater(Updater())
    assert u.step() is u
    assert seen == [("step", "transfer"), ("set_live", "rehome")] and fi._where is None
    ref = weakref.ref(u)
    gc.disable()
    try:
        del u
        assert ref() is None, "the watched updater is kept alive by a reference cycle"
    finally:
        gc.enable()


def test_bad_updater_nice_is_one_line_before_anything_starts(capsys, monkeypatch):
    from sglang_elastic.cli import main
    from sglang_elastic.rehearsal.orchestrator import Orchestrator

    def refuse(self):
        raise AssertionError("the rehearsal started")

    monkeypatch.setattr(Orchestrator, "run", refuse)
    monkeypatch.setenv("SGLANG_ELASTIC_UPDATER_NICE", "-3")
    assert main(["rehearse"]) == 2
    out, err = capsys.readouterr()
    err = [l for l in err.splitlines() if l.strip()]
    assert err == ["sglang-elastic: error: SGLANG_ELASTIC_UPDATER_NICE must be an integer >= 0, got '-3'"] or (
        len(err) == 1 and "SGLANG_ELASTIC_UPDATER_NICE must be an integer >= 0, got '-3'" in err[0]), err
    assert "rank log" not in out
