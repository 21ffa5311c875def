"""Failure detection for every wait on a peer, written once: what the process knows plus own probes.

A :class:`PeerWatch` belongs to one endpoint (a transport, a host token exchange, a process group).
It joins two sources of knowledge:

* the process's :class:`~sglang_elastic.transport.liveness.Liveness` (fed by the membership watch,
  by the other endpoints of the process, by the orchestrator), read on every poll of every wait;
* the endpoint's own evidence that a peer is gone (a refused connection, a failed write, a failed
  probe), which it records in that Liveness with :meth:`PeerWatch.dead` so that every other wait of
  the process learns it too.

Deaths recorded here are keyed by the endpoint's own incarnation of the peer; when a newer
incarnation of a peer connects (a restarted process), :meth:`PeerWatch.connected` withdraws the
death this watch recorded (a death recorded by somebody else, e.g. membership, is theirs to clear).
Timeouts are not deaths: a peer that is alive but silent is given up by the caller's deadline and
never recorded here.

    w = watch.wait("dispatch")               # one per blocking wait
    while not done():
        for rank, why in w.failed(waiting):  # known dead, or a probe failed (probes every probe_every_s)
            ...
        w.sleep(progressed)                  # tight polls first, then back off; wakes on news
"""
from __future__ import annotations

import time
from typing import Callable, Dict, Iterable, List, Optional, Tuple

from .base import PeerFailure
from .liveness import Liveness

__all__ = ["PeerWatch", "WatchedWait", "PeerUnreachable", "PROBE_EVERY_S"]

PROBE_EVERY_S = 0.2

Probe = Callable[[int, float], Optional[bool]]  # (rank, since) -> False: certainly gone; True/None: no news


class PeerUnreachable(Exception):
    """A message could not be delivered to ``rank`` (its endpoint is gone or unknown)."""

    def __init__(self, rank: int, why: str = "") -> None:
        super().__init__(f"rank {rank} unreachable{': ' + why if why else ''}")
        self.rank = rank


class PeerWatch:
    """Failure knowledge of one endpoint (see the module docstring).

    Args:
        liveness: the process's record of dead peers; a private one when None (then this endpoint
            knows only what it sees itself).
        probe: ``probe(rank, since) -> Optional[bool]``, non-blocking; False when the peer is
            certainly gone (its answer must postdate ``since``, the start of the wait).
        probe_every_s: how often a wait probes the peers it still waits for.
        owner: names the endpoint in recorded reasons (e.g. ``"nixl transport"``).
    """

    def __init__(self, liveness: Optional[Liveness] = None, probe: Optional[Probe] = None, *,
                 probe_every_s: float = PROBE_EVERY_S, owner: str = "") -> None:
        self.liveness = liveness if liveness is not None else Liveness()
        self.probe = probe
        self.probe_every_s = float(probe_every_s)
        self.owner = owner
        self._mine: Dict[int, Optional[int]] = {}  # rank -> our incarnation of it that we recorded dead
        # The endpoint's incarnation of a connected peer (deaths found by probes are keyed by it).
        self.incarnation_of: Callable[[int], Optional[int]] = lambda rank: None

    def wait(self, what: str) -> "WatchedWait":
        """State of one blocking wait (its probe schedule and back-off)."""
        return WatchedWait(self, what)

    def check(self, ranks: Iterable[int], what: str = "") -> None:
        """Raise :class:`PeerFailure` when one of ``ranks`` is known dead (no probing, no I/O)."""
        self.liveness.check(ranks, what=what)

    def dead(self, rank: int, why: str, incarnation: Optional[int] = None) -> PeerFailure:
        """Record that this endpoint saw ``rank`` (our ``incarnation`` of it) die; returns the
        :class:`PeerFailure` to raise or report."""
        rank = int(rank)
        reason = f"{self.owner}: {why}" if self.owner else why
        if self.liveness.mark_dead(rank, reason):
            self._mine[rank] = incarnation
        return PeerFailure(rank, reason)

    def connected(self, rank: int, incarnation: Optional[int]) -> None:
        """A peer's ``incarnation`` connected: withdraw a death this watch recorded for an older one."""
        rank = int(rank)
        if rank not in self._mine:
            return
        old = self._mine[rank]
        if incarnation is None or old is None or incarnation > old:
            del self._mine[rank]
            self.liveness.mark_alive(rank)


class WatchedWait:
    """One blocking wait of a :class:`PeerWatch`: failed peers and a sleep that wakes on news."""

    def __init__(self, watch: PeerWatch, what: str) -> None:
        self.watch, self.what = watch, what
        self.start = time.monotonic()
        self._next_probe = self.start + watch.probe_every_s
        self._delay, self._last_progress = 2e-5, self.start

    def failed(self, ranks: Iterable[int], probe: Optional[Iterable[int]] = None) -> List[Tuple[int, str]]:
        """``(rank, why)`` for each of ``ranks`` known dead now, then (when a probe is due) each of
        ``probe`` (default ``ranks``) whose probe says it is gone (recorded as dead). O(1) when
        nobody is dead and no probe is due."""
        ranks = list(ranks)
        lv = self.watch.liveness
        out = []
        if lv.dead():
            out = [(r, f"rank {r} is dead ({lv.reason(r)})") for r in ranks if lv.is_dead(r)]
        now = time.monotonic()
        if self.watch.probe is not None and now >= self._next_probe:
            self._next_probe = now + self.watch.probe_every_s
            known = {r for r, _ in out}
            for r in (ranks if probe is None else probe):
                if r not in known and self.watch.probe(r, self.start) is False:
                    why = f"rank {r} is unreachable (probe failed)"
                    self.watch.dead(r, why, self.watch.incarnation_of(r))
                    out.append((r, why))
        return out

    def check(self, ranks: Iterable[int]) -> None:
        """Raise :class:`PeerFailure` naming the first failed one of ``ranks`` (see :meth:`failed`)."""
        bad = self.failed(ranks)
        if bad:
            r, why = bad[0]
            raise PeerFailure(r, f"{why} during {self.what}" if self.what else why, ranks=[b for b, _ in bad])

    def sleep(self, progressed: bool = False, *, fast: float = 1e-4, slow: float = 2e-3,
              fast_for: float = 0.05) -> None:
        """Sleep before the next poll: tightly (up to ``fast``) for ``fast_for`` seconds after the last
        progress (transfers land within ms: a 2 ms back-off halved GPU chunk throughput), then up to
        ``slow``. Long sleeps wake at once when a death becomes known."""
        now = time.monotonic()
        if progressed:
            self._delay, self._last_progress = 2e-5, now
            return
        d = self._delay
        if d >= 1e-3:
            self.watch.liveness.wait(d)
        else:
            time.sleep(d)
        self._delay = min(2 * d, fast if now - self._last_progress < fast_for else slow)
