"""What the orchestrator keeps between steps and reports: the run's state, one record per step,
the events as executed, and each failure from the fault to its recovery."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional

from .protocol import FaultSpec, PassResult

__all__ = ["StepRecord", "ExecutedEvent", "FailureRecord", "JoinRecord", "RunState"]


@dataclass
class StepRecord:
    """What happened in one step (host figures, JSON-ready)."""

    step: int
    phase: str
    live: List[int]
    t_start: float
    t_end: float = 0.0
    tokens: int = 0
    batches_done: int = 0
    batches_retried: int = 0
    mismatches: int = 0
    degraded_tokens: int = 0
    degraded_mismatches: int = 0
    lost_pairs: int = 0
    latencies: List[float] = field(default_factory=list)
    balancedness: Optional[float] = None
    bytes_moved: int = 0
    restored: int = 0
    update_pause_max: float = 0.0
    events: List[str] = field(default_factory=list)
    degraded_modes: Dict[str, int] = field(default_factory=dict)
    recoveries: Dict[str, int] = field(default_factory=dict)

    def add_pass(self, p: PassResult) -> bool:
        """Count one batch's pass; False when it must be served again (it lost pairs)."""
        if not p.ok:
            self.batches_retried += 1
            self.lost_pairs += p.lost_pairs
            return False
        self.batches_done += 1
        self.tokens += p.tokens
        self.mismatches += p.mismatch
        self.degraded_tokens += p.degraded
        self.degraded_mismatches += p.degraded_mismatch
        self.latencies.append(p.latency)
        return True


@dataclass
class ExecutedEvent:
    """An event as it was executed: rebalances, joins and drains by the orchestrator at their step;
    kills and freezes when the rank reached their phase (``step`` is where they landed)."""

    step: int
    action: str
    rank: Optional[int]
    phase: Optional[str]
    t: float
    armed_step: Optional[int] = None

    def key(self) -> tuple:
        """Compared with a scenario event's ``(step, action, rank, phase)``."""
        return (self.step, self.action, self.rank, self.phase)


@dataclass
class FailureRecord:
    """One rank lost: a scripted kill/freeze (from the moment it landed) or an unscripted death
    (from the moment the orchestrator adopted it), until the first step that served every in-flight
    request correctly."""

    rank: int
    kind: str                      # kill | freeze | unscripted
    phase: Optional[str]
    step: int
    t_event: float
    reason: str = ""
    adopted_step: Optional[int] = None
    t_adopted: Optional[float] = None
    interruption_s: Optional[float] = None
    recovered_step: Optional[int] = None
    in_flight: List[int] = field(default_factory=list)   # batches it interrupted (served again)
    served: List[int] = field(default_factory=list)      # those already served correctly


@dataclass
class JoinRecord:
    """A scale-up: from the joiner's process start to the commit of the placement that fills it."""

    rank: int
    step: int
    t_spawn: float
    t_member: float
    t_filled: Optional[float] = None
    scale_up_s: Optional[float] = None


@dataclass
class RunState:
    """The orchestrator's state between steps."""

    live: List[int] = field(default_factory=list)
    epoch: int = 0                                   # plan epoch: bumped whenever the serving set changes
    incarnations: Dict[int, int] = field(default_factory=dict)
    queue: List[int] = field(default_factory=list)   # batches to serve again, first
    next_batch: int = 0
    batches: Dict[str, List[int]] = field(default_factory=dict)
    pending_target: Optional[int] = None
    update_active: bool = False
    leaving: Dict[int, float] = field(default_factory=dict)   # rank -> drain start time
    leave_now: List[int] = field(default_factory=list)
    joins: List[JoinRecord] = field(default_factory=list)
    armed: Dict[int, FaultSpec] = field(default_factory=dict)
    executed: List[ExecutedEvent] = field(default_factory=list)
    open_failures: List[FailureRecord] = field(default_factory=list)
    failures: List[FailureRecord] = field(default_factory=list)
    degraded_totals: Dict[str, int] = field(default_factory=dict)
    recovery_totals: Dict[str, int] = field(default_factory=dict)
    phase: str = "warm-up"

    def close_recovered(self, step: int, t_done: Dict[int, float], clean: bool, t_served: float) -> List[FailureRecord]:
        """Close each failure adopted by ``step`` whose in-flight requests are all served correctly
        (``t_done``: batch -> when it was served correctly in this step); one that interrupted none
        closes at the first ``clean`` step (everything served correctly) with nothing queued, at
        ``t_served``. Returns the failures closed now."""
        queued, closed = set(self.queue), []
        for f in [f for f in self.open_failures if f.adopted_step is not None and f.adopted_step <= step]:
            if f.in_flight:
                if queued & set(f.in_flight) or not set(f.in_flight) <= set(t_done) | set(f.served):
                    f.served += [b for b in f.in_flight if b in t_done and b not in f.served]
                    continue
                t_ok = max(t_done.get(b, 0.0) for b in f.in_flight)
            elif clean and not self.queue:
                t_ok = t_served
            else:
                continue
            f.interruption_s = t_ok - f.t_event
            f.recovered_step = step
            self.open_failures.remove(f)
            self.failures.append(f)
            closed.append(f)
        return closed

    def settle_phase(self) -> None:
        """Back to ``steady`` once no update, failure or armed fault is pending."""
        if self.phase in ("failover", "rebalance", "scale-up", "scale-down") and not self.update_active \
                and not self.open_failures and not self.armed:
            self.phase = "steady"
