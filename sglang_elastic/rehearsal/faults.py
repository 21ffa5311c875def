"""Scripted faults landing at a chosen point of a step or an update, from inside the rank.

The orchestrator arms a :class:`~.protocol.FaultSpec` on a rank through the step plan; the rank
SIGKILLs (or SIGSTOPs) *itself* when it reaches the spec's phase, after writing a
:class:`~.protocol.FaultFired` record (the start of the interruption). Landing from inside is
deterministic: the fault hits exactly the named point, whatever the scheduler does.

Phases (``docs/rehearsal.md``, "Event phases"):

``dispatch`` / ``combine``
    just before the dispatcher's dispatch / combine of MoE layer ``layer`` in the rank's next
    forward pass: its peers are inside that exchange, waiting for it.
``transfer``
    on entering the weight copies of an update chunk (``ExpertLocationUpdater.step``, or the
    :class:`~sglang_elastic.location.background.BackgroundUpdater`'s chunk job on its transport
    thread).
``vote``
    on entering the agreement on the outcome of a set of copies (any vote of the updater).
``rehome``
    on entering the backup copies that follow a commit or a change of live set (re-homing); in a
    background chunk job, on entering its copies, which carry the backups re-homed for the
    placement after its commit.
``fill``
    on entering the start-up backup fill of a new updater (every rank builds one on a join).
``between``
    after the rank answered a step, before it reads the next plan.

A spec stays armed until its phase is reached (an update phase needs an update to run).
"""
from __future__ import annotations

import functools
import os
import signal
import threading
import time
import weakref
from typing import Any, Callable, List, Optional

from .protocol import FaultFired, FaultSpec, Keys

__all__ = ["FaultInjector"]

# A background chunk job (on the updater's transport thread): its copies are a transfer and a rehome point.
_JOB = "job"


class _TransportProxy:
    """The updater's transport, with a fault point on entry to every ``execute``."""

    def __init__(self, inner: Any, on_execute: Callable[[], None]) -> None:
        self._inner, self._on_execute = inner, on_execute

    def execute(self, *args: Any, **kwargs: Any) -> Any:
        self._on_execute()
        return self._inner.execute(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


class FaultInjector:
    """Holds this rank's armed faults and lands them (see the module docstring)."""

    def __init__(self, rank: int, store: Any, incarnation: Callable[[], Optional[int]]) -> None:
        self.rank, self.store, self._incarnation = rank, store, incarnation
        self.armed: List[FaultSpec] = []
        self.step = 0
        # Where the updater is, per thread (the background updater moves chunks on its own thread while
        # the main thread serves): None (not in a wrapped call), "fill", "rehome" (set_live), or inside
        # step() / a chunk job: "transfer" until the chunk's vote returned, then "rehome" (backups
        # after commit).
        self._local = threading.local()

    @property
    def _where(self) -> Optional[str]:
        return getattr(self._local, "where", None)

    @_where.setter
    def _where(self, value: Optional[str]) -> None:
        self._local.where = value

    # ------------------------------------------------------------------ arming
    def arm(self, faults: List[FaultSpec], step: int) -> None:
        """Arm the plan's faults aimed at this rank (each once)."""
        self.step = step
        for f in faults:
            if f.rank == self.rank and f not in self.armed:
                self.armed.append(f)

    def at(self, phase: str, layer: Optional[int] = None) -> None:
        """A fault point: land the first armed fault for ``phase`` (and ``layer``), if any."""
        if not self.armed:
            return
        for f in self.armed:
            if f.phase == phase and (layer is None or f.layer == layer):
                self._land(f)
                return

    def _land(self, f: FaultSpec) -> None:
        inc = self._incarnation()
        rec = FaultFired(rank=self.rank, incarnation=-1 if inc is None else int(inc), action=f.action, phase=f.phase,
                         step=self.step, armed_step=f.step, t=time.time())
        self.store.set(Keys.fault(self.rank, rec.incarnation), rec.to_json())
        self.armed.remove(f)
        os.kill(os.getpid(), signal.SIGKILL if f.action == "kill" else signal.SIGSTOP)

    # ------------------------------------------------------------------ updater hooks
    def wrap_transport(self, transport: Any) -> Any:
        """The transport to give the updater: ``execute`` becomes a transfer/rehome/fill point."""
        return _TransportProxy(transport, self._on_execute)

    def wrap_vote(self, vote: Any, on_result: Optional[Callable[[Any], None]] = None) -> Any:
        """The vote to give the updater: entering it is a ``vote`` point; inside ``step`` the copies
        after the chunk's vote are backup re-homing. ``on_result(outcome)`` sees every outcome."""
        if vote is None:
            return None

        @functools.wraps(vote)
        def voting(*args: Any, **kwargs: Any) -> Any:
            self.at("vote")
            out = vote(*args, **kwargs)
            if self._where in ("transfer", _JOB):
                self._where = "rehome"
            if on_result is not None:
                on_result(out)
            return out

        return voting

    def watch_updater(self, updater: Any) -> Any:
        """Mark where ``updater`` is (instance attributes shadow its methods, internal calls too).

        The wrappers call the class's functions on a weak reference: an instance attribute holding
        the instance's own bound method is a reference cycle, so every updater replaced on a join
        (its backup rows, staging, store connections, failed jobs' tensors) would stay in memory
        until a full garbage collection, which a long-lived process runs rarely."""
        ref = weakref.ref(updater)
        for name, where in (("step", "transfer"), ("_transfer_job", _JOB), ("set_live", "rehome"),
                            ("fill_backup", "fill")):
            fn = getattr(type(updater), name, None)
            if callable(fn):
                setattr(updater, name, self._scoped(ref, fn, where))
        return updater

    def _scoped(self, ref: "weakref.ref[Any]", fn: Callable[..., Any], where: str) -> Callable[..., Any]:
        @functools.wraps(fn)
        def scoped(*args: Any, **kwargs: Any) -> Any:
            outer = self._where
            self._where = where
            try:
                return fn(ref(), *args, **kwargs)
            finally:
                # A set_live inside step() (a failure mid-chunk) is followed by the chunk again.
                self._where = "transfer" if outer is not None and where == "rehome" else outer

        return scoped

    def _on_execute(self) -> None:
        where = self._where
        if where == _JOB:  # one execute carries the chunk's transfers and its backup re-homing
            self.at("transfer")
            self.at("rehome")
        elif where is not None:
            self.at(where)
