"""``sglang-elastic rehearse``: parse, check, run the orchestrator, report."""
from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict

from .common import PROG, UsageError, nonneg_int, number_in, one_line, positive_int

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
    p.add_argument("--plot", metavar="OUT.png", help="write a timeline picture (throughput, degraded tokens, "
                   "balancedness, live ranks, verdict)")
    p.add_argument("--log", metavar="FILE", help="where the ranks' own output and the transport libraries' log "
                   "lines go (default: a file in the temporary folder, named in the report)")
    p.add_argument("--soak", metavar="MINUTES", type=_minutes,
                   help="play random kills, freezes, joins and drains at random phases for MINUTES, then check "
                   "the survivors for leaks (replaces the scenario)")
    p.add_argument("--seed", metavar="N", type=nonneg_int, help="random seed of --soak (default 0)")
    p.add_argument("--metrics-port", metavar="P", type=_port,
                   help="serve the sglang_elastic_* Prometheus series on http://127.0.0.1:P/metrics during the run")
    p.add_argument("--quiet", action="store_true", help="no per-step progress lines")
    p.set_defaults(func=_cmd_rehearse, parser=p)


def _minutes(text: str) -> float:
    from ..rehearsal.soak import MAX_SOAK_MINUTES

    return number_in(text, float, lambda v: 0 < v <= MAX_SOAK_MINUTES, "a number of minutes",
                     f"minutes in (0, {MAX_SOAK_MINUTES:g}]")


def _port(text: str) -> int:
    return number_in(text, int, lambda v: 1 <= v <= 65535, "a TCP port number", "a TCP port number in [1, 65535]")


def _check_output(flag: str, path: str, others: Dict[str, str]) -> None:
    """Refuse, before anything starts, an output path that cannot be written or is used twice."""
    p = Path(path)
    for other, q in others.items():
        if q is not None and other != flag and Path(q).resolve() == p.resolve():
            raise UsageError(f"{flag} and {other} name the same file {path}")
    if p.is_dir():
        raise UsageError(f"{flag} {path}: is a folder, not a file")
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        raise UsageError(f"{flag} {path}: folder {parent} does not exist")
    if not os.access(parent, os.W_OK) or (p.exists() and not os.access(p, os.W_OK)):
        raise UsageError(f"{flag} {path}: not writable")


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

    overrides = {"ranks": args.ranks, "transport": args.transport, "recovery": args.recovery}
    notes = []
    try:
        base = load_config(args.config, scenario=args.scenario)
        if args.ranks is not None and args.ranks > base.cluster.capacity:
            # More ranks than the config's max_ranks: raise it (said out loud), never lower it.
            overrides["max_ranks"] = args.ranks
            notes.append(f"cluster.max_ranks raised from {base.cluster.capacity} to {args.ranks} for --ranks {args.ranks}")
        elif args.ranks is not None and base.cluster.max_ranks == 0:
            overrides["max_ranks"] = base.cluster.ranks  # keep the config's capacity (0 meant "= ranks")
        cfg = load_config(args.config, scenario=args.scenario, overrides=overrides)
    except ConfigError as exc:
        raise UsageError(str(exc)) from None
    if args.seed is not None and args.soak is None:
        raise UsageError("--seed goes with --soak")
    if args.soak is not None and args.scenario is not None:
        raise UsageError("--soak plays random events: give --scenario or --soak, not both")
    outs = {"--json": args.json, "--plot": args.plot, "--log": args.log}
    for flag, path in outs.items():
        if path is not None:
            _check_output(flag, path, outs)
    _require_transport(cfg.cluster.transport)
    try:  # read by every rank's updater threads: refused here, before anything starts
        from ..location.threads import nice_from_env
        nice_from_env()
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise UsageError("--plot needs matplotlib: pip install matplotlib (or sglang-elastic[plot])") from None
    log_path = args.log or os.path.join(tempfile.gettempdir(), f"sglang-elastic-rehearse-{time.strftime('%Y%m%d-%H%M%S')}-"
                                                                f"{os.getpid()}.log")
    open(log_path, "w").close()
    return _run(args, cfg, log_path, notes)


def _run(args: argparse.Namespace, cfg: Any, log_path: str, notes: list) -> int:
    from ..rehearsal import report
    from ..rehearsal.orchestrator import Orchestrator, RehearsalError

    c = cfg.cluster
    what = f"soak {args.soak:g} min (seed {args.seed or 0})" if args.soak else f"{cfg.scenario.steps} steps"
    title = (f"sglang-elastic rehearse: {c.ranks} ranks x {c.slots_per_rank} slots, transport {c.transport}, "
             f"{cfg.model.layers} layers x {cfg.model.experts} experts top-{cfg.model.top_k}, "
             f"{what}, recovery {c.recovery}")
    print(title, flush=True)
    for n in notes:
        print(f"note: {n}", flush=True)
    print(f"rank log: {log_path}", flush=True)

    def show(rec, extra):
        # A soak runs thousands of steps: show the ones where something happened.
        if not args.quiet and (not args.soak or rec.events or rec.batches_retried):
            print("  " + report.progress_line(rec, extra), flush=True)

    source = None
    if args.soak:
        from ..rehearsal.soak import SoakEvents

        source = SoakEvents(cfg, args.soak, args.seed or 0)
    metrics, server = None, None
    if args.metrics_port is not None:
        from prometheus_client import CollectorRegistry

        from ..metrics import ElasticMetrics, serve

        metrics = ElasticMetrics(CollectorRegistry())
        try:
            server = serve(metrics.registry, args.metrics_port)
        except OSError as exc:
            raise UsageError(f"--metrics-port {args.metrics_port}: {one_line(exc)}") from None
        print(f"metrics: {server.url}", flush=True)

    # Ctrl-C must stop the rehearsal even when the shell started us with SIGINT ignored (background
    # jobs), and a plain `kill` must stop every child too.
    def _interrupt(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    orch = Orchestrator(cfg, progress=show, log_path=log_path, source=source, metrics=metrics)
    if source is not None:
        source.bind(orch)
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
        if server is not None:
            server.close()
    print()
    print(report.format_report(orch.records, summary, "results per phase"))
    v = report.verdict(orch.records, summary)
    ok = report.passed(v)
    data = report.to_json(orch.records, summary, cfg.to_dict())
    if source is not None:
        from ..rehearsal.soak import format_soak, soak_report

        s = soak_report(source, summary, v)
        print(format_soak(s))
        data["soak"] = s
        ok = ok and s["passed"]
    if args.json:
        report.write_json(data, Path(args.json))
        print(f"json                 {args.json}")
    if args.plot:
        report.plot_timeline(orch.records, summary, Path(args.plot))
        print(f"plot                 {args.plot}")
    return 0 if ok else 1
