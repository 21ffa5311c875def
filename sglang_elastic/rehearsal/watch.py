"""Same-host knowledge of a child's death, at once: one pidfd per rank process, one thread polling them.

The kernel makes a pidfd readable when its process exits, so the orchestrator learns of a SIGKILL in
microseconds and tells membership (:meth:`MembershipServer.declare_dead`), instead of waiting for
heartbeats. This adds to membership's own detection (it works only for processes on this host);
frozen processes are still found by heartbeats, like on a real cluster.
"""
from __future__ import annotations

import logging
import os
import select
import threading
from typing import Callable, Dict, Tuple

__all__ = ["ChildWatcher"]

log = logging.getLogger(__name__)


class ChildWatcher:
    """Calls ``on_exit(rank, pid)`` from its own thread when a watched process exits."""

    def __init__(self, on_exit: Callable[[int, int], None]) -> None:
        self.on_exit = on_exit
        self._poll = select.poll()
        self._fds: Dict[int, Tuple[int, int]] = {}    # fd -> (rank, pid)
        self._lock = threading.Lock()
        self._wake_r, self._wake_w = os.pipe()
        self._poll.register(self._wake_r, select.POLLIN)
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="rehearsal-child-watcher", daemon=True)
        self._thread.start()

    def add(self, rank: int, pid: int) -> None:
        """Watch process ``pid`` (rank ``rank``)."""
        try:
            fd = os.pidfd_open(pid)
        except (AttributeError, OSError) as exc:  # no pidfd (old kernel): membership's detection still works
            log.info("no pidfd for rank %d (pid %d): %s", rank, pid, exc)
            return
        with self._lock:
            self._fds[fd] = (rank, pid)
            self._poll.register(fd, select.POLLIN)
        os.write(self._wake_w, b"x")

    def _run(self) -> None:
        while not self._stop:
            for fd, _ in self._poll.poll():
                if fd == self._wake_r:
                    os.read(self._wake_r, 4096)
                    continue
                with self._lock:
                    who = self._fds.pop(fd, None)
                    self._poll.unregister(fd)
                os.close(fd)
                if who is not None:
                    try:
                        self.on_exit(*who)
                    except Exception:  # noqa: BLE001 - a failed notice leaves detection to heartbeats
                        log.exception("child watcher: notice for rank %d failed", who[0])

    def close(self) -> None:
        """Stop the thread and close every pidfd."""
        self._stop = True
        os.write(self._wake_w, b"x")
        self._thread.join(timeout=5)
        with self._lock:
            for fd in self._fds:
                os.close(fd)
            self._fds.clear()
        os.close(self._wake_r)
        os.close(self._wake_w)
