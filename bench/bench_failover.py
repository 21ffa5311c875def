"""Failover interruption over the fault matrix: ours (mask at once, retry, chunked movement-aware
re-plan, every wait ended by knowledge of the death) vs an upstream-style stop-the-world recovery
(SGLang 0.5.23: a synchronous from-scratch rebalance of all layers, executed before the step is
retried), the same scenario in the same run.

Each scenario of ``configs/scenarios/*.yaml`` (or the default rehearsal) runs twice per repeat, once
per recovery. Interruption is DESIGN.md's: wall time from the fault landing (the rank writes the time
just before it SIGKILLs/SIGSTOPs itself) to the end of the first step whose outputs for every
in-flight token are correct. ``max`` is over the scenario's faults.

    python bench/bench_failover.py [--scenarios kill_dispatch,kill_vote | all] [--transport torch]
                                   [--repeats 1] [--markdown] [--soak MINUTES --seed N]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sglang_elastic.rehearsal.config import DEFAULT_CONFIG, SCENARIO_DIR, load_config  # noqa: E402
from sglang_elastic.rehearsal.orchestrator import Orchestrator, RehearsalError  # noqa: E402
from sglang_elastic.rehearsal.report import passed, verdict  # noqa: E402

VARIANTS = (("ours", "elastic"), ("stop-the-world", "stop_the_world"))


def _path(name: str) -> Path:
    return DEFAULT_CONFIG if name == "default" else SCENARIO_DIR / f"{name}.yaml"


def run_once(name: str, transport: Optional[str], recovery: str, log: str) -> Dict[str, Any]:
    """One rehearsal of scenario ``name``; its headline figures."""
    cfg = load_config(_path(name), overrides={"transport": transport, "recovery": recovery})
    orch = Orchestrator(cfg, log_path=log)
    try:
        summary = orch.run()
    except RehearsalError as exc:
        return dict(error=str(exc).splitlines()[-1][:120])
    finally:
        orch.shutdown()
    v = verdict(orch.records, summary)
    inter = [x for x in v["failover_interruption_s"] if x is not None]
    return dict(max=max(inter) if inter else float("nan"), mean=statistics.mean(inter) if inter else float("nan"),
                wrong=v["mismatches"], lost=v["lost_requests"], degraded=v["degraded_tokens"],
                ok=passed(v), faults=len(inter), modes=v["degraded_modes"])


def soak(minutes: float, seed: int, transport: Optional[str], log: str) -> Dict[str, Any]:
    """A soak on the default config; its report (soak.soak_report)."""
    from sglang_elastic.rehearsal.soak import SoakEvents, soak_report

    # A frozen rank is given up on after 0.5 s by its peers (heartbeats: 1 s), as in freeze_replace.yaml.
    cfg = load_config(DEFAULT_CONFIG, overrides={"transport": transport, "timeout_s": 0.5, "heartbeat_timeout_s": 1.0})
    src = SoakEvents(cfg, minutes, seed)
    orch = Orchestrator(cfg, log_path=log, source=src)
    src.bind(orch)
    try:
        summary = orch.run()
    finally:
        orch.shutdown()
    return soak_report(src, summary, verdict(orch.records, summary))


def _cell(rows: List[Dict[str, Any]], key: str, fmt: str) -> str:
    errs = [r["error"] for r in rows if "error" in r]
    if errs:
        return "crashed"
    vals = [r[key] for r in rows]
    return fmt.format(statistics.median(vals) if isinstance(vals[0], float) else max(vals))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scenarios", default="all", help="comma-separated scenario names, 'default', or 'all'")
    ap.add_argument("--transport", default=None, choices=("torch", "nixl", "mooncake"),
                    help="override each scenario's transport")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--markdown", action="store_true", help="print a markdown table")
    ap.add_argument("--no-baseline", action="store_true", help="skip the stop-the-world runs")
    ap.add_argument("--soak", type=float, default=0.0, metavar="MINUTES", help="also run a soak this long")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    names = (["default"] + sorted(p.stem for p in SCENARIO_DIR.glob("*.yaml")) if args.scenarios == "all"
             else args.scenarios.split(","))
    log = os.path.join(tempfile.gettempdir(), f"bench_failover-{os.getpid()}.log")
    variants = VARIANTS[:1] if args.no_baseline else VARIANTS
    table = []
    for name in names:
        rows: Dict[str, List[Dict[str, Any]]] = {v: [] for v, _ in variants}
        for i in range(args.repeats):
            for v, recovery in variants:
                r = run_once(name, args.transport, recovery, log)
                rows[v].append(r)
                print(f"  {name} run {i + 1} {v}: {r}", file=sys.stderr, flush=True)
        table.append((name, rows))
    transport = args.transport or "per scenario"
    print(f"failover over the fault matrix, transport {transport}, {args.repeats} run(s) each "
          f"(max interruption over each scenario's faults; median over runs); rank log {log}")
    head = ["scenario"] + [f"{v} {k}" for v, _ in variants for k in ("max s", "wrong", "lost", "pass")]
    if args.markdown:
        print("| " + " | ".join(head) + " |")
        print("|" + "---|" * len(head))
    else:
        print("  ".join(head))
    for name, rows in table:
        cells = [name]
        for v, _ in variants:
            rs = rows[v]
            cells += [_cell(rs, "max", "{:.3f}"), _cell(rs, "wrong", "{}"), _cell(rs, "lost", "{}"),
                      "crashed" if any("error" in r for r in rs) else ("yes" if all(r["ok"] for r in rs) else "no")]
        print(("| " + " | ".join(cells) + " |") if args.markdown else "  ".join(cells))
    if args.soak > 0:
        s = soak(args.soak, args.seed, args.transport, log)
        print(f"\nsoak {args.soak:g} min seed {args.seed}: {s['faults']} faults, p50 {s['interruption_p50_s']}, "
              f"p99 {s['interruption_p99_s']}, max {s['interruption_max_s']}, wrong {s['wrong']}, lost {s['lost']}, "
              f"unrecovered {s['unrecovered']}, leaks {s['leaks'] or 'none'}, passed {s['passed']}")
        for r in s["survivors"]:
            print(f"  rank {r}: {s['health_before'][r]} -> {s['health_after'][r]}")
        for k, d in s["per_kind"].items():
            print(f"  {k}: {d}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
