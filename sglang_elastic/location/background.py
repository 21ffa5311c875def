"""Zero-stall rebalancing: expert weights move beside serving; a forward pass pays only the commit.

:class:`BackgroundUpdater` is an :class:`~.updater.ExpertLocationUpdater` whose chunks move on a
transport thread (on GPUs under a side CUDA stream) into staging while forward passes go on with the
placement in force. :meth:`BackgroundUpdater.step`, called once per step boundary on every rank:

1. **decides** on the oldest chunk in flight (:func:`.commit_rule.decide`): committed at boundary
   ``t`` iff every live rank's *ready* mark was written before boundary ``t - 1`` (each step exchanges
   tokens with every rank, so all ranks read the same marks and commit the same chunk together). The
   thread writes its mark the moment the chunk's copies and vote end (labelled with the next
   boundary, under a lock that boundary takes), and a poller reads every rank's once all exist
   (marks never change): the boundary then reads nothing. Commit = one fused copy of the staged rows
   into the weights and the placement the thread prepared; no token is routed to an uncommitted slot;
2. keeps ``depth`` chunks moving. The boundary is *quiet*: the transport thread and the poller start
   nothing while it lasts (the chunks it submits start when it ends); a caller whose own boundary
   work follows (installing the committed routing table) holds it longer with :meth:`boundary`.

**Faults**: a rank known dead (or silent for ``timeout_s``) that has not posted gets ``dead@t`` in
place of its mark (compare-and-set); a chunk whose vote found a death, or whose marks hold a verdict,
is committed nowhere: every survivor drains its thread at that boundary, runs the failure path
(``on_failure``, ``set_live``) and plans the chunk again. A slow rank delays only that chunk's commit.
Staging (``depth`` chunks) is allocated at :meth:`begin` and freed when the update completes.
"""
from __future__ import annotations

import logging
import threading
import time
import weakref
from collections import deque
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Callable, ContextManager, Deque, Dict, List, Optional, Sequence

import numpy as np
import torch

from ..eplb.placement import Placement
from ..transport.base import Copy, PeerFailure
from .backup import BackupLayout, assign_backups
from .commit_rule import backup_copies, decide, direct_to_empty, in_order, keep_slots, spare_rows, vacate
from .staging import StagingBuffers, bg_staging_name
from .threads import QUIET_MAX_S, SharedThreads, without_frames
from .updater import ChunkReport, ExpertLocationUpdater, Staged, UpdateFailure, _Transient

__all__ = ["BackgroundUpdater", "SharedThreads", "bg_staging_name", "decide"]

log = logging.getLogger(__name__)

_READY, _DEAD = "ready@", "dead@"  # the marks commit_rule.decide reads
_RETRIES = 3


@dataclass
class _Job:
    """One chunk moving in the background, and what its thread found."""

    index: int
    layers: List[int]
    buf: int
    done: threading.Event = field(default_factory=threading.Event)
    staged: Optional[Staged] = None                              # what the commit writes
    prepared: object = None                                      # prepare(placement after the commit)
    error: Optional[BaseException] = None
    report: Optional[ChunkReport] = None
    event: Optional[object] = None                               # CUDA event after the copies
    posted: bool = False
    posted_at: float = 0.0
    uid: int = 0                                                 # the plan it belongs to
    live: List[int] = field(default_factory=list)                # the ranks whose marks decide it
    keys: List[str] = field(default_factory=list)                # their mark keys
    final: Optional[Dict[int, str]] = None                       # every mark, read by the poller (final)
    before: List[int] = field(default_factory=list)              # layers of chunks committed before it
    started: float = 0.0                                         # when it was enqueued (monotonic)
    then: List[int] = field(default_factory=list)                # layers of the chunks moving after its commit
    base: Optional[torch.Tensor] = None                          # phy2log in force when it was enqueued


class BackgroundUpdater(StagingBuffers, ExpertLocationUpdater):
    """An :class:`ExpertLocationUpdater` whose chunks move beside serving (see the module docstring).

    Args (beyond the updater's):
        store: the store for ready marks (default: the vote's ``store``); required in background mode.
            A ``TCPStore`` gets a connection of its own here, so the boundary's reads never queue
            behind the transport thread's vote polls on a shared client.
        background: ``False`` runs the synchronous updater (every :meth:`step` moves and commits).
        depth: chunks staged or moving at once (1 or 2; staging is ``depth`` chunks).
        prefix: key prefix of the ready marks.
        prepare: ``prepare(placement) -> object``, run on the transport thread with the placement a
            chunk's commit will install (e.g. its routing tables); the commit sets :attr:`prepared` to
            ``(placement, result)``, so the caller's own per-commit host work leaves the boundary too
            (valid while ``prepared[0] is updater.placement``).
        shared: a :class:`SharedThreads` several updaters over one transport use (then ``store`` is
            not needed and :meth:`close` leaves the threads to their owner); default: one of its own.
        keep_sync_staging: keep the synchronous updater's staging allocated (a caller that shares one
            across updaters and moves some updates synchronously: peers never see it shrink).
        keep_slots: for a caller that routes by exactly this updater's placement (the rehearsal; not
            SGLang, which keeps its own metadata): move to :func:`.commit_rule.keep_slots` of each target
            (and re-plan), so experts a rank holds stay in their slot; empty a chunk's overwritten slots
            whose expert stays served elsewhere while it moves (:func:`.commit_rule.vacate`: they leave
            :attr:`placement`, so the caller must route by the placement after :meth:`begin` too), and
            write copies into slots that hold no expert in place (:func:`.commit_rule.direct_to_empty`):
            a commit copies only what overwrites an expert's last routed replica.
    """

    def __init__(self, *args, store=None, background: bool = True, depth: int = 2,
                 prefix: str = "sgle/ready", prepare: Optional[Callable[[Placement], object]] = None,
                 shared: Optional[SharedThreads] = None, keep_sync_staging: bool = False, keep_slots: bool = False,
                 **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.keep_slots = keep_slots
        self.prepare, self.prepared = prepare, None
        if depth not in (1, 2):
            raise ValueError(f"depth must be 1 or 2, got {depth!r}")
        self.background = bool(background)
        store = store if store is not None else getattr(self.vote, "store", None)
        if self.background and store is None and shared is None:
            raise ValueError("background mode needs a store for ready marks (store= or a StoreVote)")
        self._own_threads = shared is None
        self._threads = (shared or SharedThreads(store, f"sgle-{self.rank}")) if self.background else None
        self.store = self._threads.store if self.background else store
        # The transport thread posts marks and the poller reads them on a connection of their own.
        self._bg_store = self._threads.bg_store if self.background else None
        self.depth, self.prefix = depth, prefix
        self._boundary = 0
        self._label_lock = threading.Lock()   # a mark's label is the boundary it was written before
        self._closing = False
        self._uid = 0          # bumps at every (re)plan: keys of an abandoned plan are never read again
        self._inflight: Deque[_Job] = deque()
        self._next = 0         # chunks enqueued in the current plan
        self._chunks: List[List[int]] = []  # the current plan's chunks, in order
        # (placement, layers): the layers whose overwritten slots that placement has emptied (vacate)
        self._emptied: tuple = (None, frozenset())
        self._bufs: List[Dict[str, torch.Tensor]] = []
        self._broken: Optional[BaseException] = None  # a job failed: the thread skips the rest
        self._stream = None
        self.staging_peak = 0
        self._keep_sync = keep_sync_staging
        if self.background and not keep_sync_staging:  # the synchronous staging is not used: keep one row registered
            self._sync_staging(False)

    # ------------------------------------------------------------------ public surface
    @property
    def done(self) -> bool:
        return not self._pending and not self._inflight

    def begin(self, target: Placement, on_failure=None) -> List[int]:
        """Start moving to ``target``: plan the chunks, allocate staging, start the first transfers."""
        if self.keep_slots:
            target = keep_slots(self.placement, target)
            if on_failure is not None:  # its re-plans too (they become the target without begin)
                on_failure = self._kept(on_failure)
        if not self.background:
            return super().begin(target, on_failure)
        self._drain()
        layers = super().begin(target, on_failure)
        self._restart()
        return layers

    def _kept(self, hook: Callable) -> Callable:
        # The hook is stored on this updater: a strong reference to it from the hook would make a
        # reference cycle, keeping a replaced updater (backup rows, staging) until a full collection.
        me = weakref.ref(self)

        def kept(dead):
            live, target = hook(dead)
            return live, keep_slots(me().placement, target)
        return kept

    def set_live(self, live_ranks: Sequence, generation: Optional[int] = None) -> None:
        """Adopt a new live set (collective); chunks staged but not committed are planned again."""
        if self.background:
            self._drain()
            self._inflight.clear()
        super().set_live(live_ranks, generation)
        if self.background and self.target is not None:
            self._uid += 1
            self._plan_chunks()

    def fill_backup(self, layers: Optional[Sequence[int]] = None) -> int:
        if self.background:
            self._drain()
        return super().fill_backup(layers)

    def close(self) -> None:
        """Stop the transport thread (after the jobs it has) and free staging."""
        self._drain()
        self._closing = True
        if self.background and self._own_threads:  # its own store connections (see _own_client) close too
            self._threads.close()
        self._inflight.clear()
        self._free_staging()
        if self.background:
            self.store = self._bg_store = None
        # Callers' hooks may reference their owner, which references this updater: drop them.
        self._on_failure = self.prepare = self.prepared = None

    def boundary(self) -> ContextManager[None]:
        """Hold a quiet step boundary around the caller's own boundary work (e.g. :meth:`step` and
        installing the committed routing table): the transport thread and the poller start nothing
        until it ends, so it pays neither their CPU nor the interpreter lock. Nestable; a wait for
        the thread inside it (a recovery draining) lets the thread run. No-op in synchronous mode."""
        return self._threads.quiet() if self._threads is not None else nullcontext()

    def step(self) -> Optional[ChunkReport]:
        """One step boundary: commit the oldest chunk if every rank is ready, post this rank's ready
        mark, keep ``depth`` chunks moving. Returns the committed chunk's report, else ``None``
        (in synchronous mode: move and commit one chunk, as the updater does)."""
        if not self.background:
            return super().step()
        with self.boundary():
            return self._boundary_step()

    def _boundary_step(self) -> Optional[ChunkReport]:
        with self._label_lock:  # a mark the thread writes from now on is labelled t + 1
            t = self._boundary
            self._boundary += 1
        if self.target is None:
            return None
        rep = None
        if self._inflight:
            head = self._inflight[0]
            if not head.posted and time.monotonic() - head.started > self.timeout_s / 2:
                self._take_verdict(head)
            if head.posted:  # before its own post no rank can decide: nothing to read
                # Marks never change once written: the poller's complete read decides with no round trip.
                decided, dead = decide(head.final or self._read_posts(head, t), t)
                if decided:
                    rep = self._settle(head, dead)
            elif head.done.is_set():  # the thread could not post (a store error): post here
                self._post(head, t)
        self._enqueue()
        if self.done:
            if rep is not None and self.backup_layout is not None:  # the last commit, on every rank alike
                self._submit(self._final_rehome)
            self._free_staging(later=True)
        return rep

    def _final_rehome(self) -> None:
        """On the thread after the last commit (collective): back up what each chunk's own job could
        not (an expert its chunk brought back, e.g. reloaded from the checkpoint, had no committed
        source then). A death under it leaves the pairs it moved absent; the next set_live re-homes."""
        try:
            self._rehome()
        except (PeerFailure, _Transient) as exc:
            log.info("rank %d: re-homing after the update stopped: %r", self.rank, exc)

    def run(self):
        """Generator: the rest of the update back to back, one chunk per ``next()`` (stop-the-world
        callers: with no forward pass between calls the ready rule does not apply, so the chunks in
        flight are drained and discarded and the synchronous updater moves everything)."""
        if not self.background:
            yield from super().run()
            return
        self._drain()
        self._inflight.clear()
        self._free_staging()
        self._sync_staging(True)
        try:
            while True:
                rep = ExpertLocationUpdater.step(self)
                if rep is None:
                    return
                yield rep
        finally:
            if not self._keep_sync:
                self._sync_staging(False)

    def update_now(self, target: Placement, on_failure=None) -> List[ChunkReport]:
        """Move to ``target`` and commit it now, synchronously (no forward pass in between, e.g.
        SGLang's fault path): chunks in flight are drained and discarded, then :meth:`run`."""
        if not self.background:
            return self.update(target, on_failure)
        self._drain()
        self._inflight.clear()
        ExpertLocationUpdater.begin(self, target, on_failure)
        return list(self.run())

    # ------------------------------------------------------------------ boundary work
    def _key(self, job: _Job, rank: int) -> str:
        return f"{self.prefix}/{self.generation}/{self._uid}/{job.index}/{rank}"

    def _post(self, job: _Job, t: int) -> None:
        self.store.compare_set(self._key(job, self.rank), "", f"{_READY}{t}")
        job.posted, job.posted_at = True, time.monotonic()

    def _take_verdict(self, job: _Job) -> None:
        """A job still moving long after it began may have been given up on: peers write ``dead@b``
        in place of this rank's mark when it stays silent. That verdict is this rank's post, so it
        decides at the same boundary as its peers (waiting for its own post instead, it would answer
        the step while they recover at this boundary, and their recovery would wait for it forever)."""
        key = self._key(job, self.rank)
        mark = self.store.get(key).decode() if self.store.check([key]) else ""
        if mark.startswith(_DEAD):
            log.warning("rank %d: chunk %s: peers gave up on this rank (%s)", self.rank, list(job.layers), mark)
            job.posted, job.posted_at = True, time.monotonic()

    def _post_from_thread(self, job: _Job) -> None:
        """The transport thread's ready mark, the moment the job ended (so no boundary pays the round
        trip). Labelled with the next boundary, written before it starts (the label lock): the same
        guarantee as a post made at that boundary, so the commit rule is unchanged."""
        with self._label_lock:
            self._bg_store.compare_set(self._key(job, self.rank), "", f"{_READY}{self._boundary}")
            job.posted, job.posted_at = True, time.monotonic()
        self._threads.poll(self, job)

    def _poll_job(self, job: _Job) -> None:
        """On the poller: read every live rank's mark of a posted job once all exist (then they are
        final), so the boundary decides without a store round trip. Gives up on a job that was
        re-planned or whose ranks include one known dead (the boundary writes its verdict)."""
        delay = 0.001
        while job.final is None and not self._closing and job.uid == self._uid and not self._threads.stopping.is_set():
            if any(self.liveness.is_dead(r) for r in job.live):
                break
            self._threads.open.wait(QUIET_MAX_S)  # not during a boundary (which reads marks itself if needed)
            try:
                if self._bg_store.check(job.keys):
                    job.final = {r: v.decode() for r, v in zip(job.live, self._bg_store.multi_get(job.keys))}
                    break
            except RuntimeError as exc:  # the store is going away (shutdown): the boundary reads instead
                log.debug("rank %d: mark poll stopped: %r", self.rank, exc)
                break
            self.liveness.wait(delay)  # a death wakes it at once
            delay = min(2 * delay, 0.02)

    def _read_posts(self, job: _Job, t: int) -> Dict[int, Optional[str]]:
        """Every live rank's post for ``job`` (``None``: not posted). A rank known dead, or silent for
        the timeout after this rank's own post, gets the verdict ``dead@t`` (compare-and-set)."""
        live, keys = job.live, job.keys
        if self.store.check(keys):  # the common case: one round trip for the check, one to read
            return {r: v.decode() for r, v in zip(live, self.store.multi_get(keys))}
        silent = time.monotonic() - job.posted_at > self.timeout_s
        if not silent and not any(self.liveness.is_dead(r) for r in live):
            return {r: None for r in live}  # someone is still moving the chunk: wait, reading no more
        posts: Dict[int, Optional[str]] = {}
        for r, k in zip(live, keys):
            if self.store.check([k]):
                posts[r] = self.store.get(k).decode()
            elif self.liveness.is_dead(r) or silent:
                posts[r] = self.store.compare_set(k, "", f"{_DEAD}{t}").decode()
                log.warning("rank %d: chunk %s: rank %d %s at boundary %d: %s", self.rank, list(job.layers), r,
                            "known dead" if self.liveness.is_dead(r) else f"silent {self.timeout_s:g} s after this rank's post",
                            t, posts[r])
            else:
                posts[r] = None
        return posts

    def _settle(self, job: _Job, dead: List[int]) -> Optional[ChunkReport]:
        """Every rank decided on ``job`` at this boundary: commit it, or recover together."""
        err = job.error
        if isinstance(err, PeerFailure):
            dead = sorted(set(dead) | set(err.ranks))
        if not dead and err is None:
            self._inflight.popleft()
            self._commit(job)
            return job.report
        self._drain()  # the thread's remaining jobs end by knowledge (or were skipped)
        self._inflight.clear()
        if dead:
            return self._recover(job, dead)
        if isinstance(err, UpdateFailure):
            self.target = None
            raise err
        raise UpdateFailure(f"chunk {job.layers} failed on the transport thread: {err!r}") from err

    def _recover(self, job: _Job, dead: List[int]) -> ChunkReport:
        """The updater's failure path, at the same boundary on every survivor."""
        report = ChunkReport(layers=list(job.layers))
        while True:
            log.warning("rank %d: chunk %s failed (ranks %s given up on): re-planning", self.rank, list(job.layers), dead)
            report.failed_ranks.extend(r for r in dead if r not in report.failed_ranks)
            report.replans += 1
            try:
                self._handle_failure(dead)  # on_failure hook + set_live (re-plans: _uid bumps)
                break
            except PeerFailure as again:
                log.warning("rank %d: re-planning chunk %s: %s", self.rank, list(job.layers), again)
                dead = sorted(set(dead) | set(again.ranks))
        return report

    def _commit(self, job: _Job) -> None:
        """Write the staged rows into the weights and stamp the chunk's layers (the only pause)."""
        if job.event is not None:  # the side stream's copies precede the swap, without a host sync
            torch.cuda.current_stream().wait_event(job.event)
        self._commit_staged(job.staged)
        if job.staged.future is not None:  # it has the slots of the chunks moving next emptied already
            self._emptied = (self.placement, frozenset(job.then))
        self.prepared = (self.placement, job.prepared)
        self._pending = [l for l in self._pending if l not in job.layers]
        if self.canary:
            self._check(job.layers)

    def _restart(self) -> None:
        self._uid += 1
        self._plan_chunks()
        self._inflight.clear()
        if self._pending:
            self._alloc_staging()
        self._enqueue()

    def _plan_chunks(self) -> None:
        """Cut the layers left to move into chunks, in order (a new plan: enqueued from the first)."""
        n = self.layers_per_chunk
        self._chunks = [self._pending[i:i + n] for i in range(0, len(self._pending), n)]
        self._next = 0

    def _enqueue(self) -> None:
        """Keep ``depth`` chunks moving (a decision every rank makes identically). With
        ``keep_slots``, a chunk's overwritten slots leave routing as it starts (:func:`.commit_rule.vacate`;
        usually the commit before did it already, so this boundary changes nothing)."""
        if self.target is None:
            return
        while len(self._inflight) < self.depth and self._next < len(self._chunks):
            layers = self._chunks[self._next]
            if self.keep_slots:
                self._vacate(layers)
            self._alloc_staging()
            used = {j.buf for j in self._inflight}
            busy = sorted(l for j in self._inflight for l in j.layers)
            then = [l for c in self._chunks[self._next + 1:self._next + 1 + self.depth] for l in c]
            job = _Job(self._next, layers, min(b for b in range(self.depth) if b not in used),
                       before=busy, uid=self._uid, live=np.flatnonzero(self.live).tolist(),
                       then=then if self.keep_slots else [], base=self.placement.phy2log)
            job.keys = [self._key(job, r) for r in job.live]
            job.started = time.monotonic()
            self._next += 1
            self._inflight.append(job)
            self._submit(lambda job=job: self._transfer_job(job), job)

    def _vacated(self, phy: torch.Tensor, layers: List[int]) -> Optional[torch.Tensor]:
        """``phy`` with the overwritten slots of ``layers`` emptied (``None``: nothing to empty)."""
        if not layers:
            return None
        empty = vacate(phy[layers], self.target.phy2log[layers])
        if not bool(empty.any()):
            return None
        out = phy.clone()
        out[layers] = phy[layers].masked_fill(empty, -1)
        return out

    def _vacate(self, layers: List[int]) -> None:
        """Take the overwritten slots of ``layers`` out of the placement in force (the caller routes by
        it: no token reaches them from this boundary on, so the chunk writes them in place). Skipped
        where the placement in force has them emptied already (the commit before installed one made
        so on the thread): ``vacate`` is idempotent, and a steady boundary then computes nothing."""
        held, done = self._emptied
        if held is self.placement and done.issuperset(layers):
            return
        phy = self._vacated(self.placement.phy2log, layers)
        if phy is not None:
            self.placement = Placement(phy, self.placement.num_ranks, self.placement.num_logical_experts)
        self._emptied = (self.placement, (done if held is self.placement else frozenset()) | frozenset(layers))

    # ------------------------------------------------------------------ transport thread
    def _submit(self, fn: Callable[[], None], job: Optional[_Job] = None) -> None:
        if self._stream is None and self.weights and next(iter(self.weights.values())).is_cuda:
            self._stream = torch.cuda.Stream(device=next(iter(self.weights.values())).device)
        self._threads.submit(self, fn, job)

    def _run_job(self, fn: Callable[[], None], job: Optional[_Job]) -> None:
        """On the transport thread: one job of this updater, then its ready mark."""
        try:
            if self._broken is not None and job is not None:  # every rank skips the same chunks after an agreed failure
                log.info("rank %d: chunk %s skipped (an earlier job failed: %s)", self.rank, list(job.layers), self._broken)
                job.error = self._broken
                return
            try:
                if self._stream is not None:
                    with torch.cuda.stream(self._stream):
                        fn()
                else:
                    fn()
            except BaseException as exc:  # noqa: BLE001 - handed to the main thread at the boundary
                exc = without_frames(exc)
                log.info("rank %d: background job %s failed: %r", self.rank, job and list(job.layers), exc)
                self._broken = exc
                if job is not None:
                    job.error = exc
        finally:
            if job is not None:
                self._threads.open.wait(QUIET_MAX_S)  # labelled alike during the boundary or after it
                try:  # failed jobs post too: the vote gave every rank the same outcome
                    self._post_from_thread(job)
                except RuntimeError as exc:  # the boundary posts instead (its fallback)
                    log.debug("rank %d: ready mark from the thread failed: %r", self.rank, exc)
                job.done.set()

    def _drain(self) -> None:
        """Wait for the thread's queued jobs (collective: they end on every rank, by knowledge if a
        peer died), then clear the failure mark for what follows."""
        if self._threads is not None:
            self._threads.join()
        self._broken = None

    def _exec(self, copies: List[Copy]) -> None:
        for attempt in range(_RETRIES + 1):
            try:
                return self._execute(copies)  # copies + vote: the outcome is the same on every rank
            except _Transient as exc:
                if attempt == _RETRIES:
                    raise UpdateFailure(f"copies kept failing with every rank alive: {exc}") from exc
                self.transport.set_peers(np.flatnonzero(self.live).tolist(), rebuild=True)

    def _transfer_job(self, job: _Job) -> None:
        """Plan the chunk from live sources and move it into staging buffer ``job.buf``, with the
        backups re-homed for the placement after its commit, in one execute and one vote."""
        self._threads.open.wait(QUIET_MAX_S)  # checkpoints: no CPU (or GIL) taken from a boundary
        bufs = self._bufs[job.buf]
        staged = self._stage(job.layers, bufs, lambda name: bg_staging_name(name, job.buf))
        if self.keep_slots:  # an empty slot is unrouted only where routing follows this placement
            staged.copies, staged.rows = direct_to_empty(
                staged.copies, staged.rows, job.layers, self.placement.phy2log[job.layers] < 0, self.rank,
                self.placement.slots_per_rank, {w: bg_staging_name(w, job.buf) for w in self.weights}, bufs)
        # The placement once this chunk commits: chunks commit in order and any other change re-plans
        # every chunk in flight, so it is the one in force at its enqueue with the chunks up to this
        # one stamped. Read from the enqueue's snapshot, not from `placement` now: the main thread
        # empties later chunks' slots at boundaries this job may overlap (every rank must plan alike).
        cur = job.base
        future = cur.clone()
        future[job.before + job.layers] = self.target.phy2log[job.before + job.layers]
        # The chunks moving after this commit (the one enqueued at it included) have their slots
        # emptied in this placement already (vacate is idempotent; their layers change in no other
        # way meanwhile), so the table prepared from it holds at that boundary.
        vacated = self._vacated(future, job.then)
        future = future if vacated is None else vacated
        staged.future = Placement(future, self.placement.num_ranks, self.placement.num_logical_experts)
        if self.prepare is not None:  # e.g. the routing tables of that placement, off the boundary
            job.prepared = self.prepare(staged.future)
        rehome = self._rehome_copies(job, cur, staged.future) if self.backup_layout is not None else None
        self._threads.open.wait(QUIET_MAX_S)
        try:
            for copies in in_order(staged.copies, rehome[0] if rehome else []):
                self._exec(copies)
        except (PeerFailure, UpdateFailure):
            if rehome:
                self._unfill(*rehome)
            raise
        if self._stream is not None:
            job.event = torch.cuda.Event()
            job.event.record(self._stream)
        job.staged, job.report = staged, staged.report

    def _rehome_copies(self, job: _Job, cur: torch.Tensor, fut: Placement):
        """Backups re-homed for ``fut``, the placement as it will be once ``job`` commits (backups off
        the ranks that will serve their expert), adopted now and filled in the job's execute. Sources
        are the committed rows ``cur`` outside the chunks that may commit meanwhile (``job.before``):
        the same on every rank whatever the commit timing. Returns ``(copies, prev, moved)``."""
        prev = self.backup_layout
        layout = assign_backups(fut, self.live, self.ranks_per_node, previous=prev,
                                rows_per_rank=prev.rows_per_rank, degrade=True)
        self._count_uncovered(layout)
        holder, row = layout.holder.clone(), layout.row.clone()
        moved = layout.refills(prev)
        spare_rows(prev, holder, row, moved, layout.rows_per_rank)
        stable = torch.ones(cur.shape, dtype=torch.bool)
        stable[job.before] = False
        src = Placement(cur.clone(), self.placement.num_ranks, self.placement.num_logical_experts)
        copies, lost = backup_copies(src, self.live, holder, row, list(self.weights), moved.nonzero().tolist(), stable)
        self.backup_layout = BackupLayout(holder, row, layout.rows_per_rank, layout.uncovered)
        if lost:  # no source now: keep the previous backup where it is still intact
            gone = torch.zeros_like(moved)
            for l, e in lost:
                gone[l, e] = True
            self._unfill(copies, prev, gone)
            moved &= ~gone
        return copies, prev, moved

    def _unfill(self, copies: List[Copy], prev: BackupLayout, moved: torch.Tensor) -> None:
        """The ``moved`` backups were not filled: mark them absent, or back on their previous holder
        and row where no copy wrote it and no other pair took it (a death mid-way loses no insurance)."""
        holder, row = self.backup_layout.holder, self.backup_layout.row
        holder[moved] = -1
        written = {(c.dst, c.dst_row) for c in copies if c.dst_name.startswith("backup")}
        for l, e in moved.nonzero().tolist():
            h, r = int(prev.holder[l, e]), int(prev.row[l, e])
            if h >= 0 and (h, r) not in written:  # its row is intact (rows are unique per layout)
                holder[l, e], row[l, e] = h, r
