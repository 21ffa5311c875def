"""Zero-stall rebalancing: expert weights move beside serving; a forward pass pays only the commit.

:class:`BackgroundUpdater` is an :class:`~.updater.ExpertLocationUpdater` whose chunks move on a
transport thread (on GPUs under a side CUDA stream) into staging while forward passes go on with the
placement in force. :meth:`BackgroundUpdater.step` is called once per step boundary (SGLang's
``EPLBManager`` calls it once per forward pass, the rehearsal once per step) and does, in order:

1. **decide** on the oldest chunk in flight: it is committed at boundary ``t`` iff every live rank
   posted *ready* (its transport thread finished the chunk's copies and their vote) at a boundary
   ``<= t - 1``. Every step exchanges tokens with every rank (EP), so a post made at boundary
   ``t - 1`` is visible to every rank at boundary ``t``: the decision reads the same posts on every
   rank, and all ranks commit the same chunk at the same boundary, with no extra round of waiting.
   Commit = the staged rows written into the weights, the chunk's layers stamped in the placement.
   A token is therefore never routed to a slot whose new weights are not committed;
2. **post** this rank's ready mark for the oldest chunk once its thread finished it (one
   compare-and-set; a store check per boundary reads everyone's);
3. **enqueue** the next chunks so that ``depth`` (default 2) are staged or moving.

The jobs a transport thread runs are the same on every rank in the same order (enqueues happen only
at agreed decisions), so their collectives (copies, votes) pair up across ranks. The chunk outcome is
the vote's, the same on every survivor. **Faults**: a rank known dead (the process's
:class:`~sglang_elastic.transport.Liveness`) that has not posted gets a verdict ``dead@t`` written in
place of its post by compare-and-set (so every rank reads either its post or the verdict; like a post,
a verdict counts from the next boundary); a chunk whose vote found a death, or whose posts hold a
verdict, is not committed anywhere: at that same boundary every survivor drains its thread (whose
waits end by knowledge), runs the updater's failure path (``on_failure`` hook, ``set_live``) and plans
the chunk again from live sources. Serving never waits for a transfer: a rank that falls behind
delays only that chunk's commit.

Fixed costs are paid once per update: all chunks are known at :meth:`begin`, staging (``depth``
chunks) is allocated and registered there and freed when the update completes
(:meth:`staging_bytes`). ``background=False`` keeps the synchronous updater (the baseline).
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Deque, Dict, List, Optional, Sequence

import numpy as np
import torch

from ..eplb.placement import Placement
from ..transport.base import Copy, PeerFailure
from .backup import BackupLayout, assign_backups
from .commit_rule import backup_copies, decide, spare_rows
from .updater import ChunkReport, ExpertLocationUpdater, Staged, UpdateFailure, _Transient

__all__ = ["BackgroundUpdater", "bg_staging_name", "decide"]

log = logging.getLogger(__name__)

_READY, _DEAD = "ready@", "dead@"  # the marks commit_rule.decide reads
_RETRIES = 3


def bg_staging_name(weight_name: str, buf: int) -> str:
    """Name under which staging buffer ``buf`` of ``weight_name`` is registered."""
    return f"staging/bg{buf}/{weight_name}"


@dataclass
class _Job:
    """One chunk moving in the background, and what its thread found."""

    index: int
    layers: List[int]
    buf: int
    done: threading.Event = field(default_factory=threading.Event)
    staged: Optional[Staged] = None                              # what the commit writes
    error: Optional[BaseException] = None
    report: Optional[ChunkReport] = None
    event: Optional[object] = None                               # CUDA event after the copies
    posted: bool = False
    posted_at: float = 0.0
    before: List[int] = field(default_factory=list)              # layers of chunks committed before it


class BackgroundUpdater(ExpertLocationUpdater):
    """An :class:`ExpertLocationUpdater` whose chunks move beside serving (see the module docstring).

    Args (beyond the updater's):
        store: the store for ready marks (default: the vote's ``store``); required in background mode.
            A ``TCPStore`` gets a connection of its own here, so the boundary's reads never queue
            behind the transport thread's vote polls on a shared client.
        background: ``False`` runs the synchronous updater (every :meth:`step` moves and commits).
        depth: chunks staged or moving at once (1 or 2; staging is ``depth`` chunks).
        prefix: key prefix of the ready marks.
    """

    def __init__(self, *args, store=None, background: bool = True, depth: int = 2,
                 prefix: str = "sgle/ready", **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if depth not in (1, 2):
            raise ValueError(f"depth must be 1 or 2, got {depth!r}")
        self.background = bool(background)
        store = store if store is not None else getattr(self.vote, "store", None)
        if self.background and store is None:
            raise ValueError("background mode needs a store for ready marks (store= or a StoreVote)")
        self.store = _own_client(store) if self.background else store
        self.depth, self.prefix = depth, prefix
        self._boundary = 0
        self._uid = 0          # bumps at every (re)plan: keys of an abandoned plan are never read again
        self._inflight: Deque[_Job] = deque()
        self._next = 0         # chunks enqueued in the current plan
        self._bufs: List[Dict[str, torch.Tensor]] = []
        self._jobs: "queue.Queue" = queue.Queue()
        self._thread: Optional[threading.Thread] = None
        self._broken: Optional[BaseException] = None  # a job failed: the thread skips the rest
        self._stream = None
        self.staging_peak = 0
        if self.background:  # the synchronous staging is not used: keep one row registered
            self._sync_staging(False)

    # ------------------------------------------------------------------ staging
    def _placeholder(self, t: torch.Tensor) -> torch.Tensor:
        return torch.empty((1,) + tuple(t.shape[2:]), dtype=t.dtype, device=t.device)

    def _sync_staging(self, on: bool) -> None:
        """Allocate (``on``) or shrink to one row the synchronous updater's staging."""
        from .updater import staging_name

        rows = self.layers_per_chunk * self.placement.slots_per_rank if on else 1
        for name, t in self.weights.items():
            if self._staging[name].shape[0] != rows:
                self._staging[name] = torch.empty((rows,) + tuple(t.shape[2:]), dtype=t.dtype, device=t.device)
                self.transport.register(staging_name(name), self._staging[name].view(rows, -1))

    def _alloc_staging(self) -> None:
        if self._bufs:
            return
        S = self.placement.slots_per_rank
        for b in range(self.depth):
            bufs = {}
            for name, t in self.weights.items():
                bufs[name] = torch.empty((self.layers_per_chunk * S,) + tuple(t.shape[2:]), dtype=t.dtype,
                                         device=t.device)
                self.transport.register(bg_staging_name(name, b), bufs[name].view(bufs[name].shape[0], -1))
            self._bufs.append(bufs)
        self.staging_peak = max(self.staging_peak, self.staging_bytes())

    def _free_staging(self) -> None:
        if not self._bufs:
            return
        for b in range(len(self._bufs)):
            for name, t in self.weights.items():
                self.transport.register(bg_staging_name(name, b), self._placeholder(t).view(1, -1))
        self._bufs = []

    def staging_bytes(self) -> int:
        """Bytes of background staging allocated now (``depth`` chunks during an update, 0 after)."""
        return sum(t.numel() * t.element_size() for bufs in self._bufs for t in bufs.values())

    # ------------------------------------------------------------------ public surface
    @property
    def done(self) -> bool:
        return not self._pending and not self._inflight

    def begin(self, target: Placement, on_failure=None) -> List[int]:
        """Start moving to ``target``: plan the chunks, allocate staging, start the first transfers."""
        if not self.background:
            return super().begin(target, on_failure)
        self._drain()
        layers = super().begin(target, on_failure)
        self._restart()
        return layers

    def set_live(self, live_ranks: Sequence, generation: Optional[int] = None) -> None:
        """Adopt a new live set (collective); chunks staged but not committed are planned again."""
        if self.background:
            self._drain()
            self._inflight.clear()
        super().set_live(live_ranks, generation)
        if self.background and self.target is not None:
            self._uid += 1
            self._next = 0

    def fill_backup(self, layers: Optional[Sequence[int]] = None) -> int:
        if self.background:
            self._drain()
        return super().fill_backup(layers)

    def close(self) -> None:
        """Stop the transport thread (after the jobs it has) and free staging."""
        self._drain()
        if self._thread is not None:
            self._jobs.put(None)
            self._thread.join()
            self._thread = None
        self._inflight.clear()
        self._free_staging()

    def step(self) -> Optional[ChunkReport]:
        """One step boundary: commit the oldest chunk if every rank is ready, post this rank's ready
        mark, keep ``depth`` chunks moving. Returns the committed chunk's report, else ``None``
        (in synchronous mode: move and commit one chunk, as the updater does)."""
        if not self.background:
            return super().step()
        t = self._boundary
        self._boundary += 1
        if self.target is None:
            return None
        rep = None
        if self._inflight:
            head = self._inflight[0]
            if head.posted:  # before its own post no rank can decide: nothing to read
                decided, dead = decide(self._read_posts(head, t), t)
                if decided:
                    rep = self._settle(head, dead)
            elif head.done.is_set():  # decisive from the next boundary on
                self._post(head, t)
        self._enqueue()
        if self.done:
            self._free_staging()
        return rep

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
            self._sync_staging(False)

    # ------------------------------------------------------------------ boundary work
    def _key(self, job: _Job, rank: int) -> str:
        return f"{self.prefix}/{self.generation}/{self._uid}/{job.index}/{rank}"

    def _post(self, job: _Job, t: int) -> None:
        self.store.compare_set(self._key(job, self.rank), "", f"{_READY}{t}")
        job.posted, job.posted_at = True, time.monotonic()

    def _read_posts(self, job: _Job, t: int) -> Dict[int, Optional[str]]:
        """Every live rank's post for ``job`` (``None``: not posted). A rank known dead, or silent for
        the timeout after this rank's own post, gets the verdict ``dead@t`` (compare-and-set)."""
        live = np.flatnonzero(self.live).tolist()
        keys = [self._key(job, r) for r in live]
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
            else:
                posts[r] = None
        return posts

    def _settle(self, job: _Job, dead: List[int]) -> Optional[ChunkReport]:
        """Every rank decided on ``job`` at this boundary: commit it, or recover together."""
        err = job.error
        if isinstance(err, PeerFailure):
            dead = sorted(set(dead) | set(getattr(err, "ranks", None) or [err.rank]))
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
            report.failed_ranks.extend(r for r in dead if r not in report.failed_ranks)
            report.replans += 1
            try:
                self._handle_failure(dead)  # on_failure hook + set_live (re-plans: _uid bumps)
                break
            except PeerFailure as again:
                dead = sorted(set(dead) | set(getattr(again, "ranks", None) or [again.rank]))
        return report

    def _commit(self, job: _Job) -> None:
        """Write the staged rows into the weights and stamp the chunk's layers (the only pause)."""
        if job.event is not None:  # the side stream's copies precede the swap, without a host sync
            torch.cuda.current_stream().wait_event(job.event)
        self._commit_staged(job.staged, self._bufs[job.buf])
        self._pending = [l for l in self._pending if l not in job.layers]
        if self.canary:
            self._check(job.layers)

    def _restart(self) -> None:
        self._uid += 1
        self._next = 0
        self._inflight.clear()
        if self._pending:
            self._alloc_staging()
        self._enqueue()

    def _enqueue(self) -> None:
        """Keep ``depth`` chunks moving (a decision every rank makes identically)."""
        if self.target is None:
            return
        busy = {l for j in self._inflight for l in j.layers}
        while len(self._inflight) < self.depth:
            layers = [l for l in self._pending if l not in busy][: self.layers_per_chunk]
            if not layers:
                return
            self._alloc_staging()
            used = {j.buf for j in self._inflight}
            job = _Job(self._next, layers, min(b for b in range(self.depth) if b not in used),
                       before=sorted(busy))
            self._next += 1
            busy |= set(layers)
            self._inflight.append(job)
            self._submit(lambda job=job: self._transfer_job(job), job)

    # ------------------------------------------------------------------ transport thread
    def _submit(self, fn: Callable[[], None], job: Optional[_Job] = None) -> None:
        if self._thread is None:
            if self.weights and next(iter(self.weights.values())).is_cuda:
                self._stream = torch.cuda.Stream(device=next(iter(self.weights.values())).device)
            self._thread = threading.Thread(target=self._worker, name=f"sgle-updater-{self.rank}", daemon=True)
            self._thread.start()
        self._jobs.put((fn, job))

    def _worker(self) -> None:
        while True:
            item = self._jobs.get()
            try:
                if item is None:
                    return
                fn, job = item
                if self._broken is not None:  # every rank skips the same jobs after an agreed failure
                    if job is not None:
                        job.error = self._broken
                    continue
                try:
                    if self._stream is not None:
                        with torch.cuda.stream(self._stream):
                            fn()
                    else:
                        fn()
                except BaseException as exc:  # noqa: BLE001 - handed to the main thread at the boundary
                    self._broken = exc
                    if job is not None:
                        job.error = exc
            finally:
                if item is not None and item[1] is not None:
                    item[1].done.set()
                self._jobs.task_done()

    def _drain(self) -> None:
        """Wait for the thread's queued jobs (collective: they end on every rank, by knowledge if a
        peer died), then clear the failure mark for what follows."""
        if self._thread is not None:
            self._jobs.join()
        self._broken = None

    def _exec(self, copies: List[Copy]) -> None:
        for attempt in range(_RETRIES + 1):
            try:
                return self._execute(copies)  # copies + vote: the outcome is the same on every rank
            except _Transient as exc:
                if attempt == _RETRIES:
                    raise UpdateFailure(f"copies kept failing with every rank alive: {exc}") from exc
                self.transport.set_peers(np.flatnonzero(self.live).tolist())

    def _transfer_job(self, job: _Job) -> None:
        """Plan the chunk from live sources and move it into staging buffer ``job.buf``, with the
        backups re-homed for the placement after its commit, in one execute and one vote."""
        bufs = self._bufs[job.buf]
        staged = self._stage(job.layers, bufs, lambda name: bg_staging_name(name, job.buf))
        rehome = self._rehome_copies(job) if self.backup_layout is not None else None
        try:
            self._exec(staged.copies + (rehome[0] if rehome else []))
        except (PeerFailure, UpdateFailure):
            if rehome:
                self._unfill(*rehome)
            raise
        if self._stream is not None:
            job.event = torch.cuda.Event()
            job.event.record(self._stream)
        job.staged, job.report = staged, staged.report

    def _rehome_copies(self, job: _Job):
        """Backups re-homed for the placement as it will be once ``job`` commits (backups off the ranks
        that will serve their expert), adopted now and filled in the job's execute. Sources are this
        rank's committed rows outside the chunks that may commit meanwhile (``job.before``): the
        same on every rank whatever the commit timing. Returns ``(copies, prev, moved)``."""
        cur = self.placement.phy2log
        future = cur.clone()
        future[job.before + job.layers] = self.target.phy2log[job.before + job.layers]
        fut = Placement(future, self.placement.num_ranks, self.placement.num_logical_experts)
        prev = self.backup_layout
        layout = assign_backups(fut, self.live, self.ranks_per_node, previous=prev,
                                rows_per_rank=prev.rows_per_rank, degrade=True)
        self._count_uncovered(layout)
        holder, row = layout.holder.clone(), layout.row.clone()
        moved = (holder != prev.holder) & (holder >= 0)
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


def _own_client(store):
    """A connection of its own to ``store`` when it is a ``TCPStore`` (else ``store`` itself)."""
    if isinstance(store, torch.distributed.TCPStore):
        return torch.distributed.TCPStore(store.host, store.port, is_master=False, timeout=store.timeout)
    return store
