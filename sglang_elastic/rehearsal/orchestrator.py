"""The rehearsal's orchestrator: serves the membership store, starts and kills rank processes, plans
every step, decides rebalances, and gathers what the ranks measured.

Steps are lockstep (messages in :mod:`.protocol`). One step, in named phases:

1. :meth:`Orchestrator._play_events` - the step's scripted (or soak) events: rebalances, joins and
   drains act before the step; kills and freezes are armed on their rank and land at their phase;
2. :meth:`Orchestrator._adopt_deaths` - deaths membership decided since the last plan leave the live
   set (a frozen process is fenced with SIGKILL), and a recovery rebalance is planned;
   :meth:`Orchestrator._readmit_suspects` - peers some rank gave up on that membership kept (a slow
   peer, not a dead one) are re-admitted by every rank together (``StepPlan.readmit``);
3. :meth:`Orchestrator._release_drained` - drained ranks whose update is committed leave;
4. :meth:`Orchestrator._plan_step` - retried batches first, then one new batch per serving rank;
5. :meth:`Orchestrator._collect` - every live rank's answer, or membership's verdict that it died;
6. :meth:`Orchestrator._account` and :meth:`Orchestrator._track_recovery` - figures, batches to
   retry (no request is lost), which faults landed, which failures recovered and how fast.

The orchestrator's own waits end on knowledge: a child process's exit is seen at once through its
pidfd (:class:`~.watch.ChildWatcher` declares it dead to membership), and membership's verdicts end
every wait on a rank.
"""
from __future__ import annotations

import datetime
import json
import logging
import multiprocessing as mp
import os
import signal
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch

from ..eplb import Placement, balancedness, rebalance, warm_up
from .config import RehearsalConfig
from .protocol import FaultFired, FaultSpec, InitInfo, Keys, PassResult, Served, StepPlan, StepResult
from .rank import BATCHES_PER_PASS, health_of, rank_main
from .events import EventSource, ScenarioEvents
from .tracking import ExecutedEvent, FailureRecord, JoinRecord, RunState, StepRecord
from .watch import ChildWatcher

__all__ = ["Orchestrator", "RehearsalError", "StepRecord", "EventSource", "ScenarioEvents"]

log = logging.getLogger(__name__)


# Degraded modes the ranks report as "how many now" (the others are counts of events).
GAUGES = ("backups_uncovered", "experts_unserved")


class RehearsalError(RuntimeError):
    """The rehearsal could not go on (a rank crashed, a step never completed...)."""


@dataclass
class _Step:
    """What the phases of one step hand each other."""

    step: int
    events: List[str] = field(default_factory=list)
    faults: List[FaultSpec] = field(default_factory=list)
    stop_the_world: bool = False
    leaving_now: List[int] = field(default_factory=list)
    readmit: List[int] = field(default_factory=list)


class Orchestrator:
    """Runs one rehearsal; :meth:`run` returns the summary figures (:attr:`records` holds the steps)."""

    def __init__(self, cfg: RehearsalConfig, progress: Optional[Callable[[StepRecord, Dict[str, Any]], None]] = None,
                 step_timeout_s: float = 120.0, log_path: Optional[str] = None,
                 source: Optional[EventSource] = None, metrics: Any = None) -> None:
        self.cfg = cfg
        self.progress = progress
        self.step_timeout_s = step_timeout_s
        self.log_path = log_path
        self.source = source or ScenarioEvents(cfg)
        self.metrics = metrics
        c, m = cfg.cluster, cfg.model
        self.R, self.S, self.L, self.E = c.capacity, c.slots_per_rank, m.layers, m.experts
        self.procs: Dict[int, mp.Process] = {}
        self.records: List[StepRecord] = []
        self.summary: Dict[str, Any] = {}
        self.st = RunState()
        self.membership = None
        self.watcher: Optional[ChildWatcher] = None
        self._ver = 0
        self._ctx = mp.get_context("spawn")
        self._suspects: set = set()   # ranks some rank gave up on in the last step (StepResult.suspects)
        self._served: Dict[int, List[PassResult]] = {}   # passes of ranks that died after serving (this step)

    # ------------------------------------------------------------------ processes
    def _spawn(self, rank: int, joiner: bool) -> None:
        p = self._ctx.Process(target=rank_main, args=(rank, self.cfg.to_dict(), self.port, joiner, self.log_path),
                              name=f"sgle-rank-{rank}", daemon=True)
        p.start()
        self.procs[rank] = p
        self.watcher.add(rank, p.pid)

    def _check_errors(self, ranks: List[int]) -> None:
        for r in ranks:
            if self.store.check([Keys.error(r)]):
                raise RehearsalError(f"rank {r} crashed:\n{self.store.get(Keys.error(r)).decode()}")

    def _fence(self, rank: int) -> None:
        """SIGKILL a rank membership declared dead (a frozen one must never come back)."""
        p = self.procs.get(rank)
        if p is not None and p.is_alive():
            try:
                os.kill(p.pid, signal.SIGKILL)
            except OSError:  # it exited meanwhile: nothing to fence
                pass

    def shutdown(self) -> None:
        """Stop every child process (idempotent; also on Ctrl-C)."""
        for r in list(self.procs):
            self._fence(r)
        for p in self.procs.values():
            p.join(timeout=5)
        if self.watcher is not None:
            self.watcher.close()
            self.watcher = None
        if self.membership is not None:
            self.membership.close()
            self.membership = None

    def health(self, ranks: Optional[List[int]] = None) -> Dict[int, Dict[str, float]]:
        """Open fds, threads and RSS of the live ranks' processes (from /proc)."""
        out = {}
        for r in self.st.live if ranks is None else ranks:
            p = self.procs.get(r)
            if p is not None and p.is_alive():
                try:
                    out[r] = dict(asdict(health_of(p.pid)), pid=p.pid)
                except OSError:  # it died between the check and the read
                    pass
        return out

    # ------------------------------------------------------------------ placement
    def _publish_placement(self, placement: Placement, load: Optional[np.ndarray] = None) -> int:
        self._ver += 1
        self.store.set(Keys.placement(self._ver), json.dumps(placement.phy2log.tolist()))
        if load is not None:
            self.store.set(Keys.load(self._ver), json.dumps(np.asarray(load).tolist()))
        return self._ver

    def _commit(self, placement: Placement) -> None:
        self.committed = placement
        self.store.set(Keys.COMMITTED, str(self._publish_placement(placement)))

    def _serving(self, exclude: Tuple[int, ...] = ()) -> List[int]:
        """Live ranks that keep experts: not draining, not ``exclude``."""
        return [r for r in self.st.live if r not in self.st.leaving and r not in exclude]

    def _plan_rebalance(self, serving: List[int], from_scratch: bool = False) -> Optional[int]:
        """Publish a placement over ``serving`` from the load recorded since the last one; None (and a
        degraded mode) when the serving ranks have fewer slots than there are experts."""
        if len(serving) * self.S < self.E:
            self.st.degraded_totals["too_few_slots_to_rebalance"] = \
                self.st.degraded_totals.get("too_few_slots_to_rebalance", 0) + 1
            return None
        mask = np.zeros(self.R, dtype=bool)
        mask[serving] = True
        load = self.window_load if self.window_load.sum() > 0 else np.ones((self.L, self.E))
        target = rebalance(load, self.R, self.S, live_ranks=mask, ranks_per_node=self.cfg.cluster.node_size,
                           current=None if from_scratch else self.committed)
        self.window_load = np.zeros_like(self.window_load)
        return self._publish_placement(target, load)

    # ------------------------------------------------------------------ run
    def run(self) -> Dict[str, Any]:
        """Start the cluster, play every step, stop the ranks; returns the summary."""
        t_launch = self._start()
        step = 0
        while not self.source.finished(step, self.st):
            self._step(step)
            step += 1
        self.store.set(Keys.plan(step), StepPlan(step=step, stop=True).to_json())
        for p in self.procs.values():
            p.join(timeout=20)
        st = self.st
        self.summary.update(
            failures=[asdict(f) for f in st.failures], joins=[asdict(j) for j in st.joins], lost_requests=len(st.queue),
            recovering=[asdict(f) for f in st.open_failures], requests=st.next_batch,
            events=[asdict(e) for e in st.executed], unfired=[asdict(f) for f in st.armed.values()],
            degraded_modes=st.degraded_totals, recoveries=st.recovery_totals, total_s=time.time() - t_launch, steps=step,
            log_path=self.log_path)
        return self.summary

    def _start(self) -> float:
        from ..membership import MembershipServer

        c = self.cfg.cluster
        self.membership = MembershipServer("127.0.0.1", 0, world_size=c.ranks, max_ranks=self.R,
                                           heartbeat_timeout_s=c.heartbeat_timeout_s, tick_s=0.02)
        self.liveness = self.membership.liveness   # every death the server publishes
        self.port = self.membership.port
        self.store = torch.distributed.TCPStore("127.0.0.1", self.port, is_master=False,
                                                timeout=datetime.timedelta(seconds=60))
        self.watcher = ChildWatcher(self._on_child_exit)
        st = self.st
        st.live = list(range(c.ranks))
        # Start-up placement: no load recorded yet, so experts are spread evenly with replicas.
        self.window_load = np.zeros((self.L, self.E))
        p0 = rebalance(np.ones((self.L, self.E)), self.R, self.S, live_ranks=np.isin(np.arange(self.R), st.live),
                       ranks_per_node=c.node_size)
        self._commit(p0)
        self.store.set(Keys.INIT, InitInfo(live=st.live, placement=self._ver, log_path=self.log_path).to_json())
        t_launch = time.time()
        for r in st.live:
            self._spawn(r, False)
        warm_up()  # the compiled EPLB kernels (numba's disk cache) while the ranks start: no failover waits for them
        view = self._wait_members(st.live, timeout=180)
        st.incarnations.update({r: view.incarnations[r] for r in st.live})
        self.summary["startup_s"] = time.time() - t_launch
        if self.metrics is not None:
            self.metrics.set_membership(len(st.live), view.epoch)
        return t_launch

    def _on_child_exit(self, rank: int, pid: int) -> None:
        """A rank process exited (its pidfd said so): if it is still a live member in the incarnation
        we started, membership hears it at once instead of waiting for heartbeats (watcher thread)."""
        p = self.procs.get(rank)
        if p is None or p.pid != pid or self.membership is None:
            return
        view = self.membership.current()
        inc = self.st.incarnations.get(rank)
        if rank in view.live and (inc is None or view.incarnations.get(rank) == inc):
            self.membership.declare_dead(rank, "process exited (seen by the orchestrator)")

    def _wait_members(self, ranks: List[int], timeout: float):
        """Until every rank in ``ranks`` is a live member; a process that dies first ends the wait."""
        deadline = time.monotonic() + timeout
        while True:
            view = self.membership.current()
            if all(r in view.live for r in ranks):
                return view
            self._check_errors(ranks)
            gone = [r for r in ranks if not self.procs[r].is_alive()]
            if gone:
                raise RehearsalError(f"rank(s) {gone} exited before joining (see the log {self.log_path})")
            if time.monotonic() > deadline:
                raise RehearsalError(f"rank(s) {[r for r in ranks if r not in view.live]} did not join in {timeout:.0f} s")
            time.sleep(0.01)

    # ------------------------------------------------------------------ one step
    def _step(self, step: int) -> None:
        ctx = _Step(step)
        self._play_events(ctx)
        self._adopt_deaths(ctx)
        self._readmit_suspects(ctx)
        self._release_drained(ctx)
        plan = self._plan_step(ctx)
        rec = StepRecord(step=step, phase=self.st.phase, live=list(self.st.live), t_start=time.time(),
                         events=ctx.events)
        self.store.set(Keys.plan(step), plan.to_json())
        for r in ctx.leaving_now:
            self.procs[r].join(timeout=30)
            self.st.leaving.pop(r, None)
        results = self._collect(step, self.st.live, rec)
        all_ok = self._account(plan, results, rec)
        self._note_landed_faults(rec.events)
        self._track_recovery(step, results, all_ok, rec)
        self.records.append(rec)
        self._feed_metrics(rec)
        if self.progress:
            self.progress(rec, dict(queue=len(self.st.queue), update_active=self.st.update_active))
        self.st.settle_phase()

    def _play_events(self, ctx: _Step) -> None:
        """Rebalances, joins and drain starts act now; kills and freezes are armed for the plan."""
        st = self.st
        for ev in self.source.events(ctx.step, st):
            t = time.time()
            if ev.action == "rebalance":
                st.pending_target = self._plan_rebalance(self._serving())
                st.phase = "rebalance"
            elif ev.action == "join":
                self._spawn(ev.rank, True)
                view = self._wait_members([ev.rank], timeout=180)
                st.incarnations[ev.rank] = view.incarnations[ev.rank]
                st.live = sorted(set(st.live) | {ev.rank})
                st.joins.append(JoinRecord(rank=ev.rank, step=ctx.step, t_spawn=t, t_member=time.time()))
                self.store.set(Keys.start(ev.rank, view.incarnations[ev.rank]), str(ctx.step))
                st.epoch += 1
                st.pending_target = self._plan_rebalance(self._serving())
                st.phase = "scale-up"
            elif ev.action == "leave":
                st.leaving[ev.rank] = t
                st.pending_target = self._plan_rebalance(self._serving())
                st.phase = "scale-down"
            else:  # kill / freeze: lands inside the rank at its phase (executed when it does)
                spec = FaultSpec(rank=ev.rank, action=ev.action, phase=ev.phase or "dispatch", layer=ev.layer,
                                 step=ctx.step)
                st.armed[ev.rank] = spec
                st.phase = "failover"
                ctx.events.append(f"arm {ev.label()}")
                continue
            st.executed.append(ExecutedEvent(step=ctx.step, action=ev.action, rank=ev.rank, phase=None, t=t))
            ctx.events.append(ev.label() if ev.action != "leave" else f"drain {ev.rank}")
        if st.pending_target is None and not st.update_active and any(
                f.phase in ("transfer", "vote", "rehome") and f.step < ctx.step for f in st.armed.values()):
            # Its update ended without reaching that phase (nothing to move, or abandoned): another one.
            st.pending_target = self._plan_rebalance(self._serving(), from_scratch=True)
            ctx.events.append("rebalance (an armed fault waits for an update)")
        ctx.faults = list(st.armed.values())

    def _adopt_deaths(self, ctx: _Step) -> None:
        """Deaths membership decided since the last plan leave the live set; plan the recovery."""
        st, c = self.st, self.cfg.cluster
        view = self.membership.current()
        dead = [r for r in st.live if r not in view.live]
        if not dead:
            return
        self._note_landed_faults(ctx.events)  # a fault that landed after the last step's answers
        now = time.time()
        for r in dead:
            self._fence(r)
            st.leaving.pop(r, None)
            if not any(f.rank == r and f.adopted_step is None for f in st.open_failures):
                reason = next((ch.reason for ch in view.changes if ch.rank == r), "declared dead by membership")
                st.open_failures.append(FailureRecord(rank=r, kind="unscripted", phase=None, step=ctx.step,
                                                      t_event=now, reason=reason))
            for f in st.open_failures:
                if f.rank == r and f.adopted_step is None:
                    f.adopted_step = ctx.step
                    f.t_adopted = now
                    f.in_flight = list(st.queue)   # what it interrupted: served again first, this step
            if self.metrics is not None:
                kind = next((f.kind for f in st.open_failures if f.rank == r), "unscripted")
                self.metrics.rank_failed({"kill": "killed", "freeze": "frozen"}.get(kind, "crashed"))
        st.live = [r for r in st.live if r not in dead]
        st.epoch += 1
        ctx.events.append(f"dead {dead}")
        if c.rebalance_after_failure:
            st.pending_target = self._plan_rebalance(self._serving(), from_scratch=c.recovery == "stop_the_world")
            ctx.stop_the_world = c.recovery == "stop_the_world"

    def _readmit_suspects(self, ctx: _Step) -> None:
        """Ranks a peer gave up on that membership still lists (a report is a suspicion, confirmed
        only by silence) are re-admitted by every rank at once: a new epoch, masks and dispatcher
        connections rebuilt together. Counted as ``suspicion_withdrawn``."""
        st, view = self.st, self.membership.current()
        back = sorted(r for r in self._suspects if r in st.live and r in view.live)
        self._suspects = set()
        if not back:
            return
        log.info("step %d: re-admitting rank(s) %s: given up on by a peer, still live in membership", ctx.step, back)
        ctx.readmit = back
        st.epoch += 1
        st.recovery_totals["suspicion_withdrawn"] = st.recovery_totals.get("suspicion_withdrawn", 0) + len(back)
        ctx.events.append(f"readmit {back}")

    def _release_drained(self, ctx: _Step) -> None:
        """Drained ranks whose update completed get no batch and leave with this plan."""
        st = self.st
        ctx.leaving_now, st.leave_now = list(st.leave_now), []
        if ctx.leaving_now:
            st.live = [r for r in st.live if r not in ctx.leaving_now]
            st.epoch += 1
            ctx.events.append(f"leave {ctx.leaving_now}")

    def _plan_step(self, ctx: _Step) -> StepPlan:
        """Retried batches first, then one new batch per serving rank, round-robin."""
        st = self.st
        if not st.live:
            raise RehearsalError(f"step {ctx.step}: membership declared every rank dead (frozen or overloaded "
                                 f"past heartbeat_timeout_s = {self.cfg.cluster.heartbeat_timeout_s:g} s?)")
        todo = list(st.queue)
        st.queue.clear()
        for _ in st.live:
            todo.append(st.next_batch)
            st.next_batch += 1
        batches: Dict[str, List[int]] = {str(r): [] for r in st.live}
        for i, b in enumerate(todo):
            batches[str(st.live[i % len(st.live)])].append(b)
        passes = -(-max(len(v) for v in batches.values()) // BATCHES_PER_PASS)
        plan = StepPlan(step=ctx.step, live=list(st.live), epoch=st.epoch, batches=batches, passes=passes,
                        batches_per_pass=BATCHES_PER_PASS, target=st.pending_target, update_all=ctx.stop_the_world,
                        leave=ctx.leaving_now, draining=sorted(st.leaving), faults=ctx.faults, readmit=ctx.readmit)
        st.batches = batches
        if st.pending_target is not None:
            st.update_active = True
        st.pending_target = None
        return plan

    def _collect(self, step: int, live: List[int], rec: StepRecord) -> Dict[int, StepResult]:
        """Results of every live rank, or membership's verdict that it died."""
        deadline = time.monotonic() + self.step_timeout_s
        results: Dict[int, StepResult] = {}
        waiting = set(live)
        while waiting:
            for r in sorted(waiting):
                key = Keys.result(step, r)
                if self.store.check([key]):
                    results[r] = StepResult.from_json(self.store.get(key))
                    waiting.discard(r)
            if not waiting:
                break
            self._check_errors(sorted(waiting))
            waiting -= set(waiting) - set(self.membership.current().live)
            if time.monotonic() > deadline:
                where = self._dump_stacks(sorted(waiting))
                raise RehearsalError(f"step {step}: ranks {sorted(waiting)} neither answered nor were declared dead "
                                     f"within {self.step_timeout_s:.0f}s{where}")
            self.liveness.wait(0.003)  # wakes at once on a death membership publishes
        rec.t_end = time.time()
        return results

    def _dump_stacks(self, ranks: List[int]) -> str:
        """Ask stuck ranks for their threads' stacks (SIGUSR1: faulthandler writes them to the rank
        log); returns where to read them."""
        asked = []
        for r in ranks:
            p = self.procs.get(r)
            if p is not None and p.is_alive():
                try:
                    os.kill(p.pid, signal.SIGUSR1)
                    asked.append(r)
                except OSError:  # exited meanwhile
                    pass
        if not asked:
            return ""
        time.sleep(0.5)  # faulthandler writes from the signal handler: a moment is enough
        return f" (their stacks are in the rank log{': ' + self.log_path if self.log_path else ''})"

    def _account(self, plan: StepPlan, results: Dict[int, StepResult], rec: StepRecord) -> bool:
        """Step figures; batches not served correctly go back to the queue. True if all were."""
        st = self.st
        all_ok = len(results) == len(plan.live)
        # A rank that died after serving (e.g. while moving weights) served its passes: they count.
        self._served = {r: Served.from_json(self.store.get(Keys.served(plan.step, r))).passes
                        if self.store.check([Keys.served(plan.step, r)]) else [] for r in plan.live if r not in results}
        for r, passes in self._served.items():
            st.queue.extend(b for b in plan.batches_of(r) if b not in {p.batch for p in passes})
        for p in [p for res in results.values() for p in res.passes] + sum(self._served.values(), []):
            if not rec.add_pass(p):
                st.queue.append(p.batch)
                all_ok = False
        for res in results.values():
            self._suspects.update(res.suspects)
            rec.bytes_moved += res.update.bytes
            rec.restored += res.update.restored
            rec.update_pause_max = max(rec.update_pause_max, res.update_pause)
            self.window_load += np.asarray(res.load)
            for mode, n in res.degraded.items():
                rec.degraded_modes[mode] = max(rec.degraded_modes.get(mode, 0), n)
            for what, n in res.recoveries.items():
                rec.recoveries[what] = max(rec.recoveries.get(what, 0), n)
        for what, n in rec.recoveries.items():
            st.recovery_totals[what] = st.recovery_totals.get(what, 0) + n
        for mode in GAUGES:   # how many now: the worst value and the value at the end
            n = rec.degraded_modes.get(mode, 0)
            if n or mode in st.degraded_totals:
                st.degraded_totals[mode] = max(st.degraded_totals.get(mode, 0), n)
                st.degraded_totals[f"{mode}_at_end"] = n
        for mode, n in rec.degraded_modes.items():
            if mode not in GAUGES:   # counts of events add up
                st.degraded_totals[mode] = st.degraded_totals.get(mode, 0) + n
        placements = [res.placement for res in results.values() if res.placement is not None]
        if placements:
            self._commit(Placement(torch.tensor(placements[0]), self.R, self.E))
        if results:
            load_now = sum(np.asarray(res.load) for res in results.values())
            if load_now.sum() > 0:
                rec.balancedness = balancedness(load_now, self.committed)
        if st.update_active and results and all(res.update_done for res in results.values()):
            st.update_active = False
            per_rank = (self.committed.phy2log.view(self.L, self.R, self.S) >= 0).any(-1).any(0)   # [R]
            st.leave_now = [r for r in st.leaving if r in st.live and not bool(per_rank[r])]
            if len(st.leave_now) < len([r for r in st.leaving if r in st.live]):
                # A re-plan after a death kept a draining rank's experts: drain it again.
                st.pending_target = self._plan_rebalance(self._serving())
            for j in st.joins:
                if j.t_filled is None:
                    j.t_filled = time.time()
                    j.scale_up_s = j.t_filled - j.t_spawn
        return all_ok

    def _note_landed_faults(self, events: List[str]) -> None:
        """Armed faults whose rank wrote its :class:`FaultFired` record landed: executed events."""
        st = self.st
        for r, spec in list(st.armed.items()):
            key = Keys.fault(r, st.incarnations.get(r, -1))
            if not self.store.check([key]):
                continue
            fired = FaultFired.from_json(self.store.get(key))
            del st.armed[r]
            st.executed.append(ExecutedEvent(step=fired.step, action=fired.action, rank=r, phase=fired.phase,
                                             t=fired.t, armed_step=spec.step))
            events.append(f"{fired.action} {r} @{fired.phase}")
            st.open_failures.append(FailureRecord(rank=r, kind=fired.action, phase=fired.phase, step=fired.step,
                                                  t_event=fired.t))

    def _track_recovery(self, step: int, results: Dict[int, StepResult], all_ok: bool, rec: StepRecord) -> None:
        """Close each adopted failure whose in-flight requests (the batches it made us serve again)
        are now all served correctly; one with none closes at the first step where everything was."""
        passes = [p for res in results.values() for p in res.passes] + sum(self._served.values(), [])
        t_done = {p.batch: p.t_done for p in passes if p.ok and p.mismatch == 0}
        t_served = max((res.t_served for res in results.values()), default=rec.t_end)
        for f in self.st.close_recovered(step, t_done, all_ok and rec.mismatches == 0, t_served):
            if self.metrics is not None:
                self.metrics.observe_failover(max(f.interruption_s, 0.0))

    def _feed_metrics(self, rec: StepRecord) -> None:
        m = self.metrics
        if m is None:
            return
        m.set_membership(len(self.st.live), self.membership.current().epoch)
        m.add_bytes_moved(rec.bytes_moved)
        m.add_orphans_restored(rec.restored)
        m.add_degraded_tokens(rec.degraded_tokens)
        if rec.update_pause_max > 0:
            m.observe_rebalance_pause(rec.update_pause_max)
        if rec.balancedness is not None:
            m.set_balancedness(rec.balancedness)
