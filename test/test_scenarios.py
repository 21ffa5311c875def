"""The fault matrix (configs/scenarios/*.yaml) end to end on real processes, in a short form (a
narrower model; the same cluster, events and phases), and the soak and metrics of the rehearsal.

Each scenario must: execute exactly its events (kills and freezes landing at their phase and step),
deliver no wrong output, lose no request, and recover from every fault. Timings are not asserted
(bench/bench_failover.py measures them)."""
import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from _logs import log_tail
import yaml

from sglang_elastic.rehearsal.config import SCENARIO_DIR, load_config

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "sglang_elastic.cli", "rehearse"]
SCENARIOS = sorted(p.stem for p in SCENARIO_DIR.glob("*.yaml"))
# Every scenario on torch; each other transport on the cases where its own waits matter most.
MATRIX = [(s, "torch") for s in SCENARIOS if s != "total_outage"] + [
    ("total_outage", "nixl"), ("kill_dispatch", "nixl"), ("kill_transfer", "nixl"),
    ("kill_combine", "mooncake"), ("kill_vote", "mooncake")]


def _short(tmp_path: Path, name: str, transport: str) -> Path:
    """The scenario with a narrow model (the short CI form)."""
    d = yaml.safe_load((SCENARIO_DIR / f"{name}.yaml").read_text())
    d.setdefault("model", {}).update(hidden=64, ffn=64)
    d.setdefault("cluster", {}).update(transport=transport, tokens_per_rank=16)
    sc = d["scenario"]
    sc["steps"] = min(sc["steps"], max(e["step"] for e in sc["events"]) + 8)   # room to recover
    out = tmp_path / f"{name}.yaml"
    out.write_text(yaml.safe_dump(d))
    return out


def _run(args, timeout=400):
    p = subprocess.run(CLI + args, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    return p


def test_every_scenario_is_in_the_matrix():
    assert set(SCENARIOS) == {s for s, _ in MATRIX} and len(SCENARIOS) >= 14
    for s in SCENARIOS:  # and each is a valid config on its own
        load_config(SCENARIO_DIR / f"{s}.yaml")


@pytest.mark.parametrize("name, transport", MATRIX)
def test_scenario(tmp_path, name, transport):
    cfg_path = _short(tmp_path, name, transport)
    cfg = load_config(cfg_path)
    out = tmp_path / "r.json"
    p = _run(["--config", str(cfg_path), "--json", str(out), "--quiet", "--log", str(tmp_path / "ranks.log")])
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:] + log_tail(tmp_path / "ranks.log")
    data = json.loads(out.read_text())
    v = data["verdict"]
    assert v["mismatches"] == 0 and v["degraded_mismatches"] == 0 and v["lost_requests"] == 0
    assert v["unrecovered_failures"] == 0 and v["unfired_faults"] == 0
    # The events as executed are the scenario's: same steps, actions, ranks and phases. A fault
    # with a phase stays armed until its rank reaches the phase: in background mode a chunk's
    # transfer (and its re-homing) may run in the next step's forward pass, so it may fire later.
    want = sorted((e.step, e.action, e.rank, e.phase) for e in cfg.scenario.events)
    events = data["summary"]["events"]
    got = sorted((e.get("armed_step") if e.get("armed_step") is not None else e["step"], e["action"], e["rank"],
                  e["phase"]) for e in events)
    assert got == want
    assert all(e["step"] >= e["armed_step"] for e in events if e.get("armed_step") is not None)
    faults = [e for e in cfg.scenario.events if e.action in ("kill", "freeze")]
    fails = data["summary"]["failures"]
    assert sorted(f["rank"] for f in fails) == sorted(e.rank for e in faults)
    assert all(f["interruption_s"] is not None and f["interruption_s"] > 0 for f in fails)
    # Library log lines went to the log file, not between the progress lines.
    assert "rank log" in p.stdout and str(tmp_path / "ranks.log") in p.stdout
    assert not [l for l in p.stdout.splitlines() if l.startswith(("I", "W", "E")) and "]" in l[:40]]
    if name == "total_outage":
        live = [len(s["live"]) for s in data["steps"]]
        assert live[-1] == 2 and data["steps"][-1]["tokens"] > 0     # still serving on 2 ranks
        assert v["degraded_modes"].get("backups_uncovered", 0) > 0   # and says its backups degraded


def test_soak_short(tmp_path):
    """A short soak: random faults at random phases, recovered, no leak, a verdict with the figures."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: {hidden: 64, ffn: 64}\ncluster: {ranks: 4, max_ranks: 5, tokens_per_rank: 16}\n")
    out = tmp_path / "soak.json"
    p = _run(["--config", str(cfg), "--soak", "0.3", "--seed", "3", "--json", str(out), "--quiet"], timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    s = json.loads(out.read_text())["soak"]
    assert s["passed"] and s["events_drawn"] >= 2 and s["survivors"]
    assert s["wrong"] == 0 and s["lost"] == 0 and s["unrecovered"] == 0 and not s["leaks"]
    for r in map(str, s["survivors"]):  # JSON keys
        assert set(s["health_before"][r]) == {"fds", "threads", "rss_mb", "pid"}
        assert s["health_before"][r]["pid"] == s["health_after"][r]["pid"]
    assert "soak verdict         PASS" in p.stdout


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_metrics_during_a_rehearsal_with_a_kill(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: {hidden: 64, ffn: 64}\nscenario:\n  steps: 16\n  events:\n"
                   "    - {step: 2, action: rebalance}\n    - {step: 4, action: kill, rank: 2}\n")
    port = _free_port()
    proc = subprocess.Popen(CLI + ["--config", str(cfg), "--quiet", "--metrics-port", str(port)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen = ""
    try:
        deadline = time.monotonic() + 300
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
            except OSError:
                time.sleep(0.2)
                continue
            seen = text
            # the kill counted and recovered, and the orphans it left restored (by later chunks)
            if 'sglang_elastic_rank_failures_total{reason="killed"} 1.0' in text and \
                    "sglang_elastic_failover_seconds_count 1.0" in text and \
                    "sglang_elastic_orphans_restored_total 0.0" not in text:
                break
            time.sleep(0.2)
    finally:
        rest = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, rest[-3000:]
    values = {}
    for line in seen.splitlines():
        if line and not line.startswith("#"):
            name, val = line.rsplit(" ", 1)
            values[name] = float(val)
    assert values['sglang_elastic_rank_failures_total{reason="killed"}'] == 1
    assert values["sglang_elastic_failover_seconds_count"] == 1 and values["sglang_elastic_failover_seconds_sum"] > 0
    assert values["sglang_elastic_live_ranks"] == 3 and values["sglang_elastic_epoch"] >= 2
    assert values["sglang_elastic_expert_bytes_moved_total"] > 0
    assert values["sglang_elastic_rebalance_pause_seconds_count"] >= 1
    assert 0 < values["sglang_elastic_balancedness"] <= 1
    assert values["sglang_elastic_degraded_tokens_total"] >= 0
    assert values["sglang_elastic_orphans_restored_total"] > 0   # the killed rank's only replicas came back
