"""Failover interruption: ours (mask at once, retry, chunked movement-aware rebalance) vs an
upstream-style stop-the-world recovery (SGLang 0.5.23: a synchronous from-scratch rebalance of all
layers, executed before the step is retried), the same fault in the same run.

Both variants run the rehearsal cluster (``configs/rehearsal_default.yaml`` model and cluster) with
one scenario: warm-up, a recorded-load rebalance, then a rank SIGKILLed in the middle of a forward
pass. Failover interruption is DESIGN.md's: wall time from the rank's death to the end of the first
step whose outputs for every in-flight token are correct.

    python bench/bench_failover.py [--repeats 3] [--transport torch] [--markdown]
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sglang_elastic.rehearsal.config import RehearsalConfig, load_config  # noqa: E402
from sglang_elastic.rehearsal.orchestrator import Orchestrator  # noqa: E402
from sglang_elastic.rehearsal.report import verdict  # noqa: E402

SCENARIO = {"steps": 22, "events": [{"step": 4, "action": "rebalance"}, {"step": 12, "action": "kill", "rank": 2}]}


def run_once(transport: str, recovery: str, ffn: int) -> dict:
    """One rehearsal with the fault; returns its headline figures."""
    base = load_config(overrides={"transport": transport, "recovery": recovery})
    d = base.to_dict()
    d["scenario"] = SCENARIO
    d["model"]["ffn"] = ffn
    cfg = RehearsalConfig.from_dict(d)
    orch = Orchestrator(cfg)
    try:
        summary = orch.run()
    finally:
        orch.shutdown()
    v = verdict(orch.records, summary)
    fo = summary["failures"][0] if summary["failures"] else {}
    recovered = fo.get("recovered_step")
    moved = sum(r.bytes_moved for r in orch.records if r.step >= 12)
    stall = max((r.t_end - r.t_start for r in orch.records if recovered is not None and 12 <= r.step <= recovered),
                default=float("nan"))
    return dict(interruption=fo.get("interruption_s", float("nan")), wrong=v["mismatches"], lost=v["lost_requests"],
                degraded=v["degraded_tokens"], moved_mb=moved / 2**20, worst_step=stall)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--transport", default="torch", choices=("torch", "nixl", "mooncake"))
    ap.add_argument("--ffn", type=int, default=256, help="expert MLP width (bigger experts: more bytes to move)")
    ap.add_argument("--markdown", action="store_true", help="print a markdown table")
    args = ap.parse_args()
    rows = {"ours (elastic)": [], "upstream-style stop-the-world": []}
    for i in range(args.repeats):
        for name, rec in (("ours (elastic)", "elastic"), ("upstream-style stop-the-world", "stop_the_world")):
            r = run_once(args.transport, rec, args.ffn)
            rows[name].append(r)
            print(f"  run {i + 1} {name}: interruption {r['interruption']:.3f} s, wrong {r['wrong']}, lost {r['lost']}, "
                  f"moved after the fault {r['moved_mb']:.1f} MiB", file=sys.stderr, flush=True)
    med = {k: {f: statistics.median(x[f] for x in v) for f in v[0]} for k, v in rows.items()}
    ours, up = med["ours (elastic)"], med["upstream-style stop-the-world"]
    sep = " | " if args.markdown else "  "
    head = ["variant", "interruption s (median)", "worst step s", "moved after fault MiB", "wrong", "lost", "degraded tokens"]
    print(f"failover, 4 CPU ranks, transport {args.transport}, ffn {args.ffn}, {args.repeats} runs each (medians)")
    if args.markdown:
        print("| " + " | ".join(head) + " |")
        print("|" + "---|" * len(head))
    else:
        print(sep.join(head))
    for name, m in med.items():
        cells = [name, f"{m['interruption']:.3f}", f"{m['worst_step']:.3f}", f"{m['moved_mb']:.1f}",
                 f"{m['wrong']:.0f}", f"{m['lost']:.0f}", f"{m['degraded']:.0f}"]
        print(("| " + " | ".join(cells) + " |") if args.markdown else sep.join(cells))
    print(f"ratio stop-the-world / ours: interruption {up['interruption'] / ours['interruption']:.2f}x, "
          f"bytes moved {up['moved_mb'] / max(ours['moved_mb'], 1e-9):.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
