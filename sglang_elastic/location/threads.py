"""Threads and store connections of background updaters (:mod:`.background`), shareable by several."""
from __future__ import annotations

import atexit
import logging
import os
import queue
import threading
import traceback
import weakref
from contextlib import contextmanager
from typing import Callable, Iterator, Optional

import torch

__all__ = ["SharedThreads", "without_frames", "QUIET_MAX_S", "BACKGROUND_NICE", "lower_priority", "nice_from_env"]

log = logging.getLogger(__name__)

# The longest a queued job (or the poller) waits for a held boundary to end: far below any peer's
# timeout, so a boundary held long (e.g. one waiting on membership) never makes this rank look silent.
QUIET_MAX_S = 0.05

# How much lower than serving the updater's threads run (Linux ``nice`` increment, per thread). A rank's
# boundary can only keep its own threads quiet; its peers' threads (planning the chunk they just
# submitted, copying) ran beside it on a loaded CPU and took its core for a scheduler slice (the 2-5 ms
# boundaries of the CPU rehearsal). Lower-priority threads yield the core to a serving thread that
# wakes, and still get every core serving leaves idle. ``SGLANG_ELASTIC_UPDATER_NICE`` overrides it.
BACKGROUND_NICE = 10


def lower_priority(increment: int) -> None:
    """Lower the calling thread's CPU priority by ``increment`` (Linux: per-thread nice; elsewhere, or
    where refused, nothing). Unprivileged processes may always lower their own threads' priority."""
    if increment <= 0 or not hasattr(os, "setpriority") or not hasattr(threading, "get_native_id"):
        return
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(os.getpriority(os.PRIO_PROCESS, tid) + increment, 19))
    except OSError as exc:
        log.debug("could not lower the updater thread's priority: %r", exc)


def nice_from_env() -> int:
    """The updater threads' nice increment: ``SGLANG_ELASTIC_UPDATER_NICE`` or :data:`BACKGROUND_NICE`;
    anything but an integer >= 0 is a ``ValueError`` naming the variable."""
    raw = os.environ.get("SGLANG_ELASTIC_UPDATER_NICE")
    if raw is None:
        return BACKGROUND_NICE
    try:
        nice = int(raw)
    except ValueError:
        nice = -1
    if nice < 0:
        raise ValueError(f"SGLANG_ELASTIC_UPDATER_NICE must be an integer >= 0, got {raw!r}")
    return nice


# How long the exit hook waits for each thread: a job mid-transfer at exit is not waited out.
EXIT_JOIN_S = 2.0


class SharedThreads:
    """The transport thread, the mark poller and the two store connections of background updaters.

    One updater makes its own; several updaters over ONE transport (SGLang's bridge: one per MoE
    layer) share one, so their jobs run one at a time in submission order, as one updater's do, and
    a process keeps two threads and two store connections however many layers it has.

    **Quiet boundaries**: while a step boundary is held (:meth:`hold`/:meth:`release`, nestable) both
    threads start nothing new: a job submitted then is queued at the release (so nothing even wakes
    the thread), one queued before waits before it starts, and the poller before its next read. On a
    loaded CPU the boundary's worst pauses were the transport thread planning the chunk just
    submitted (1-3 ms of CPU taken from the boundary's thread, and the interpreter lock with it).

    **Lower priority**: both threads run ``nice`` steps below serving (default
    :data:`BACKGROUND_NICE`, env ``SGLANG_ELASTIC_UPDATER_NICE``; ``0`` keeps them equal), so that
    on a CPU shared by several ranks a peer's transfer work does not hold the core a boundary needs.
    """

    def __init__(self, store, name: str = "sgle", nice: Optional[int] = None) -> None:
        self.nice = nice_from_env() if nice is None else max(int(nice), 0)
        self.store = _own_client(store)       # the boundary's reads and verdicts (caller's thread)
        self.bg_store = _own_client(store)    # the transport thread's marks and the poller's reads
        self.name = name
        self.jobs: "queue.Queue" = queue.Queue()
        self.polls: "queue.Queue" = queue.Queue()
        self.thread: Optional[threading.Thread] = None
        self.poller: Optional[threading.Thread] = None
        self.open = threading.Event()         # cleared while a step boundary is held
        self.open.set()
        self._holds = 0
        self._held: list = []                 # jobs submitted while held, queued at the release
        self._hold_lock = threading.Lock()
        self.stopping = threading.Event()     # set by stop(): the poller gives up its job at once
        _ALL.add(self)

    def hold(self) -> None:
        """A step boundary starts: the threads start nothing until the matching :meth:`release`."""
        with self._hold_lock:
            self._holds += 1
            self.open.clear()

    def release(self) -> None:
        with self._hold_lock:
            self._holds = max(self._holds - 1, 0)
            if not self._holds:
                self._flush()

    @contextmanager
    def quiet(self) -> Iterator[None]:
        """:meth:`hold` for the ``with`` block."""
        self.hold()
        try:
            yield
        finally:
            self.release()

    def _flush(self) -> None:
        """Open the threads and queue the held jobs (under ``_hold_lock``)."""
        self.open.set()
        held, self._held = self._held, []
        for item in held:
            self.jobs.put(item)

    def submit(self, owner, fn: Callable[[], None], job) -> None:
        if self.thread is None:
            self.thread = threading.Thread(target=self._work, name=f"{self.name}-updater", daemon=True)
            self.thread.start()
        with self._hold_lock:
            if self._holds:
                self._held.append((owner, fn, job))
            else:
                self.jobs.put((owner, fn, job))

    def poll(self, owner, job) -> None:
        if self.poller is None:
            self.poller = threading.Thread(target=self._poll, name=f"{self.name}-marks", daemon=True)
            self.poller.start()
        self.polls.put((owner, job))

    def join(self) -> None:
        """Wait for every queued job (of every owner). A boundary that waits for them lets them run
        (the threads stay open for the rest of it)."""
        with self._hold_lock:
            self._flush()
        if self.thread is not None:
            self.jobs.join()

    def close(self) -> None:
        """Stop both threads (after the jobs queued) and drop the store connections."""
        self.stop()
        self.store = self.bg_store = None

    def stop(self, timeout: Optional[float] = None, discard: bool = False) -> None:
        """Stop both threads: the transport thread after the jobs queued (``discard``: after the one
        it runs, the rest dropped), the poller at once (a mark it still waits for is read at the
        boundary, if one comes). ``timeout`` bounds each join."""
        self.stopping.set()
        with self._hold_lock:
            if discard:
                self._held = []
                while True:
                    try:
                        self.jobs.get_nowait()
                    except queue.Empty:
                        break
                    self.jobs.task_done()
            self._flush()
        for q, attr in ((self.jobs, "thread"), (self.polls, "poller")):
            t = getattr(self, attr)
            if t is not None:
                q.put(None)
                t.join(timeout)
                if not t.is_alive():
                    setattr(self, attr, None)

    def _work(self) -> None:
        lower_priority(self.nice)
        while True:
            item = self.jobs.get()
            try:
                if item is None:
                    return
                self.open.wait(QUIET_MAX_S)
                item[0]._run_job(item[1], item[2])
            finally:
                self.jobs.task_done()

    def _poll(self) -> None:
        lower_priority(self.nice)
        while True:
            item = self.polls.get()
            if item is None:
                return
            item[0]._poll_job(item[1])


_ALL: "weakref.WeakSet[SharedThreads]" = weakref.WeakSet()


@atexit.register
def _stop_all() -> None:
    """At interpreter exit, stop every live :class:`SharedThreads`' threads. They are daemon threads,
    and one left inside a store call (the poller's read) when the interpreter finalizes is ended by
    a forced unwind through C++ code that does not allow it: the process aborts ("terminate called
    without an active exception") after the program ended normally. Exit hooks run before that.
    Jobs still queued are dropped: a chunk queued for a process that is ending is moot."""
    for threads in list(_ALL):
        threads.stop(EXIT_JOIN_S, discard=True)


def _own_client(store):
    """A connection of its own to ``store`` when it is a ``TCPStore`` (else ``store`` itself)."""
    if isinstance(store, torch.distributed.TCPStore):
        return torch.distributed.TCPStore(store.host, store.port, is_master=False, timeout=store.timeout)
    return store


def without_frames(exc: BaseException) -> BaseException:
    """``exc`` (and the exceptions chained to it) without tracebacks; their text becomes a note.

    A job's error is kept on the job and the updater, and its traceback's frames hold both (the
    chunk job is a lambda over the job; the methods' frames hold the updater) and the chunk's
    copies and staging views: a reference cycle that only a full garbage collection frees, so a
    long-running process kept every failed chunk's tensors for minutes."""
    text = "".join(traceback.format_exception(exc)).rstrip()
    e: Optional[BaseException] = exc
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        e.__traceback__ = None
        e = e.__cause__ or e.__context__
    exc.add_note(f"raised on the updater's transport thread:\n{text}")
    return exc
