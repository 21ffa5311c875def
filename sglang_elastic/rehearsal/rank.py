"""One EP rank of the rehearsal: serves its request batches through the real stack, step by step.

The orchestrator drives steps through the store (:mod:`.protocol`): it publishes a
:class:`~.protocol.StepPlan` and every live rank answers a :class:`~.protocol.StepResult`. Per step a
rank:

1. adopts the plan's live set for serving (state mask, dispatcher peers) and arms the plan's faults;
2. runs its batches through every MoE layer: router -> dispatcher (routing with the live mask,
   dispatch) -> its local experts -> combine, checking each layer's output against a single-process
   reference computed with the same routing decisions;
3. adopts the live set for weight movement (re-homing backups; a new updater and a backup fill on a
   join), starts the plan's target placement, and moves one chunk of layers (the layerwise updater).

A batch that lost pairs to a peer dying mid-step is reported for retry, never delivered wrong. A peer
dying under a collective of the updater (copies, vote, fill, re-homing) is reported to membership;
the rank waits for the agreed view, re-plans over the survivors and goes on.

One :class:`~sglang_elastic.transport.Liveness` per process is handed to every component that waits
on peers (membership client, transports, dispatcher, updater), so a death known anywhere in the
process ends every wait on that peer.
"""
from __future__ import annotations

import ctypes
import datetime
import faulthandler
import logging
import os
import signal
import threading
import time
import traceback
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch

from ..eplb import warm_up_in_background
from ..location.updater import UpdateFailure
from ..transport.liveness import Liveness
from .config import RehearsalConfig
from .faults import FaultInjector
from .model import MoEModel
from .protocol import Health, InitInfo, Keys, PassResult, Served, StepPlan, StepResult, UpdateFigures
from .rank_update import UpdaterSide, placement_from_store

log = logging.getLogger(__name__)

__all__ = ["rank_main", "RTOL", "ATOL", "BATCHES_PER_PASS", "health_of"]

RTOL, ATOL = 1e-4, 1e-4
# A rank serves up to this many request batches in one forward pass (retried ones come first), so a
# failover's retried requests are served in the first pass after the failure.
BATCHES_PER_PASS = 2


def die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when its parent dies (no orphaned rank outlives the CLI)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:  # not Linux/glibc: the orchestrator's shutdown still kills its children
        pass


def capture_output(path: Optional[str]) -> None:
    """Send this process's fd 1 and 2 (Python and C libraries alike: NIXL/UCX, Mooncake's glog) to
    ``path``, so library log lines never interleave with the orchestrator's progress table."""
    if not path:
        return
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


def health_of(pid: int) -> Health:
    """Open fds, threads and resident memory of process ``pid`` (from /proc)."""
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    threads, rss_kb = 0, 0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("Threads:"):
                threads = int(line.split()[1])
            elif line.startswith("VmRSS:"):
                rss_kb = int(line.split()[1])
    return Health(fds=fds, threads=threads, rss_mb=rss_kb / 1024)


def store_get(store, key: str, timeout_s: float) -> bytes:
    """``store.get`` that waits up to ``timeout_s`` for the key."""
    store.wait([key], datetime.timedelta(seconds=timeout_s))
    return store.get(key)


class Rank(UpdaterSide):
    """State of one rank process (see the module docstring)."""

    def __init__(self, rank: int, cfg: RehearsalConfig, port: int, joiner: bool,
                 warming: Optional[threading.Thread] = None) -> None:
        from ..dispatch import make_dispatcher
        from ..membership import MembershipClient
        from ..state import ElasticEPState
        from ..transport import make_transport

        self.rank, self.cfg = rank, cfg
        m, c = cfg.model, cfg.cluster
        self.R, self.S, self.L, self.E = c.capacity, c.slots_per_rank, m.layers, m.experts
        self.store = torch.distributed.TCPStore("127.0.0.1", port, is_master=False,
                                                timeout=datetime.timedelta(seconds=120))
        self.liveness = Liveness()
        self.model = MoEModel(m)
        self.ref_experts = [self.model.all_experts(l) for l in range(self.L)]
        info = InitInfo.from_json(store_get(self.store, Keys.INIT, 120))
        live = info.live if not joiner else [rank]  # a joiner learns the live set from its first plan
        self.state = ElasticEPState(self.R, device="cpu", live=live)
        version = info.placement if not joiner else int(self.store.get(Keys.COMMITTED))
        self.placement = placement_from_store(self.store, version, self.R, self.E)
        # Transport and dispatcher before joining: peers that see this rank live must find them.
        self.transport = make_transport(c.transport, rank, self.store, liveness=self.liveness)
        self.dispatcher = make_dispatcher(
            c.transport, path="host", rank=rank, num_ranks=self.R, num_local_experts=self.S, hidden=m.hidden,
            num_topk=m.top_k, max_tokens_per_rank=BATCHES_PER_PASS * c.tokens_per_rank, placement=self.placement,
            state=self.state, store=self.store, dtype=torch.float32, timeout_s=c.timeout_s, policy=c.policy,
            connect=False, liveness=self.liveness)
        H, F = m.hidden, m.ffn
        self.w1 = torch.full((self.L, self.S, H, F), float("nan"))
        self.w2 = torch.full((self.L, self.S, F, H), float("nan"))
        if not joiner:
            for l in range(self.L):
                for s in range(self.S):
                    e = int(self.placement.phy2log[l, rank * self.S + s])
                    if e >= 0:
                        self.w1[l, s], self.w2[l, s] = self.model.expert(l, e)
        self.member = MembershipClient("127.0.0.1", port, rank, heartbeat_interval_s=c.heartbeat_timeout_s / 4,
                                       liveness=self.liveness)
        self.faults = FaultInjector(rank, self.store, lambda: self.member.incarnation)
        if warming is not None:
            # A rank serves as soon as it is live: loading (or, on a cold cache, compiling) the EPLB
            # kernels then would hold the interpreter lock through its first exchanges, long enough
            # under load for peers to give up on it (and it on them). The set-up above overlapped it.
            warming.join()
        self.member.join(timeout=120)
        self.store.set(Keys.ready(rank), str(self.member.incarnation))
        self.live: List[int] = sorted(live)
        self.draining: List[int] = []
        self.epoch = -1
        self.updater = None
        self._trusted_layout = None
        self.update_load: Optional[np.ndarray] = None
        self.reported_dead: set = set()
        self.degraded: Dict[str, int] = {}     # degraded modes of the elastic machinery (this step)
        self.recoveries: Dict[str, int] = {}   # collectives re-planned after a peer died (this step)
        self.abandoned: Optional[str] = None
        self._stats_seen: Dict[Tuple[int, str], int] = {}
        # Tell membership the moment the dispatcher gives up on a peer, not at the end of the step.
        self.state.add_listener(lambda ev: self._report_failures()
                                if ev.kind == "failed" and "dispatcher" in ev.reason else None)

    # ------------------------------------------------------------------ serving
    def adopt_serving_membership(self, plan: StepPlan) -> bool:
        """Adopt the plan's live set for serving (mask and dispatcher peers); True if it changed.

        The plan's live set is the agreed one: a peer this rank gave up on (masked, reported) that is
        in it is alive as far as membership knows, so it is re-admitted here (mask, Liveness, the
        report forgotten). When the plan names such peers (``readmit``), every rank rebuilds its
        dispatcher connections together: a give-up may have left pairs unusable (a gloo group whose
        wait timed out) or message counters out of step."""
        if plan.epoch == self.epoch:
            return False
        live = sorted(plan.live)
        self._readmit(live)
        self.state.apply_membership(live, plan.epoch)
        rebuild = bool(plan.readmit)
        # A rebuild happens once: a second reset here alone would put this rank out of step.
        self._connect_peers(live, "dispatcher",
                            lambda peers, attempt: self.dispatcher.set_peers(peers, rebuild=rebuild and attempt == 0))
        return True

    def forward(self, batch_ids: List[int]) -> List[PassResult]:
        """One forward pass over the concatenated tokens of ``batch_ids`` (possibly none: this rank
        still takes part in every exchange); one result per batch. Outputs are checked against the
        single-process reference after the pass: the check is not serving, so it is not timed.

        A pass that lost pairs to a failing peer is served again in the next step, so from that
        layer on this rank sends none of its own tokens (it still takes part in every exchange and
        runs its experts on its peers' tokens): the survivors of a death finish the doomed pass
        with empty exchanges, and its batches are retried sooner."""
        c, m = self.cfg.cluster, self.cfg.model
        T = c.tokens_per_rank
        x = (torch.cat([self.model.batch(b, T) for b in batch_ids]) if batch_ids
             else torch.zeros(0, m.hidden))
        n = x.shape[0]
        lost0 = self.dispatcher.stats.lost_pairs
        degraded = torch.zeros(n, dtype=torch.bool)
        trace = []
        t0 = time.perf_counter()
        for l in range(self.L):
            if self.dispatcher.stats.lost_pairs != lost0:
                x = x[:0]  # doomed: only the peers' tokens are served from here on
            h = self.model.norm(x)
            ids, w, logits = self.model.route(l, h)
            self.faults.at("dispatch", l)
            out = self.dispatcher.dispatch(h, ids, w, layer=l, router_logits=logits)
            y = self._experts(out, l)
            self.faults.at("combine", l)
            o = self.dispatcher.combine(y, out.handle)
            routed = out.handle.routed
            trace.append((l, h, routed.logical, routed.weights, o))
            if x.shape[0] == n:
                degraded |= routed.affected
            x = x + o
        dt = time.perf_counter() - t0
        t_done = time.time()
        lost = self.dispatcher.stats.lost_pairs - lost0
        ok = lost == 0  # a batch that lost pairs to a failing peer is served again, not delivered
        mismatch = torch.zeros(n, dtype=torch.bool)
        for l, h, logical, weights, o in (trace if ok else []):
            ref = self.model.reference_layer(l, h, logical, weights, self.ref_experts[l])
            mismatch |= ~torch.isclose(o, ref, rtol=RTOL, atol=ATOL).all(1)
        res = []
        for i, b in enumerate(batch_ids):
            mm, dg = mismatch[i * T:(i + 1) * T], degraded[i * T:(i + 1) * T]
            res.append(PassResult(batch=b, tokens=T, ok=ok, lost_pairs=lost, latency=dt, t_done=t_done,
                                  mismatch=int((mm & ~dg).sum()) if ok else 0, degraded=int(dg.sum()) if ok else 0,
                                  degraded_mismatch=int((mm & dg).sum()) if ok else 0))
        return res

    def _experts(self, out, layer: int) -> torch.Tensor:
        """This rank's experts on the dispatched rows: only the first ``max(masked_m)`` rows of each
        expert's region hold tokens (the low-latency layout pads every region to ``R * M`` rows), so
        only those are computed, as masked grouped GEMMs do; the combine reads no other row."""
        hs = out.hidden_states
        y = torch.empty_like(hs)
        m = int(out.masked_m.max()) if out.masked_m.numel() else 0
        if m:
            y[:, :m] = self.model.mlp(hs[:, :m], self.w1[layer], self.w2[layer])
        return y

    def _report_failures(self) -> None:
        for d in self.state.dead_ranks():
            if d in self.live and d not in self.reported_dead:
                self.reported_dead.add(d)
                self.member.report_dead(d, "dispatcher gave up on it")

    def _suspects(self) -> List[int]:
        """Peers of the agreed live set this rank gave up on or holds dead (membership decides)."""
        return sorted(r for r in self.live if r != self.rank
                      and (r in self.reported_dead or self.liveness.is_dead(r) or not self.state.is_alive(r)))

    def _readmit(self, live: List[int]) -> None:
        """Forget local suspicion of peers that the agreed view (the plan's live set, checked against
        this rank's own latest membership view, which may be newer) still holds alive."""
        held = [r for r in live if r != self.rank and (r in self.reported_dead or self.liveness.is_dead(r))]
        if not held:
            return
        view = self.member.current()
        for r in held:
            if r in view.live:  # a death pushed after the plan was made stays known
                self.reported_dead.discard(r)
                self.liveness.mark_alive(r)

    def _count(self, mode: str, n: int = 1, kind: str = "degraded") -> None:
        box = self.degraded if kind == "degraded" else self.recoveries
        box[mode] = box.get(mode, 0) + n

    def _degraded_now(self) -> Dict[str, int]:
        """Degraded modes of the elastic machinery this step (what the report shows)."""
        out, self.degraded = dict(self.degraded), {}
        present = (self.updater.placement.log2phy >= 0).any(-1)           # [L, E] experts still served
        if not bool(present.all()):
            out["experts_unserved"] = int((~present).sum())                 # their tokens: degraded policy
        layout = getattr(self.updater, "backup_layout", None)
        if layout is not None:
            uncovered = int(((layout.holder < 0) & present).sum())
            if uncovered:
                out["backups_uncovered"] = uncovered
        # The updater's own counts (backup rows that ran out): cumulative, so report what is new.
        stats = getattr(self.updater, "stats", None) or {}
        for k, v in stats.items():
            if k == "backups_uncovered":
                continue  # a gauge, counted above (with the backups this rank found unfilled)
            new = int(v) - self._stats_seen.get((id(self.updater), k), 0)
            self._stats_seen[(id(self.updater), k)] = int(v)
            if new > 0:
                out[k] = new
        return out

    def _take_recoveries(self) -> Dict[str, int]:
        out, self.recoveries = self.recoveries, {}
        return out

    # ------------------------------------------------------------------ one step
    def run_step(self, plan: StepPlan) -> StepResult:
        t0 = time.time()
        self.faults.arm(plan.faults, plan.step)
        changed = self.adopt_serving_membership(plan)
        update = UpdateFigures()
        if plan.update_all:  # stop-the-world recovery: the whole update before serving
            self.adopt_update_membership(plan, changed)
            changed, plan = False, StepPlan.from_dict(dict(plan.to_dict(), target=None))
            try:
                for rep in self.updater.run():
                    update.add(rep)
            except UpdateFailure as exc:
                self._abandon(exc)
            self.dispatcher.set_placement(self.updater.placement)
        mine, per = plan.batches_of(self.rank), plan.batches_per_pass
        passes: List[PassResult] = []
        for p in range(plan.passes):
            passes += self.forward(mine[p * per:(p + 1) * per])
        # Served now, whatever happens while weights move next (a death then loses no request).
        self.store.set(Keys.served(plan.step, self.rank), Served(rank=self.rank, step=plan.step, passes=passes).to_json())
        self._report_failures()
        t_served = time.time()
        self.adopt_update_membership(plan, changed)
        pause = self.move_chunk(update)
        load = self.dispatcher.take_load()
        done = self.updater.done or self.updater.target is None
        return StepResult(
            rank=self.rank, step=plan.step, passes=passes, load=load.tolist(), t_start=t0, t_served=t_served,
            t_end=time.time(), update=update, update_pause=pause,
            update_done=done,
            placement=self.updater.placement.phy2log.tolist(), dead_seen=sorted(self.reported_dead),
            suspects=self._suspects(), degraded=self._degraded_now(), recoveries=self._take_recoveries())

    def close(self, leave: bool) -> None:
        """Leave membership (planned scale-down) and release the stack."""
        try:
            if leave:
                self.member.leave(timeout=30)
            self.member.close()
            self.dispatcher.close()
            self.transport.close()
        except Exception:  # noqa: BLE001 - the process exits next; a half-closed stack is harmless then
            pass


def serve(r: Rank, first_step: int) -> None:
    """The rank's event loop: read each plan, serve it, answer, until told to stop or leave."""
    step = first_step
    while True:
        plan = StepPlan.from_json(store_get(r.store, Keys.plan(step), 600))
        if plan.stop or r.rank in plan.leave:
            r.close(leave=True)
            return
        if r.rank not in plan.live:  # declared dead (e.g. thawed after a freeze): stop serving
            return
        res = r.run_step(plan)
        r.store.set(Keys.result(step, r.rank), res.to_json())
        r.faults.at("between")
        step += 1


def rank_main(rank: int, cfg_dict: Dict[str, Any], port: int, joiner: bool = False,
              log_path: Optional[str] = None) -> None:
    """Entry point of a rank process (spawned by the orchestrator)."""
    capture_output(log_path)
    # SGLE_LOG_LEVEL=INFO|DEBUG: the rank's own log lines in the rank log (default: warnings only).
    logging.basicConfig(level=os.environ.get("SGLE_LOG_LEVEL", "WARNING").upper(),
                        format="%(asctime)s.%(msecs)03d %(name)s %(message)s", datefmt="%H:%M:%S")
    # The orchestrator asks a rank stuck past its step timeout for its stacks (into the rank log).
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    die_with_parent()
    torch.set_num_threads(1)
    # A failover re-plans with the compiled EPLB kernels: load them now (numba's disk cache, ~0.3 s),
    # beside joining and connecting, so the first failover does not pay for it.
    warming = warm_up_in_background("eplb-warm-up")
    code = 0
    r = None
    try:
        cfg = RehearsalConfig.from_dict(cfg_dict)
        r = Rank(rank, cfg, port, joiner, warming)
        first = int(store_get(r.store, Keys.start(rank, r.member.incarnation), 300)) if joiner else 0
        serve(r, first)
    except Exception:  # noqa: BLE001 - any crash is reported to the orchestrator, which stops the run
        code = 1
        tb = traceback.format_exc()
        try:
            if r is not None:
                r.store.set(Keys.error(rank), tb)
        except Exception:  # noqa: BLE001 - the store may be gone too; the traceback still goes to the log
            pass
        print(tb, file=__import__("sys").stderr, flush=True)
    # NIXL agents may crash at interpreter exit; nothing is left to flush.
    os._exit(code)
