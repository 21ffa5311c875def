"""``sglang-elastic rehearse``: parse, check, run the orchestrator, report."""
from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path
from typing import Any

from .common import PROG, UsageError, one_line, positive_int

__all__ = ["add_parser"]


def add_parser(sub: Any) -> None:
    """Register ``rehearse`` on the subparsers ``sub``."""
    p = sub.add_parser(
        "rehearse",
        help="run a local elastic EP cluster with real faults and scale-up (the main job)",
        description=(
            "Start an orchestrator and N rank processes on 127.0.0.1 serving a small MoE model through the "
            "real stack (routing, dispatcher, expert compute, combine, load recording, EPLB, layerwise updater, "
            "backup store, membership), play a scenario of faults and scale events, check every output against "
            "a single-process reference, and report per phase. With no options: configs/rehearsal_default.yaml "
            "(4 ranks; rebalance, SIGKILL a rank mid-step, a fresh rank joins, a planned scale-down)."
        ),
    )
    p.add_argument("--config", metavar="FILE", help="rehearsal config YAML (default configs/rehearsal_default.yaml)")
    p.add_argument("--ranks", type=positive_int, help="number of rank processes at start (overrides the config)")
    p.add_argument("--transport", choices=("torch", "nixl", "mooncake"),
                   help="how weights and tokens move (overrides the config)")
    p.add_argument("--scenario", metavar="FILE", help="scenario YAML (steps and events) replacing the config's")
    p.add_argument("--recovery", choices=("elastic", "stop_the_world"),
                   help="failure recovery: ours (elastic) or upstream-style stop-the-world")
    p.add_argument("--json", metavar="OUT", help="write every figure as JSON")
    p.add_argument("--plot", metavar="OUT.png", help="write a timeline picture (throughput, balancedness, live ranks)")
    p.add_argument("--quiet", action="store_true", help="no per-step progress lines")
    p.set_defaults(func=_cmd_rehearse, parser=p)


def _require_transport(kind: str) -> None:
    """Fail before anything starts when the transport's library is missing."""
    need = {"nixl": ("nixl", "pip install --no-deps nixl-cu12==1.5.1 nixl==1.5.1 (or run .ci/setup)"),
            "mooncake": ("mooncake.engine", "pip install mooncake-transfer-engine-non-cuda (or run .ci/setup)")}
    if kind in need:
        mod, how = need[kind]
        try:
            __import__(mod)
        except Exception as exc:
            raise UsageError(f"--transport {kind} needs the {mod.split('.')[0]} package ({one_line(exc)}): {how}") from None


def _cmd_rehearse(args: argparse.Namespace) -> int:
    from ..rehearsal.config import ConfigError, load_config
    from ..rehearsal.orchestrator import Orchestrator, RehearsalError
    from ..rehearsal import report

    overrides = {"ranks": args.ranks, "transport": args.transport, "recovery": args.recovery}
    if args.ranks is not None:
        overrides["max_ranks"] = 0
    try:
        cfg = load_config(args.config, scenario=args.scenario, overrides=overrides)
    except ConfigError as exc:
        raise UsageError(str(exc)) from None
    _require_transport(cfg.cluster.transport)
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise UsageError("--plot needs matplotlib: pip install matplotlib (or sglang-elastic[plot])") from None
    c = cfg.cluster
    title = (f"sglang-elastic rehearse: {c.ranks} ranks x {c.slots_per_rank} slots, transport {c.transport}, "
             f"{cfg.model.layers} layers x {cfg.model.experts} experts top-{cfg.model.top_k}, "
             f"{cfg.scenario.steps} steps, recovery {c.recovery}")
    print(title, flush=True)

    def show(rec, extra):
        if not args.quiet:
            print("  " + report.progress_line(rec, extra), flush=True)

    # Ctrl-C must stop the rehearsal even when the shell started us with SIGINT ignored (background
    # jobs), and a plain `kill` must stop every child too.
    def _interrupt(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    orch = Orchestrator(cfg, progress=show)
    try:
        summary = orch.run()
    except KeyboardInterrupt:
        orch.shutdown()
        print(f"{PROG} rehearse: interrupted; every rank process was stopped", file=sys.stderr)
        return 130
    except RehearsalError as exc:
        orch.shutdown()
        print(f"{PROG} rehearse: error: {exc}", file=sys.stderr)
        return 1
    finally:
        orch.shutdown()
    print()
    print(report.format_report(orch.records, summary, "results per phase"))
    if args.json:
        try:
            report.write_json(report.to_json(orch.records, summary, cfg.to_dict()), Path(args.json))
        except OSError as exc:
            raise UsageError(f"--json {args.json}: {one_line(exc)}") from None
        print(f"json                 {args.json}")
    if args.plot:
        report.plot_timeline(orch.records, summary, Path(args.plot))
        print(f"plot                 {args.plot}")
    v = report.verdict(orch.records, summary)
    return 0 if v["mismatches"] == 0 and v["lost_requests"] == 0 and v["unrecovered_failures"] == 0 else 1
