"""Threads and store connections of background updaters (:mod:`.background`), shareable by several."""
from __future__ import annotations

import queue
import threading
import traceback
from contextlib import contextmanager
from typing import Callable, Iterator, Optional

import torch

__all__ = ["SharedThreads", "without_frames", "QUIET_MAX_S"]

# The longest a queued job (or the poller) waits for a held boundary to end: far below any peer's
# timeout, so a boundary held long (e.g. one waiting on membership) never makes this rank look silent.
QUIET_MAX_S = 0.05


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
    """

    def __init__(self, store, name: str = "sgle") -> None:
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
        with self._hold_lock:
            self._flush()
        for q, attr in ((self.jobs, "thread"), (self.polls, "poller")):
            t = getattr(self, attr)
            if t is not None:
                q.put(None)
                t.join()
                setattr(self, attr, None)
        self.store = self.bg_store = None

    def _work(self) -> None:
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
        while True:
            item = self.polls.get()
            if item is None:
                return
            item[0]._poll_job(item[1])


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
