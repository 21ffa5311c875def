"""Threads and store connections of background updaters (:mod:`.background`), shareable by several."""
from __future__ import annotations

import queue
import threading
from typing import Callable, Optional

import torch

__all__ = ["SharedThreads"]


class SharedThreads:
    """The transport thread, the mark poller and the two store connections of background updaters.

    One updater makes its own; several updaters over ONE transport (SGLang's bridge: one per MoE
    layer) share one, so their jobs run one at a time in submission order, as one updater's do, and
    a process keeps two threads and two store connections however many layers it has.
    """

    def __init__(self, store, name: str = "sgle") -> None:
        self.store = _own_client(store)       # the boundary's reads and verdicts (caller's thread)
        self.bg_store = _own_client(store)    # the transport thread's marks and the poller's reads
        self.name = name
        self.jobs: "queue.Queue" = queue.Queue()
        self.polls: "queue.Queue" = queue.Queue()
        self.thread: Optional[threading.Thread] = None
        self.poller: Optional[threading.Thread] = None

    def submit(self, owner, fn: Callable[[], None], job) -> None:
        if self.thread is None:
            self.thread = threading.Thread(target=self._work, name=f"{self.name}-updater", daemon=True)
            self.thread.start()
        self.jobs.put((owner, fn, job))

    def poll(self, owner, job) -> None:
        if self.poller is None:
            self.poller = threading.Thread(target=self._poll, name=f"{self.name}-marks", daemon=True)
            self.poller.start()
        self.polls.put((owner, job))

    def join(self) -> None:
        """Wait for every queued job (of every owner)."""
        if self.thread is not None:
            self.jobs.join()

    def close(self) -> None:
        """Stop both threads (after the jobs queued) and drop the store connections."""
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
