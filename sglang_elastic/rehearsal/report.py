"""What a person sees from a rehearsal: a progress line per step, a table per phase, the events as
executed, the verdict, JSON and a timeline plot. Byte figures are MiB everywhere (``moved_mib``)."""
from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Any, Dict, List

import numpy as np

from .tracking import StepRecord

__all__ = ["progress_line", "phase_rows", "format_report", "to_json", "plot_timeline", "verdict", "passed",
           "write_json"]

MIB = float(2 ** 20)

PHASE_ORDER = ("warm-up", "rebalance", "steady", "failover", "scale-up", "scale-down")


def progress_line(rec: StepRecord, extra: Dict[str, Any]) -> str:
    """One line per step, for the live display."""
    wall = rec.t_end - rec.t_start
    bal = f"{rec.balancedness:.3f}" if rec.balancedness is not None else "  -  "
    ev = f"  <- {', '.join(rec.events)}" if rec.events else ""
    upd = " updating" if extra.get("update_active") else ""
    return (f"step {rec.step:3d}  {rec.phase:<10} live {len(rec.live)}  {rec.tokens / max(wall, 1e-9):8.0f} tok/s  "
            f"bal {bal}  wrong {rec.mismatches}  retried {rec.batches_retried}  degraded {rec.degraded_tokens}"
            f"{upd}{ev}")


def _pct(xs: List[float], q: float) -> float:
    return float(np.percentile(xs, q)) if xs else float("nan")


def phase_rows(records: List[StepRecord]) -> List[Dict[str, Any]]:
    """Aggregate step records per phase (phases in first-seen order)."""
    order: List[str] = []
    by: Dict[str, List[StepRecord]] = {}
    for r in records:
        if r.phase not in by:
            order.append(r.phase)
            by[r.phase] = []
        by[r.phase].append(r)
    rows = []
    for ph in order:
        rs = by[ph]
        walls = [r.t_end - r.t_start for r in rs]
        lat = [x for r in rs for x in r.latencies]
        bal = [r.balancedness for r in rs if r.balancedness is not None]
        rows.append(dict(
            phase=ph, steps=len(rs), step_p50_ms=1e3 * _pct(walls, 50), step_p99_ms=1e3 * _pct(walls, 99),
            batch_p50_ms=1e3 * _pct(lat, 50), batch_p99_ms=1e3 * _pct(lat, 99),
            tokens_per_s=sum(r.tokens for r in rs) / max(sum(walls), 1e-9),
            balancedness=float(np.mean(bal)) if bal else None, moved_mib=sum(r.bytes_moved for r in rs) / MIB,
            restored=sum(r.restored for r in rs), mismatches=sum(r.mismatches for r in rs),
            degraded_tokens=sum(r.degraded_tokens for r in rs), retried=sum(r.batches_retried for r in rs),
            update_pause_max_ms=1e3 * max(r.update_pause_max for r in rs)))
    return rows


def verdict(records: List[StepRecord], summary: Dict[str, Any]) -> Dict[str, Any]:
    """Headline figures: correctness, lost requests, failover interruption, scale-up time, events,
    degraded modes."""
    fails = summary.get("failures", [])
    joins = summary.get("joins", [])
    inter = [f.get("interruption_s") for f in fails]
    return dict(
        mismatches=sum(r.mismatches for r in records),
        degraded_tokens=sum(r.degraded_tokens for r in records),
        degraded_mismatches=sum(r.degraded_mismatches for r in records),
        lost_requests=summary.get("lost_requests", 0),
        requests=summary.get("requests", 0),
        failover_interruption_s=inter,
        max_interruption_s=max([x for x in inter if x is not None], default=None),
        unrecovered_failures=len([f for f in fails if f.get("interruption_s") is None])
        + len(summary.get("recovering", [])),
        unfired_faults=len(summary.get("unfired", [])),
        events=[_event_label(e) for e in summary.get("events", [])],
        degraded_modes=dict(summary.get("degraded_modes", {})),
        recoveries=dict(summary.get("recoveries", {})),
        scale_up_s=[j.get("scale_up_s") for j in joins],
        moved_mib=sum(r.bytes_moved for r in records) / MIB,
        total_s=summary.get("total_s"),
    )


def passed(v: Dict[str, Any]) -> bool:
    """The exit status's rule: nothing wrong, nothing lost, every fault landed and recovered."""
    return v["mismatches"] == 0 and v["degraded_mismatches"] == 0 and v["lost_requests"] == 0 \
        and v["unrecovered_failures"] == 0 and v["unfired_faults"] == 0


def _event_label(e: Dict[str, Any]) -> str:
    who = "" if e.get("rank") is None else f" {e['rank']}"
    where = f" @{e['phase']}" if e.get("phase") else ""
    late = f" (armed at {e['armed_step']})" if e.get("armed_step") not in (None, e["step"]) else ""
    return f"step {e['step']}: {e['action']}{who}{where}{late}"


def format_report(records: List[StepRecord], summary: Dict[str, Any], title: str) -> str:
    """The phase table and the verdict, as plain text."""
    head = (f"{'phase':<11}{'steps':>6}{'step p50':>10}{'step p99':>10}{'tok/s':>9}{'balanced':>10}"
            f"{'moved MiB':>10}{'restored':>9}{'pause ms':>9}{'wrong':>7}{'degraded':>9}{'retried':>8}")
    lines = [title, "", head, "-" * len(head)]
    for r in phase_rows(records):
        bal = f"{r['balancedness']:.3f}" if r["balancedness"] is not None else "-"
        lines.append(f"{r['phase']:<11}{r['steps']:>6}{r['step_p50_ms']:>8.0f}ms{r['step_p99_ms']:>8.0f}ms"
                     f"{r['tokens_per_s']:>9.0f}{bal:>10}{r['moved_mib']:>10.1f}{r['restored']:>9}"
                     f"{r['update_pause_max_ms']:>9.0f}{r['mismatches']:>7}{r['degraded_tokens']:>9}{r['retried']:>8}")
    v = verdict(records, summary)
    fo = ", ".join(f"{x:.3f} s" if x is not None else "not recovered" for x in v["failover_interruption_s"]) or "-"
    su = ", ".join(f"{x:.2f} s" for x in v["scale_up_s"] if x is not None) or "-"
    lines += ["",
              f"wrong outputs        {v['mismatches']} (outside tokens the degraded policy touched)",
              f"degraded tokens      {v['degraded_tokens']} (an expert had no live replica; "
              f"{v['degraded_mismatches']} differ from the reference)",
              f"lost requests        {v['lost_requests']} of {v['requests']}",
              f"failover interruption {fo} (fault -> the requests it interrupted served correctly)",
              f"scale-up             {su} (process start -> its experts committed)",
              f"moved                {v['moved_mib']:.1f} MiB",
              f"events executed      {'; '.join(v['events']) or '-'}"]
    if v["unfired_faults"]:
        lines.append(f"faults not landed    {v['unfired_faults']} (their phase was never reached)")
    modes = ", ".join(f"{k} {n}" for k, n in sorted(v["degraded_modes"].items())) or "none"
    lines.append(f"degraded modes       {modes}")
    rec = ", ".join(f"{k} {n}" for k, n in sorted(v["recoveries"].items())) or "none"
    lines.append(f"recoveries           {rec} (collectives re-planned after a peer died)")
    if summary.get("log_path"):
        lines.append(f"rank log             {summary['log_path']} (the ranks' and libraries' own output)")
    lines.append(f"verdict              {'PASS' if passed(v) else 'FAIL'}")
    return "\n".join(lines)


def to_json(records: List[StepRecord], summary: Dict[str, Any], config: Dict[str, Any]) -> Dict[str, Any]:
    """Every figure: config, per-step records, per-phase rows, verdict."""
    return dict(config=config, steps=[dataclasses.asdict(r) for r in records], phases=phase_rows(records),
                verdict=verdict(records, summary), summary=summary)


def plot_timeline(records: List[StepRecord], summary: Dict[str, Any], path: Path) -> None:
    """Throughput, degraded tokens, balancedness and live ranks per step, events marked, verdict in
    the title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    steps = [r.step for r in records]
    tps = [r.tokens / max(r.t_end - r.t_start, 1e-9) for r in records]
    bal = [r.balancedness if r.balancedness is not None else np.nan for r in records]
    live = [len(r.live) for r in records]
    fig, axes = plt.subplots(4, 1, figsize=(10, 8.5), sharex=True)
    axes[0].plot(steps, tps, marker=".")
    axes[0].set_ylabel("tokens/s")
    axes[1].bar(steps, [r.degraded_tokens for r in records], color="tab:orange")
    axes[1].set_ylabel("degraded tokens")
    axes[1].yaxis.set_major_locator(MaxNLocator(integer=True))
    axes[2].plot(steps, bal, marker=".", color="tab:green")
    axes[2].set_ylabel("balancedness")
    axes[2].set_ylim(0, 1.05)
    axes[3].step(steps, live, where="mid", color="tab:red")
    axes[3].set_ylabel("live ranks")
    axes[3].yaxis.set_major_locator(MaxNLocator(integer=True))
    axes[3].set_xlabel("step")
    for r in records:
        for ev in r.events:
            for ax in axes:
                ax.axvline(r.step, color="grey", ls=":", lw=1)
            axes[0].annotate(ev, (r.step, max(tps) if tps else 0), rotation=90, fontsize=7, va="top")
    v = verdict(records, summary)
    mx = v["max_interruption_s"]
    fig.suptitle(f"sglang-elastic rehearse: {'PASS' if passed(v) else 'FAIL'} - wrong {v['mismatches']}, "
                 f"lost {v['lost_requests']}, degraded tokens {v['degraded_tokens']}, max interruption "
                 f"{'-' if mx is None else f'{mx:.3f} s'}")
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix or '.png'}")
    fig.savefig(tmp, dpi=110, format=(path.suffix[1:] or "png"))
    plt.close(fig)
    os.replace(tmp, path)


def write_json(data: Dict[str, Any], path: Path) -> None:
    """Write ``data`` as JSON atomically (a temporary file renamed over ``path``)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1, default=float) + "\n")
    os.replace(tmp, path)


def eprint(*a: Any) -> None:
    print(*a, file=sys.stderr, flush=True)
