"""The rehearsal's orchestrator: serves the membership store, starts and kills rank processes, plans
every step, decides rebalances, and gathers what the ranks measured.

Steps are lockstep: the orchestrator publishes ``plan/<step>`` and waits until every live rank has
answered or has been declared dead by membership (heartbeats, or a survivor's report). Batches that
did not complete correctly (their rank died, or a peer died under them) are queued again and
served first in the next step: no request is lost.
"""
from __future__ import annotations

import datetime
import json
import logging
import multiprocessing as mp
import os
import signal
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import torch

from ..eplb import Placement, balancedness, rebalance
from .config import RehearsalConfig
from .rank import BATCHES_PER_PASS, rank_main

__all__ = ["Orchestrator", "RehearsalError", "StepRecord"]

log = logging.getLogger(__name__)


class RehearsalError(RuntimeError):
    """The rehearsal could not go on (a rank crashed, a step never completed...)."""


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


class Orchestrator:
    """Runs one rehearsal; :meth:`run` returns the step records and the summary figures."""

    def __init__(self, cfg: RehearsalConfig, progress: Optional[Callable[[StepRecord, Dict[str, Any]], None]] = None,
                 step_timeout_s: float = 120.0) -> None:
        self.cfg = cfg
        self.progress = progress
        self.step_timeout_s = step_timeout_s
        c, m = cfg.cluster, cfg.model
        self.R, self.S, self.L, self.E = c.capacity, c.slots_per_rank, m.layers, m.experts
        self.procs: Dict[int, mp.Process] = {}
        self.records: List[StepRecord] = []
        self.summary: Dict[str, Any] = {}
        self._ver = 0
        self._ctx = mp.get_context("spawn")

    # ------------------------------------------------------------------ processes
    def _spawn(self, rank: int, joiner: bool) -> None:
        p = self._ctx.Process(target=rank_main, args=(rank, self.cfg.to_dict(), self.port, joiner),
                              name=f"sgle-rank-{rank}", daemon=True)
        p.start()
        self.procs[rank] = p

    def _check_children(self, live: List[int]) -> None:
        for r in live:
            if self.store.check([f"error/{r}"]):
                raise RehearsalError(f"rank {r} crashed:\n{self.store.get(f'error/{r}').decode()}")

    def shutdown(self) -> None:
        """Stop every child process (idempotent; also on Ctrl-C)."""
        for p in self.procs.values():
            if p.is_alive():
                try:
                    os.kill(p.pid, signal.SIGKILL)
                except OSError:
                    pass
        for p in self.procs.values():
            p.join(timeout=5)
        if getattr(self, "membership", None) is not None:
            self.membership.close()
            self.membership = None

    # ------------------------------------------------------------------ placement
    def _publish_placement(self, placement: Placement, load: Optional[np.ndarray] = None) -> int:
        self._ver += 1
        self.store.set(f"placement/{self._ver}", json.dumps(placement.phy2log.tolist()))
        if load is not None:
            self.store.set(f"load/{self._ver}", json.dumps(np.asarray(load).tolist()))
        return self._ver

    def _commit(self, placement: Placement) -> None:
        self.committed = placement
        v = self._publish_placement(placement)
        self.store.set("placement/committed", str(v))

    def _plan_rebalance(self, live: List[int], from_scratch: bool = False) -> int:
        mask = np.zeros(self.R, dtype=bool)
        mask[live] = True
        load = self.window_load if self.window_load.sum() > 0 else np.ones((self.L, self.E))
        current = None if from_scratch else self.committed
        target = rebalance(load, self.R, self.S, live_ranks=mask, current=current)
        self.window_load = np.zeros_like(self.window_load)
        return self._publish_placement(target, load)

    # ------------------------------------------------------------------ main loop
    def run(self) -> Dict[str, Any]:
        from ..membership import MembershipServer

        c, sc = self.cfg.cluster, self.cfg.scenario
        self.membership = MembershipServer("127.0.0.1", 0, world_size=c.ranks, max_ranks=self.R,
                                           heartbeat_timeout_s=c.heartbeat_timeout_s, tick_s=0.02)
        self.port = self.membership.port
        self.store = torch.distributed.TCPStore("127.0.0.1", self.port, is_master=False,
                                                timeout=datetime.timedelta(seconds=60))
        live = list(range(c.ranks))
        # Start-up placement: no load recorded yet, so experts are spread evenly with replicas.
        self.window_load = np.zeros((self.L, self.E))
        p0 = rebalance(np.ones((self.L, self.E)), self.R, self.S,
                       live_ranks=np.isin(np.arange(self.R), live))
        self.committed = p0
        v0 = self._publish_placement(p0)
        self.store.set("placement/committed", str(v0))
        self.store.set("init", json.dumps({"live": live, "placement": v0}))
        t_launch = time.time()
        for r in live:
            self._spawn(r, False)
        view = self.membership.wait_for_epoch(lambda v: len(v.live) == len(live), timeout=180)
        self.summary["startup_s"] = time.time() - t_launch
        epoch = 0   # plan epoch: bumped whenever the serving live set changes
        queue: List[int] = []
        next_batch = 0
        pending_target: Optional[int] = None
        leaving: Dict[int, float] = {}    # rank -> drain start time
        leave_now: List[int] = []
        joins: Dict[int, Dict[str, float]] = {}
        failures: List[Dict[str, Any]] = []
        recovering: Optional[Dict[str, Any]] = None
        update_active = False
        phase = "warm-up"
        for step in range(sc.steps):
            events = []
            stop_the_world = False
            # --- scripted events that act before the step
            for ev in sc.at(step):
                if ev.action == "rebalance":
                    pending_target = self._plan_rebalance(live)
                    phase = "rebalance"
                    events.append("rebalance")
                elif ev.action == "join":
                    t0 = time.time()
                    self._spawn(ev.rank, True)
                    v = self.membership.wait_for_epoch(lambda v, r=ev.rank: r in v.live, timeout=180)
                    live = sorted(set(live) | {ev.rank})
                    joins[ev.rank] = dict(t_spawn=t0, t_member=time.time(), step=step)
                    self.store.set(f"start/{ev.rank}/{v.incarnations[ev.rank]}", str(step))
                    epoch += 1
                    pending_target = self._plan_rebalance(live)
                    phase = "scale-up"
                    events.append(f"join {ev.rank}")
                elif ev.action == "leave":
                    leaving[ev.rank] = time.time()
                    pending_target = self._plan_rebalance([r for r in live if r != ev.rank])
                    phase = "scale-down"
                    events.append(f"drain {ev.rank}")
            kill = next((ev.rank for ev in sc.at(step) if ev.action == "kill"), None)
            freeze = next((ev.rank for ev in sc.at(step) if ev.action == "freeze"), None)
            if kill is not None or freeze is not None:
                phase = "failover"
                events.append(f"kill {kill}" if kill is not None else f"freeze {freeze}")
            # --- membership decided a failure since the last plan
            view = self.membership.current()
            dead = [r for r in live if r not in view.live]
            if dead:
                live = sorted(set(live) - set(dead))
                epoch += 1
                events.append(f"dead {dead}")
                for r in dead:
                    p = self.procs.get(r)
                    if p is not None and p.is_alive():  # frozen: fence it for good
                        os.kill(p.pid, signal.SIGKILL)
                if c.rebalance_after_failure:
                    pending_target = self._plan_rebalance(live, from_scratch=c.recovery == "stop_the_world")
                    stop_the_world = c.recovery == "stop_the_world"
            # --- planned departures whose drain completed leave now (they get no batch)
            leaving_exit = list(leave_now)
            if leaving_exit:
                live = [x for x in live if x not in leaving_exit]
                epoch += 1
                events.append(f"leave {leaving_exit}")
            # --- batches: retried ones first, then one new batch per serving rank
            serving = live
            todo = list(queue)
            retried = set(queue)
            queue.clear()
            for _ in serving:
                todo.append(next_batch)
                next_batch += 1
            batches: Dict[str, List[int]] = {str(r): [] for r in serving}
            for i, b in enumerate(todo):
                batches[str(serving[i % len(serving)])].append(b)
            passes = -(-max(len(v) for v in batches.values()) // BATCHES_PER_PASS)
            plan = dict(step=step, live=live, epoch=epoch, batches=batches, passes=passes, target=pending_target,
                        batches_per_pass=BATCHES_PER_PASS,
                        kill=kill, freeze=freeze, update_all=stop_the_world, leave=leaving_exit)
            if pending_target is not None:
                update_active = True
            pending_target = None
            rec = StepRecord(step=step, phase=phase, live=list(live), t_start=time.time(), events=events)
            self.store.set(f"plan/{step}", json.dumps(plan))
            for r in leaving_exit:
                self.procs[r].join(timeout=30)
                leaving.pop(r, None)
            leave_now = []
            results = self._collect(step, live, rec)
            # --- account
            done_ranks = set(results)
            for r in live:
                if r not in done_ranks:
                    queue.extend(batches.get(str(r), []))
            all_ok = True
            for r, res in results.items():
                for p in res["passes"]:
                    if p["ok"]:
                        rec.batches_done += 1
                        rec.tokens += p["tokens"]
                        rec.mismatches += p["mismatch"]
                        rec.degraded_tokens += p["degraded"]
                        rec.degraded_mismatches += p["degraded_mismatch"]
                        rec.latencies.append(p["latency"])
                    else:
                        queue.append(p["batch"])
                        rec.batches_retried += 1
                        rec.lost_pairs += p["lost_pairs"]
                        all_ok = False
                u = res["update"]
                rec.bytes_moved += u["bytes"]
                rec.restored += u["restored"]
                rec.update_pause_max = max(rec.update_pause_max, res["update_pause"])
                self.window_load += np.asarray(res["load"])
            if len(done_ranks) < len(live):
                all_ok = False
            placements = [res["placement"] for res in results.values() if res["placement"] is not None]
            if placements:
                self._commit(Placement(torch.tensor(placements[0]), self.R, self.E))
            load_now = sum(np.asarray(res["load"]) for res in results.values()) if results else None
            if load_now is not None and load_now.sum() > 0:
                rec.balancedness = balancedness(load_now, self.committed)
            if update_active and results and all(res["update_done"] for res in results.values()):
                update_active = False
                for r in list(leaving):
                    leave_now.append(r)
                for r, j in joins.items():
                    if "t_filled" not in j:
                        j["t_filled"] = time.time()
                        j["scale_up_s"] = j["t_filled"] - j["t_spawn"]
            # --- failover bookkeeping (DESIGN.md: death -> first step whose in-flight tokens are all correct)
            if kill is not None or freeze is not None:
                key = "event/killed_at" if kill is not None else "event/frozen_at"
                t_ev = float(self.store.get(key)) if self.store.check([key]) else rec.t_start
                recovering = dict(rank=kill if kill is not None else freeze, kind="kill" if kill is not None else "freeze",
                                  t_event=t_ev, step=step)
            if recovering is not None and all_ok and not queue and rec.mismatches == 0 and not \
                    (recovering["step"] == step):
                # The in-flight requests are the retried batches (served first): their outputs exist
                # when the last of their forward passes finished (before any update chunk ran).
                done = [p["t_done"] for res in results.values() for p in res["passes"] if p["batch"] in retried]
                t_ok = max(done) if done else max((res["t_served"] for res in results.values()), default=rec.t_end)
                recovering["interruption_s"] = t_ok - recovering["t_event"]
                recovering["recovered_step"] = step
                failures.append(recovering)
                recovering = None
            if phase in ("failover", "rebalance", "scale-up", "scale-down") and not update_active and recovering is None:
                next_phase = "steady"
            else:
                next_phase = phase
            self.records.append(rec)
            if self.progress:
                self.progress(rec, dict(queue=len(queue), update_active=update_active))
            phase = next_phase
        self.store.set(f"plan/{sc.steps}", json.dumps(dict(stop=True)))
        for p in self.procs.values():
            p.join(timeout=20)
        self.summary.update(failures=failures, joins=joins, lost_requests=len(queue), recovering=recovering,
                            requests=next_batch, total_s=time.time() - t_launch)
        return self.summary

    def _collect(self, step: int, live: List[int], rec: StepRecord) -> Dict[int, Dict[str, Any]]:
        """Results of every live rank, or the verdict that it died (membership)."""
        deadline = time.time() + self.step_timeout_s
        results: Dict[int, Dict[str, Any]] = {}
        waiting = set(live)
        while waiting:
            for r in list(waiting):
                key = f"res/{step}/{r}"
                if self.store.check([key]):
                    results[r] = json.loads(self.store.get(key))
                    waiting.discard(r)
            if not waiting:
                break
            self._check_children(list(waiting))
            view = self.membership.current()
            for r in list(waiting):
                if r not in view.live:
                    waiting.discard(r)
            if time.time() > deadline:
                raise RehearsalError(f"step {step}: ranks {sorted(waiting)} neither answered nor were declared dead "
                                     f"within {self.step_timeout_s:.0f}s")
            time.sleep(0.002)
        rec.t_end = time.time()
        return results
