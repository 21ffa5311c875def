"""One EP rank of the rehearsal: serves its request batches through the real stack, step by step.

The orchestrator drives steps through the store: it publishes ``plan/<step>`` (live set, batches,
placement target, events) and every live rank answers ``res/<step>/<rank>``. Per step a rank:

1. adopts the plan's live set (state mask, dispatcher peers, updater live set) and target placement;
2. runs each assigned batch through every MoE layer: router -> dispatcher (routing with the live
   mask, dispatch) -> its local experts -> combine, and checks each layer's output against a
   single-process reference computed with the same routing decisions;
3. moves one chunk of layers of a pending placement update (the layerwise updater) and commits it.

A batch that lost pairs to a peer dying mid-step is reported for retry, never delivered wrong.
"""
from __future__ import annotations

import ctypes
import datetime
import json
import os
import signal
import time
import traceback
from typing import Any, Dict, List, Optional

import numpy as np
import torch

from ..eplb import Placement, rebalance
from .config import RehearsalConfig
from .model import MoEModel

__all__ = ["rank_main", "RTOL", "ATOL"]

RTOL, ATOL = 1e-4, 1e-4
# A rank serves up to this many request batches in one forward pass (retried ones come first), so a
# failover's retried requests are served in the first pass after the failure.
BATCHES_PER_PASS = 2


def die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when its parent dies (no orphaned rank outlives the CLI)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:
        pass


def store_get(store, key: str, timeout_s: float) -> bytes:
    """``store.get`` that waits up to ``timeout_s`` for the key."""
    store.wait([key], datetime.timedelta(seconds=timeout_s))
    return store.get(key)


def placement_from_store(store, version: int, num_ranks: int, num_experts: int) -> Placement:
    return Placement(torch.tensor(json.loads(store.get(f"placement/{version}"))), num_ranks, num_experts)


class Rank:
    """State of one rank process (see the module docstring)."""

    def __init__(self, rank: int, cfg: RehearsalConfig, port: int, joiner: bool) -> None:
        from ..dispatch import make_dispatcher
        from ..membership import MembershipClient
        from ..state import ElasticEPState
        from ..transport import make_transport

        self.rank, self.cfg = rank, cfg
        m, c = cfg.model, cfg.cluster
        self.R, self.S, self.L, self.E = c.capacity, c.slots_per_rank, m.layers, m.experts
        self.store = torch.distributed.TCPStore("127.0.0.1", port, is_master=False,
                                                timeout=datetime.timedelta(seconds=120))
        self.model = MoEModel(m)
        self.ref_experts = [self.model.all_experts(l) for l in range(self.L)]
        info = json.loads(store_get(self.store, "init", 120))
        live = info["live"] if not joiner else [rank]  # a joiner learns the live set from its first plan
        self.state = ElasticEPState(self.R, device="cpu", live=live)
        self.placement = placement_from_store(self.store, info["placement"] if not joiner else
                                              int(self.store.get("placement/committed")), self.R, self.E)
        # Transport and dispatcher before joining: peers that see this rank live must find them.
        self.transport = make_transport(c.transport, rank, self.store)
        self.dispatcher = make_dispatcher(
            c.transport, path="host", rank=rank, num_ranks=self.R, num_local_experts=self.S, hidden=m.hidden,
            num_topk=m.top_k, max_tokens_per_rank=BATCHES_PER_PASS * c.tokens_per_rank, placement=self.placement,
            state=self.state,
            store=self.store, dtype=torch.float32, timeout_s=c.timeout_s, policy=c.policy, connect=False)
        H, F = m.hidden, m.ffn
        self.w1 = torch.full((self.L, self.S, H, F), float("nan"))
        self.w2 = torch.full((self.L, self.S, F, H), float("nan"))
        if not joiner:
            for l in range(self.L):
                for s in range(self.S):
                    e = int(self.placement.phy2log[l, rank * self.S + s])
                    if e >= 0:
                        self.w1[l, s], self.w2[l, s] = self.model.expert(l, e)
        self.member = MembershipClient("127.0.0.1", port, rank, heartbeat_interval_s=c.heartbeat_timeout_s / 4)
        self.member.join(timeout=120)
        self.store.set(f"ready/{rank}", str(self.member.incarnation))
        self.live: List[int] = sorted(live)
        self.epoch = -1
        self.updater = None
        self.update_load: Optional[np.ndarray] = None
        self.reported_dead: set = set()
        # Tell membership the moment the dispatcher gives up on a peer, not at the end of the step.
        self.state.add_listener(lambda ev: self._report_failures()
                                if ev.kind == "failed" and "dispatcher" in ev.reason else None)

    # ------------------------------------------------------------------ control
    def _new_updater(self, epoch: int, live: List[int]) -> None:
        from ..location.updater import ExpertLocationUpdater, StoreVote

        c = self.cfg.cluster
        mask = np.zeros(self.R, dtype=bool)
        mask[live] = True
        self.updater = ExpertLocationUpdater(
            self.rank, self.transport, {"w1": self.w1, "w2": self.w2}, self.placement, live_ranks=mask,
            layers_per_chunk=c.layers_per_chunk, timeout_s=c.timeout_s + 2, generation=epoch,
            vote=StoreVote(self.store, self.rank, c.timeout_s + 10, prefix=f"vote/{epoch}"))
        self.updater.fill_backup()

    def _on_update_failure(self, dead: List[int]):
        """The updater lost a peer mid-chunk: let membership decide, then retarget deterministically."""
        for d in dead:
            self.member.report_dead(d, "updater PeerFailure")
        view = self.member.wait_for_epoch(lambda v: not set(dead) & set(v.live), timeout=60)
        live = np.zeros(self.R, dtype=bool)
        live[list(view.live)] = True
        self.state.mark_failed([d for d in dead if self.state.is_alive(d)], reason="updater")
        return live, rebalance(self.update_load, self.R, self.S, live_ranks=live, current=self.updater.placement)

    def apply_membership(self, plan: Dict[str, Any]) -> bool:
        """Adopt the plan's live set for serving (mask and dispatcher peers); True if it changed."""
        live, epoch = sorted(plan["live"]), plan["epoch"]
        if epoch == self.epoch:
            return False
        self.state.apply_membership(live, epoch)
        self.dispatcher.set_peers(live)
        return True

    def apply_updater(self, plan: Dict[str, Any], changed: bool) -> None:
        """Adopt the live set for weight movement (collective) and start the plan's target, if any.
        Runs after serving: a failover retries its batches before any backup is re-homed."""
        live, epoch = sorted(plan["live"]), plan["epoch"]
        if changed:
            joined = set(live) - set(self.live) or (self.updater is None)
            self.transport.set_peers(live)
            if joined:
                if self.updater is not None:
                    self.placement = self.updater.placement
                self._new_updater(epoch, live)
            else:
                mask = np.zeros(self.R, dtype=bool)
                mask[live] = True
                self.updater.set_live(mask, generation=epoch)
            self.live, self.epoch = live, epoch
            self.dispatcher.set_placement(self.updater.placement)
        if plan.get("target") is not None:
            target = placement_from_store(self.store, plan["target"], self.R, self.E)
            self.update_load = np.asarray(json.loads(self.store.get(f"load/{plan['target']}")))
            self.updater.begin(target, self._on_update_failure)

    # ------------------------------------------------------------------ serving
    def forward(self, batch_ids: List[int], plan: Dict[str, Any], first_pass: bool) -> List[Dict[str, Any]]:
        """One forward pass over the concatenated tokens of ``batch_ids`` (possibly none: this rank
        still takes part in every exchange); one result per batch."""
        c, m = self.cfg.cluster, self.cfg.model
        T = c.tokens_per_rank
        x = (torch.cat([self.model.batch(b, T) for b in batch_ids]) if batch_ids
             else torch.zeros(0, m.hidden))
        n = x.shape[0]
        lost0 = self.dispatcher.stats.lost_pairs
        mismatch = torch.zeros(n, dtype=torch.bool)
        degraded = torch.zeros(n, dtype=torch.bool)
        t0 = time.perf_counter()
        for l in range(self.L):
            h = self.model.norm(x)
            ids, w, logits = self.model.route(l, h)
            if first_pass and l == 1 and plan.get("kill") == self.rank:
                self.store.set("event/killed_at", repr(time.time()))
                os.kill(os.getpid(), signal.SIGKILL)
            if first_pass and l == 1 and plan.get("freeze") == self.rank:
                self.store.set("event/frozen_at", repr(time.time()))
                os.kill(os.getpid(), signal.SIGSTOP)
            out = self.dispatcher.dispatch(h, ids, w, layer=l, router_logits=logits)
            y = self.model.mlp(out.hidden_states, self.w1[l], self.w2[l])
            o = self.dispatcher.combine(y, out.handle)
            routed = out.handle.routed
            ref = self.model.reference_layer(l, h, routed.logical, routed.weights, self.ref_experts[l])
            mismatch |= ~torch.isclose(o, ref, rtol=RTOL, atol=ATOL).all(1)
            degraded |= routed.affected
            x = x + o
        dt = time.perf_counter() - t0
        lost = self.dispatcher.stats.lost_pairs - lost0
        t_done = time.time()
        res = []
        for i, b in enumerate(batch_ids):
            mm, dg = mismatch[i * T:(i + 1) * T], degraded[i * T:(i + 1) * T]
            ok = lost == 0  # a batch that lost pairs to a failing peer is served again, not delivered
            res.append(dict(batch=b, tokens=T, ok=ok, lost_pairs=lost, latency=dt, t_done=t_done,
                            mismatch=int((mm & ~dg).sum()) if ok else 0, degraded=int(dg.sum()) if ok else 0,
                            degraded_mismatch=int((mm & dg).sum()) if ok else 0))
        return res

    def _report_failures(self) -> None:
        for d in self.state.dead_ranks():
            if d in self.live and d not in self.reported_dead:
                self.reported_dead.add(d)
                self.member.report_dead(d, "dispatcher gave up on it")

    def run_step(self, step: int, plan: Dict[str, Any]) -> Dict[str, Any]:
        t0 = time.time()
        changed = self.apply_membership(plan)
        update = dict(layers=[], bytes=0, restored=0, remote=0)
        if plan.get("update_all"):
            self.apply_updater(plan, changed)
            changed, plan = False, dict(plan, target=None)
        if plan.get("update_all"):  # stop-the-world recovery: the whole update before serving
            for rep in self.updater.run():
                update["layers"] += rep.layers
                update["bytes"] += rep.bytes_moved
                update["restored"] += rep.restored
                update["remote"] += rep.copies_remote
            self.dispatcher.set_placement(self.updater.placement)
        mine = plan["batches"].get(str(self.rank), [])
        per = plan.get("batches_per_pass", 1)
        passes = []
        for p in range(plan["passes"]):
            passes += self.forward(mine[p * per:(p + 1) * per], plan, p == 0)
        self._report_failures()
        t_served = time.time()
        self.apply_updater(plan, changed)
        pause = 0.0
        if self.updater.target is not None and not self.updater.done:
            t1 = time.perf_counter()
            rep = self.updater.step()
            pause = time.perf_counter() - t1
            if rep is not None:
                update["layers"] += rep.layers
                update["bytes"] += rep.bytes_moved
                update["restored"] += rep.restored
                update["remote"] += rep.copies_remote
            self.dispatcher.set_placement(self.updater.placement)
        load = self.dispatcher.take_load()
        return dict(rank=self.rank, step=step, passes=passes,
                    load=load.tolist(), t_start=t0, t_served=t_served, t_end=time.time(), update=update,
                    update_pause=pause, update_done=self.updater.done,
                    placement=self.updater.placement.phy2log.tolist(), dead_seen=sorted(self.reported_dead))

    def close(self, leave: bool) -> None:
        try:
            if leave:
                self.member.leave(timeout=30)
            self.member.close()
            self.dispatcher.close()
            self.transport.close()
        except Exception:
            pass


def rank_main(rank: int, cfg_dict: Dict[str, Any], port: int, joiner: bool = False) -> None:
    """Entry point of a rank process (spawned by the orchestrator)."""
    die_with_parent()
    torch.set_num_threads(1)
    code = 0
    r = None
    try:
        cfg = RehearsalConfig.from_dict(cfg_dict)
        r = Rank(rank, cfg, port, joiner)
        step = int(store_get(r.store, f"start/{rank}/{r.member.incarnation}", 300)) if joiner else 0
        while True:
            plan = json.loads(store_get(r.store, f"plan/{step}", 600))
            if plan.get("stop") or rank in plan.get("leave", []):
                r.close(leave=True)
                break
            if rank not in plan["live"]:  # declared dead (e.g. thawed after a freeze): stop serving
                break
            res = r.run_step(step, plan)
            r.store.set(f"res/{step}/{rank}", json.dumps(res))
            step += 1
    except Exception:
        code = 1
        try:
            if r is not None:
                r.store.set(f"error/{rank}", traceback.format_exc())
        except Exception:
            pass
        traceback.print_exc()
    # NIXL agents may crash at interpreter exit; nothing is left to flush.
    os._exit(code)
