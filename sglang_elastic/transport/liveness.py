"""Process-local knowledge of which peers are dead: the one thing every blocking wait consults.

A :class:`Liveness` is fed by whoever learns of a death first (the membership client's watch
connection, a transport that saw a peer vanish, the orchestrator) and read by every wait that
depends on a peer: transport chunks, dispatch and combine, votes, store waits, backup filling.
A wait calls :meth:`Liveness.check` with the ranks it is waiting for on every poll (a set lookup,
no I/O) and so ends with :class:`PeerFailure` naming the dead rank as soon as the death is known,
not when its own timeout expires. Timeouts stay only for peers that are alive but silent.

Deaths are keyed by ``(rank, incarnation)``: a rank id may come back as a fresh process (a new
incarnation, see :mod:`sglang_elastic.membership`); :meth:`Liveness.mark_alive` clears the rank
when that happens. ``incarnation=None`` means "whatever incarnation is current".

The membership epoch stays the single agreed truth about the live set; a :class:`Liveness` only
lets local waits stop early (and masking act early). It never decides membership.
"""
from __future__ import annotations

import threading
from typing import Callable, Dict, FrozenSet, Iterable, List, Optional, Tuple

from .base import PeerFailure

__all__ = ["Liveness"]

Listener = Callable[[int, str], None]


class Liveness:
    """Dead peers known to this process, with a condition to wait on for news.

    Thread-safe; :meth:`dead`, :meth:`is_dead` and :meth:`check` take no lock on the fast path
    (they read an immutable snapshot), so they are cheap enough for every poll of a wait loop.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._reasons: Dict[int, Tuple[Optional[int], str]] = {}
        self._dead: FrozenSet[int] = frozenset()
        self._version = 0
        self._listeners: List[Listener] = []

    # ------------------------------------------------------------------ feeding
    def mark_dead(self, rank: int, reason: str = "", incarnation: Optional[int] = None) -> bool:
        """Record that ``rank`` (its ``incarnation``, when known) is dead. Returns True when this is
        news (listeners are called, waiters woken), False when it was already known."""
        rank = int(rank)
        with self._cond:
            if rank in self._dead:
                return False
            self._reasons[rank] = (incarnation, reason or "dead")
            self._dead = frozenset(self._reasons)
            self._version += 1
            listeners = list(self._listeners)
            self._cond.notify_all()
        for fn in listeners:
            fn(rank, reason)
        return True

    def mark_alive(self, rank: int, incarnation: Optional[int] = None) -> None:
        """Forget a death: ``rank`` came back (a new ``incarnation``) or was never dead. A death
        recorded for a *newer* incarnation than ``incarnation`` is kept."""
        rank = int(rank)
        with self._cond:
            known = self._reasons.get(rank)
            if known is None:
                return
            dead_inc = known[0]
            if incarnation is not None and dead_inc is not None and dead_inc > incarnation:
                return
            del self._reasons[rank]
            self._dead = frozenset(self._reasons)
            self._version += 1
            self._cond.notify_all()

    def add_listener(self, fn: Listener) -> Listener:
        """Call ``fn(rank, reason)`` on every new death (from the thread that recorded it)."""
        with self._cond:
            self._listeners.append(fn)
        return fn

    def remove_listener(self, fn: Listener) -> None:
        """Stop calling ``fn``; unknown listeners are ignored."""
        with self._cond:
            if fn in self._listeners:
                self._listeners.remove(fn)

    # ------------------------------------------------------------------ reading
    @property
    def version(self) -> int:
        """Bumped on every change; lets a poller notice news without comparing sets."""
        return self._version

    def dead(self) -> FrozenSet[int]:
        """The ranks known dead now."""
        return self._dead

    def is_dead(self, rank: int) -> bool:
        """Whether ``rank`` is known dead."""
        return int(rank) in self._dead

    def reason(self, rank: int) -> Optional[str]:
        """Why ``rank`` is known dead (None when it is not)."""
        known = self._reasons.get(int(rank))
        return None if known is None else known[1]

    def first_dead(self, ranks: Iterable[int]) -> Optional[int]:
        """The first of ``ranks`` known dead, or None."""
        dead = self._dead
        if not dead:
            return None
        for r in ranks:
            if int(r) in dead:
                return int(r)
        return None

    def check(self, ranks: Iterable[int], what: str = "") -> None:
        """Raise :class:`PeerFailure` naming the first of ``ranks`` known dead (all known dead ones
        in ``ranks``); return at once when none is. ``what`` names the wait in the message."""
        dead = self._dead
        if not dead:
            return
        hit = [int(r) for r in ranks if int(r) in dead]
        if hit:
            r = hit[0]
            where = f" during {what}" if what else ""
            raise PeerFailure(r, f"peer rank {r} is dead{where} ({self.reason(r)})", ranks=hit)

    def wait(self, timeout: float, since_version: Optional[int] = None) -> bool:
        """Sleep until the known deaths change (after ``since_version`` when given) or ``timeout``
        seconds pass. Returns True when something changed. For waits that have nothing else to
        poll; waits that poll a library call :meth:`check` between polls instead."""
        with self._cond:
            start = self._version if since_version is None else since_version
            if self._version != start:
                return True
            self._cond.wait_for(lambda: self._version != start, timeout=max(0.0, timeout))
            return self._version != start

    def __repr__(self) -> str:
        return f"Liveness(dead={sorted(self._dead)})"
