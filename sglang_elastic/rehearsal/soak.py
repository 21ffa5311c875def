"""``sglang-elastic rehearse --soak MINUTES``: random kills, freezes, joins and drains at random
phases for that long, then the cluster is brought back to its starting size and the survivors'
health (open fds, threads, RSS) is compared with their health after warm-up.

Events are drawn when the cluster is quiet (no update running, no failure open, nothing armed), a
few steps apart, and only where they keep enough live slots for every expert. A fault at an update
phase comes with a rebalance in its step (so an update runs), one at ``fill`` with a join (every
rank fills its backups on a join). One rank that was there at the start is never touched, so there
is always a survivor to compare.
"""
from __future__ import annotations

import random
import time
from typing import Any, Dict, List, Optional

import numpy as np

from .config import Event, RehearsalConfig
from .orchestrator import EventSource, Orchestrator
from .protocol import FAULT_PHASES, UPDATE_PHASES
from .tracking import RunState

__all__ = ["SoakEvents", "soak_report", "LEAK_LIMITS", "MAX_SOAK_MINUTES"]

MAX_SOAK_MINUTES = 24 * 60.0
WARMUP_STEPS = 4
# Growth of a survivor's resources between warm-up and the end that counts as a leak (same number of
# peers both times; the allowances absorb allocator and thread-pool noise).
# After time is up, this long to rejoin ranks and settle before the soak stops anyway (and fails).
SETTLE_S = 120.0
LEAK_LIMITS = dict(fds=16, threads=8, rss_mb_ratio=1.5, rss_mb_slack=128.0)


class SoakEvents(EventSource):
    """Draws random events for ``minutes`` (see the module docstring)."""

    def __init__(self, cfg: RehearsalConfig, minutes: float, seed: int = 0) -> None:
        self.cfg, self.minutes = cfg, minutes
        self.rng = random.Random(seed)
        self.t0: Optional[float] = None
        self.orch: Optional[Orchestrator] = None
        self.keeper = 0                    # the original rank never touched
        self.next_at = WARMUP_STEPS + 1
        self.baseline: Dict[int, Dict[str, float]] = {}
        self.final: Dict[int, Dict[str, float]] = {}
        self.drawn: List[Event] = []
        self._quiet_since: Optional[int] = None
        self.settled = True

    def bind(self, orch: Orchestrator) -> None:
        self.orch = orch

    # ------------------------------------------------------------------ EventSource
    def events(self, step: int, st: RunState) -> List[Event]:
        if step == WARMUP_STEPS:
            self.t0 = time.monotonic()
            self.baseline = self.orch.health() if self.orch else {}
        if self.t0 is None or step < self.next_at or not self._quiet(st):
            return []
        if self._time_up():
            return self._restore(step, st)
        evs = self._draw(step, st)
        self.next_at = step + self.rng.randint(2, 4)
        self.drawn += evs
        return evs

    def finished(self, step: int, st: RunState) -> bool:
        if self.t0 is None or not self._time_up():
            return False
        c = self.cfg.cluster
        if time.monotonic() - self.t0 > 60.0 * self.minutes + SETTLE_S:
            # Never settled back to full size and quiet (more deaths than joins could repair, or
            # false deaths under load): stop, read what is there, and fail the verdict.
            self.settled = False
            self.final = self.orch.health() if self.orch else {}
            return True
        if not self._quiet(st) or len(st.live) < c.ranks:
            self._quiet_since = None
            return False
        # Two quiet steps at full size, then the survivors' health is read.
        self._quiet_since = step if self._quiet_since is None else self._quiet_since
        if step - self._quiet_since < 2:
            return False
        self.final = self.orch.health() if self.orch else {}
        return True

    # ------------------------------------------------------------------ drawing
    def _time_up(self) -> bool:
        return time.monotonic() - self.t0 >= 60.0 * self.minutes

    @staticmethod
    def _quiet(st: RunState) -> bool:
        return not (st.update_active or st.open_failures or st.armed or st.leaving or st.leave_now
                    or st.pending_target is not None)

    def _free_ids(self, st: RunState) -> List[int]:
        return [r for r in range(self.cfg.cluster.capacity) if r not in st.live]

    def _restore(self, step: int, st: RunState) -> List[Event]:
        """After time is up: join free rank ids back, one per quiet step, up to the starting size."""
        free = self._free_ids(st)
        if len(st.live) >= self.cfg.cluster.ranks or not free:
            return []
        ev = [Event(step, "join", free[0])]
        self.drawn += ev
        return ev

    def _draw(self, step: int, st: RunState) -> List[Event]:
        c, m = self.cfg.cluster, self.cfg.model
        spare = len(st.live) - -(-m.experts // c.slots_per_rank)      # ranks that may go
        victims = [r for r in st.live if r != self.keeper]
        free = self._free_ids(st)
        choices = ["rebalance"]
        if spare >= 1 and victims:
            choices += ["kill", "kill", "kill", "freeze", "leave"]
        if spare >= 2 and len(victims) >= 2:
            choices.append("double")
        if free:
            choices += ["join", "join"]
        action = self.rng.choice(choices)
        if action == "rebalance":
            return [Event(step, "rebalance")]
        if action == "join":
            return [Event(step, "join", self.rng.choice(free))]
        if action == "leave":
            return [Event(step, "leave", self.rng.choice(victims))]
        n = 2 if action == "double" else 1
        ranks = self.rng.sample(victims, n)
        evs: List[Event] = []
        kind = "freeze" if action == "freeze" else "kill"
        for r in ranks:
            phase = self.rng.choice(FAULT_PHASES)
            if phase == "fill" and not free:
                phase = "transfer"
            layer = self.rng.randrange(m.layers)
            evs.append(Event(step, kind if n == 1 else self.rng.choice(("kill", "kill", "freeze")), r, phase,
                             layer if phase in ("dispatch", "combine") else 1))
        phases = {e.phase for e in evs}
        if phases & {"fill"}:
            evs.append(Event(step, "join", self.rng.choice(free)))
        elif phases & set(UPDATE_PHASES):
            evs.append(Event(step, "rebalance"))
        return evs


def _pct(xs: List[float], q: float) -> Optional[float]:
    return float(np.percentile(xs, q)) if xs else None


def soak_report(source: SoakEvents, summary: Dict[str, Any], v: Dict[str, Any]) -> Dict[str, Any]:
    """Per-fault interruption percentiles, wrong/lost, survivors' health before/after and leaks."""
    inter = [f["interruption_s"] for f in summary.get("failures", []) if f.get("interruption_s") is not None]
    by_kind: Dict[str, List[float]] = {}
    for f in summary.get("failures", []):
        if f.get("interruption_s") is not None:
            by_kind.setdefault(f"{f['kind']} @{f['phase']}" if f.get("phase") else f["kind"], []).append(
                f["interruption_s"])
    # Survivors: the same process at both readings (a rank id may have been replaced meanwhile).
    survivors = sorted(r for r in set(source.baseline) & set(source.final)
                       if source.baseline[r]["pid"] == source.final[r]["pid"])
    leaks = []
    for r in survivors:
        b, a = source.baseline[r], source.final[r]
        if a["fds"] - b["fds"] > LEAK_LIMITS["fds"]:
            leaks.append(f"rank {r}: open fds {b['fds']} -> {a['fds']}")
        if a["threads"] - b["threads"] > LEAK_LIMITS["threads"]:
            leaks.append(f"rank {r}: threads {b['threads']} -> {a['threads']}")
        if a["rss_mb"] > b["rss_mb"] * LEAK_LIMITS["rss_mb_ratio"] + LEAK_LIMITS["rss_mb_slack"]:
            leaks.append(f"rank {r}: RSS {b['rss_mb']:.0f} -> {a['rss_mb']:.0f} MiB")
    return dict(
        minutes=source.minutes, faults=len(inter), events_drawn=len(source.drawn),
        interruption_p50_s=_pct(inter, 50), interruption_p99_s=_pct(inter, 99),
        interruption_max_s=max(inter) if inter else None,
        per_kind={k: dict(n=len(x), p50=_pct(x, 50), p99=_pct(x, 99), max=max(x)) for k, x in sorted(by_kind.items())},
        wrong=v["mismatches"], lost=v["lost_requests"], unrecovered=v["unrecovered_failures"] + v["unfired_faults"],
        settled=source.settled, survivors=survivors, health_before={r: source.baseline[r] for r in survivors},
        health_after={r: source.final[r] for r in survivors}, leaks=leaks,
        passed=not leaks and source.settled and v["mismatches"] == 0 and v["lost_requests"] == 0
        and v["unrecovered_failures"] == 0 and v["unfired_faults"] == 0 and bool(source.final))


def format_soak(s: Dict[str, Any]) -> str:
    """The soak's verdict as text."""
    def f(x: Optional[float]) -> str:
        return "-" if x is None else f"{x:.3f} s"

    lines = ["", f"soak {s['minutes']:g} min: {s['events_drawn']} events, {s['faults']} faults recovered",
             f"interruption         p50 {f(s['interruption_p50_s'])}  p99 {f(s['interruption_p99_s'])}  "
             f"max {f(s['interruption_max_s'])}"]
    for k, d in s["per_kind"].items():
        lines.append(f"  {k:<18} n {d['n']:<4} p50 {f(d['p50'])}  p99 {f(d['p99'])}  max {f(d['max'])}")
    lines.append(f"wrong {s['wrong']}, lost {s['lost']}, unrecovered {s['unrecovered']}")
    for r in s["survivors"]:
        b, a = s["health_before"][r], s["health_after"][r]
        lines.append(f"rank {r} health      fds {b['fds']} -> {a['fds']}, threads {b['threads']} -> {a['threads']}, "
                     f"RSS {b['rss_mb']:.0f} -> {a['rss_mb']:.0f} MiB")
    lines.append(f"leaks                {'; '.join(s['leaks']) or 'none'}")
    if not s["settled"]:
        lines.append("settled              NO: the cluster did not get back to full size and quiet in time")
    lines.append(f"soak verdict         {'PASS' if s['passed'] else 'FAIL'}")
    return "\n".join(lines)
