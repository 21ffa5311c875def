"""The weight-movement side of a rehearsal rank: its layerwise updater, backups, and recovery when a
peer dies under one of the updater's collectives (copies, vote, backup fill, re-homing).

Every recovery follows one rule: report the dead peer to membership, wait for the agreed view, adopt
it (which re-homes the dead one's backups) and re-plan the in-flight update over the survivors. Every
rank computes the same plans from the same agreed facts, so they need not talk about them. What can
no longer be done (weights lost with every replica and backup, too few slots) is abandoned and
counted as a degraded mode: serving goes on.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch

from ..eplb import Placement, rebalance
from ..location.updater import UpdateFailure
from ..transport.base import PeerFailure
from .protocol import Keys, StepPlan, UpdateFigures

log = logging.getLogger(__name__)

__all__ = ["UpdaterSide", "MAX_RECOVERIES", "live_mask", "placement_from_store"]

# Recoveries of one collective before the rank gives up (each needs a new death to be agreed).
MAX_RECOVERIES = 8


def live_mask(ranks: List[int], n: int) -> np.ndarray:
    """Bool ``[n]`` mask of ``ranks``."""
    m = np.zeros(n, dtype=bool)
    m[list(ranks)] = True
    return m


def placement_from_store(store, version: int, num_ranks: int, num_experts: int) -> Placement:
    return Placement(torch.tensor(json.loads(store.get(Keys.placement(version)))), num_ranks, num_experts)


class UpdaterSide:
    """Mixin of :class:`~.rank.Rank` (uses its ``rank, cfg, R, S, E, store, transport, dispatcher,
    liveness, member, state, faults, w1, w2, placement, live, epoch, draining, updater,
    update_load, reported_dead`` and ``_count``)."""

    # ------------------------------------------------------------------ weight movement
    def _new_updater(self, epoch: int, live: List[int]) -> None:
        """A fresh updater for the membership ``epoch`` (every rank builds one on a join): the zero-stall
        :class:`~sglang_elastic.location.background.BackgroundUpdater` (chunks move on a transport
        thread beside serving; ``move_chunk`` is the step boundary), or the synchronous one for the
        upstream-style ``recovery: stop_the_world``. Experts with no live replica and no live backup
        are rebuilt from the model, as SGLang reads them from the checkpoint."""
        from ..dispatch.routing import RoutingTable
        from ..location.background import BackgroundUpdater
        from ..membership import StoreVote

        c = self.cfg.cluster
        if self.updater is not None:  # its thread and staging go with it
            self.updater.close()
        background = c.recovery != "stop_the_world"
        if background:
            # The transport thread runs Python (planning, re-homing) while the main thread serves: with
            # the default 5 ms switch interval a step boundary waits up to 5 ms for the interpreter lock
            # after each torch op of its commit. 0.5 ms bounds that wait (at a little switching cost).
            sys.setswitchinterval(min(sys.getswitchinterval(), 0.0005))
        # The vote's own timeout is for alive-but-silent voters; a dead voter ends it through Liveness.
        vote = StoreVote(self.store, self.rank, c.timeout_s + 10, prefix=f"vote/{epoch}", liveness=self.liveness)
        self.updater = self.faults.watch_updater(BackgroundUpdater(
            self.rank, self.faults.wrap_transport(self.transport), {"w1": self.w1, "w2": self.w2}, self.placement,
            live_ranks=live_mask(live, self.R), layers_per_chunk=c.layers_per_chunk, ranks_per_node=c.node_size,
            timeout_s=c.timeout_s, generation=epoch, vote=self.faults.wrap_vote(vote, self._on_vote),
            liveness=self.liveness, reload=self._reload_expert, background=background,
            prefix=f"ready/{epoch}", prepare=RoutingTable.from_placement, keep_slots=True))
        self._trusted_layout = None
        self._fill_new_backups()

    def _reload_expert(self, layer: int, expert: int) -> Dict[str, torch.Tensor]:
        """One expert's weights from the checkpoint (here: rebuilt from the model's seed)."""
        w1, w2 = self.model.expert(layer, expert)
        return {"w1": w1, "w2": w2}

    def _on_vote(self, outcome: Tuple[List[int], bool]) -> None:
        """Every live rank agreed that a set of copies landed: the backup layout now is filled."""
        dead, all_ok = outcome
        if not dead and all_ok and self.updater is not None:
            self._trusted_layout = self.updater.backup_layout

    def _distrust_unfilled_backups(self) -> None:
        """A peer died under backup copies: the pairs the layout needed copied since the last agreed
        copies (:meth:`BackupLayout.refills`: holder or row changed) may never have been filled. Mark
        them absent (never restore from an unfilled row)."""
        layout, good = self.updater.backup_layout, self._trusted_layout
        if layout is None or good is None or layout is good:
            return
        changed = layout.refills(good)
        if bool(changed.any()):
            holder = layout.holder.clone()
            holder[changed] = -1
            self.updater.backup_layout = dataclasses.replace(layout, holder=holder)
            self._count("backups_unfilled", int(changed.sum()))

    def _fill_new_backups(self) -> None:
        """The start-up backup fill of a new updater (collective). A fresh backup store holds nothing
        until filled, so an expert with no live replica to fill from has no backup (never a stale
        one): before the fill, and again when a peer dies during it (the others are filled again
        over the survivors)."""
        for _ in range(MAX_RECOVERIES):
            self._forget_unfillable_backups()
            try:
                self.updater.fill_backup()
                return
            except PeerFailure as exc:
                dead = sorted(set(exc.ranks))
                log.warning("rank %d: backup fill: %s", self.rank, exc)
            self._count("fill_replans", kind="recoveries")
            self._adopt_survivors(dead)
        raise RuntimeError(f"rank {self.rank}: {MAX_RECOVERIES} peers died during one backup fill")

    def _forget_unfillable_backups(self) -> None:
        layout = self.updater.backup_layout
        if layout is None:
            return
        present = (self.updater.placement.log2phy >= 0).any(-1)      # [L, E] a live replica exists
        if bool(present.all()):
            return
        holder = layout.holder.clone()
        holder[~present] = -1
        self.updater.backup_layout = dataclasses.replace(layout, holder=holder)

    def _agreed_live_without(self, dead: List[int]) -> List[int]:
        """Report ``dead`` to membership and wait until the agreed view no longer has them. A report is
        only a suspicion: a rank that keeps heartbeating stays live. So the wait is bounded by the time
        membership needs to evict a silent rank (two heartbeat timeouts and a second); after it, the
        ranks the view still lists live are alive (``suspicion_withdrawn``), and the caller retries
        its collective over the view's live set."""
        from ..membership import MembershipTimeout

        for d in dead:
            if d != self.rank and d not in self.reported_dead:  # others gave up on this rank: membership knows it lives
                self.reported_dead.add(d)
                self.member.report_dead(d, "updater PeerFailure")
        bound = 2 * self.cfg.cluster.heartbeat_timeout_s + 1.0
        try:
            view = self.member.wait_for_epoch(lambda v: not set(dead) & set(v.live), timeout=bound)
        except MembershipTimeout:
            view = self.member.current()
            log.warning("rank %d: membership keeps %s live after %.1f s: suspicion withdrawn", self.rank,
                        sorted(set(dead) & set(view.live)), bound)
            for d in sorted(set(dead) & set(view.live)):  # membership is the truth: forget the suspicion
                self._count("suspicion_withdrawn", kind="recoveries")
                self.reported_dead.discard(d)
                self.liveness.mark_alive(d, view.incarnations.get(d))
        gone = [d for d in dead if d not in view.live]
        self.state.mark_failed([d for d in gone if self.state.is_alive(d)], reason="updater")
        return sorted(view.live)

    def _retarget(self, live: List[int]) -> Tuple[np.ndarray, Placement]:
        """The in-flight update's target re-planned over ``live``. A rank being drained keeps slots in
        it (the updater validates a re-plan against every live rank); the orchestrator's next target
        drains it again, and it leaves only once it holds nothing."""
        if len(live) * self.S < self.E:
            # Too few slots for every expert: no target exists. Serve degraded on what is committed.
            raise UpdateFailure(f"{len(live)} live ranks x {self.S} slots cannot hold {self.E} experts")
        serving = live_mask(live, self.R)
        target = rebalance(self.update_load, self.R, self.S, live_ranks=serving, ranks_per_node=self.cfg.cluster.node_size,
                           current=self.updater.placement)
        return live_mask(live, self.R), target

    def _on_update_failure(self, dead: List[int]) -> Tuple[np.ndarray, Placement]:
        """The updater lost a peer mid-chunk: let membership decide, then retarget deterministically."""
        self._count("update_replans", kind="recoveries")
        self._distrust_unfilled_backups()
        return self._retarget(self._agreed_live_without(dead))

    def _collective(self, fn: Callable[[List[int]], Any], live: List[int]) -> List[int]:
        """Run an updater collective over ``live`` (``fn(live)``, outside ``step``: adopting a live set,
        re-homing); when a peer dies under it, adopt the agreed live set (which re-homes that peer's
        backups) and run it again over the survivors, never over the peer that died (a retry over
        the same set fails the same way until the recoveries run out). Returns the live set it ran
        over."""
        blamed: List[int] = []
        for _ in range(MAX_RECOVERIES):
            try:
                fn(live)
                return live
            except PeerFailure as exc:
                blamed.append(exc.rank)
                self._recover(exc, "collective_replans")
                live = [r for r in live if bool(self.updater.live[r])]
        raise self._gave_up(blamed, live)

    def _gave_up(self, blamed: List[int], live: List[int]) -> RuntimeError:
        """The error of a collective that failed :data:`MAX_RECOVERIES` times, blaming ``blamed``."""
        kept = sorted(set(blamed) & set(live))
        if kept:  # not deaths: a peer this rank cannot reach although membership sees it heartbeat
            return RuntimeError(f"rank {self.rank}: an updater collective failed {MAX_RECOVERIES} times in a row "
                                f"blaming rank(s) {sorted(set(blamed))}; membership kept {kept} live each time "
                                "(this rank cannot reach a peer that heartbeats)")
        return RuntimeError(f"rank {self.rank}: {MAX_RECOVERIES} peers died under one collective")

    def _adopt_survivors(self, dead: List[int]) -> List[int]:
        """Report ``dead`` to membership, wait for the agreed live set and adopt it (``set_live``, a
        collective that re-homes their backups). A peer dying under the adoption is agreed on and
        the adoption runs again in this loop, not in a nested recovery: the stack and the number of
        attempts stay bounded by :data:`MAX_RECOVERIES` however many fail. Returns the live set."""
        blamed: List[int] = []
        for _ in range(MAX_RECOVERIES):
            if blamed:  # the adoption before this one failed: a recovery of its own
                self._count("collective_replans", kind="recoveries")
                self._distrust_unfilled_backups()
            live = self._agreed_live_without(dead)
            try:
                self.updater.set_live(live_mask(live, self.R))
                return live
            except PeerFailure as exc:
                blamed.append(exc.rank)
                dead = sorted(set(exc.ranks))
                log.warning("rank %d: collective_replans: %s", self.rank, exc)
        raise self._gave_up(blamed, live)

    def _recover(self, exc: PeerFailure, what: str) -> None:
        """A peer died under an updater collective: agree on the survivors, adopt them (re-homing the
        dead one's backups) and re-plan the in-flight update over them."""
        log.warning("rank %d: %s: %s", self.rank, what, exc)
        self._count(what, kind="recoveries")
        self._distrust_unfilled_backups()
        live = self._adopt_survivors(sorted(set(exc.ranks)))
        if self.updater.target is not None and self.update_load is not None:
            before = self.updater.placement
            try:
                self.updater.begin(self._retarget(live)[1], self._on_update_failure)
            except UpdateFailure as exc:
                self._abandon(exc)
            self._serve_committed(before)  # begin empties the first chunks' overwritten slots

    def _connect_peers(self, live: List[int], what: str = "transport",
                       connect: Optional[Callable[[List[int], int], None]] = None) -> List[int]:
        """Connect ``what`` (default the transport; ``connect(peers, attempt)`` otherwise, e.g. the
        dispatcher) to ``live``; returns the ranks it connected. A peer it fails on (dead since the
        plan, or only held dead here) is not simply left out by this rank alone: that view would be
        one nobody else forms, and both sides would wait out the connect deadline. Membership decides
        (a real death is agreed at once; a suspicion is withdrawn after its bound), and every rank
        connects to the agreed survivors."""
        if connect is None:
            connect = lambda peers, attempt: self.transport.set_peers(peers)  # noqa: E731
        for attempt in range(MAX_RECOVERIES):
            try:
                connect(live, attempt)
                return live
            except PeerFailure as exc:
                log.warning("rank %d: %s peers %s: %s", self.rank, what, live, exc)
                agreed = set(self._agreed_live_without(sorted(set(exc.ranks))))
                live = [r for r in live if r in agreed]
        raise RuntimeError(f"rank {self.rank}: peers kept dying while connecting the {what} to {live}")

    def adopt_update_membership(self, plan: StepPlan, changed: bool) -> None:
        """Adopt the live set for weight movement (collective) and start the plan's target, if any.
        Runs after serving: a failover retries its batches before any backup is re-homed."""
        import json

        live = sorted(plan.live)
        self.draining = list(plan.draining)
        if changed:
            joined = set(live) - set(self.live) or (self.updater is None)
            if joined:  # the new updater's backup fill needs the peers (set_live connects them otherwise)
                live = self._connect_peers(live)
                if self.updater is not None:
                    self.placement = self.updater.placement
                self._new_updater(plan.epoch, live)
            else:
                live = self._collective(
                    lambda lv: self.updater.set_live(live_mask(lv, self.R), generation=plan.epoch), live)
            self.live, self.epoch = live, plan.epoch
            self.dispatcher.set_placement(self.updater.placement)
        if plan.target is not None:
            target = placement_from_store(self.store, plan.target, self.R, self.E)
            self.update_load = np.asarray(json.loads(self.store.get(Keys.load(plan.target))))
            if (target.live_ranks.numpy() & ~self.updater.live).any():
                # A peer died under this step's collectives after the orchestrator planned the target:
                # re-plan it over the agreed survivors (every rank does the same).
                try:
                    target = self._retarget(np.flatnonzero(self.updater.live).tolist())[1]
                except UpdateFailure as exc:
                    self._abandon(exc)
                    return
            before = self.updater.placement
            self.updater.begin(target, self._on_update_failure)
            self._serve_committed(before)  # begin empties the first chunks' overwritten slots

    def move_chunk(self, update: UpdateFigures) -> float:
        """The step boundary of the pending update, if any; returns the pause it took. With the
        background updater it commits the chunk every rank has staged and keeps the next ones moving
        (the transfers run on its thread during the next forward pass); with the synchronous one it
        moves and commits one chunk."""
        if self.updater.target is None or self.updater.done:
            return 0.0
        t1 = time.perf_counter()
        before = self.updater.placement
        try:
            # A quiet boundary until the committed table is installed: the updater's threads start
            # nothing (no CPU or interpreter lock taken from it). Left before a recovery's waits.
            with self.updater.boundary():
                rep = self.updater.step()
                self._serve_committed(before)
        except UpdateFailure as exc:
            rep = None
            self._abandon(exc)
            self._serve_committed(before)
        except PeerFailure as exc:  # a second death while the updater handled a first one
            rep = None
            self._recover(exc, "update_replans")
            self._serve_committed(before)
        pause = time.perf_counter() - t1
        if rep is not None:
            update.add(rep)
        return pause

    def _serve_committed(self, before) -> None:
        """After a commit or a recovery (the placement is no longer ``before``): serve on what is committed."""
        placement = self.updater.placement
        if placement is not before:
            prepared = getattr(self.updater, "prepared", None)  # its routing table, built on the thread
            self.dispatcher.set_placement(prepared[1] if prepared and prepared[0] is placement else placement)

    def _abandon(self, exc: UpdateFailure) -> None:
        """Weights are gone (an expert lost every replica and its backup): keep serving on what is
        committed (its tokens follow the degraded policy) instead of taking serving down. Every rank
        hits this at the same point (plans are deterministic), so all abandon together."""
        self._count("updates_abandoned")
        self.abandoned = str(exc)
        self.updater.target = None

