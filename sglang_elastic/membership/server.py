"""The membership server: one decider for the live EP ranks and an epoch, in a process no rank is.

The launcher/orchestrator runs a :class:`MembershipServer`: it owns a ``torch.distributed.TCPStore``
(``is_master=True``), a watch socket (:mod:`sglang_elastic.membership.watch`) and a monitor thread
that is the *only* writer of membership. Ranks run a
:class:`~sglang_elastic.membership.client.MembershipClient`: they join (getting an incarnation
number), heartbeat, report peers they saw fail, leave, and read the agreed view. Because every
decision is made in one place by one rule and published as a numbered record, all ranks agree by
construction, and losing any rank (rank 0 included) loses nothing.

The rule (applied by the server at every tick, ``tick_s``, and at once when news arrives): a live
member ``(rank, incarnation)`` is declared dead when

* its watch connection ended without a ``leaving`` notice (the kernel closes the sockets of a
  process that dies, so a SIGKILL is known in about a millisecond), or
* the server has not seen its heartbeat move for more than ``heartbeat_timeout_s`` (frozen,
  partitioned, or its host vanished), or
* the orchestrator called :meth:`MembershipServer.declare_dead`, or
* a *live* member reported it dead (naming its current incarnation or none) **and** it then showed
  no sign of life (no heartbeat moved, no line on its watch connection) for more than
  ``suspicion_grace_s`` (default ``heartbeat_timeout_s / 2``), or
* a newer incarnation of the same rank id joined (the old process is replaced), or it left.

A member's report is a *suspicion*, not a verdict: the reporter may only have been slow itself
(blocked on a dead peer, a timeout under load, a process group another failure broke). A pending
suspicion is re-checked at every tick: confirmed when the suspect stays silent past the grace,
dropped (one log line saying why) as soon as a sign of life newer than the report arrives. So a
live rank that keeps heartbeating is never evicted by a peer's report, and a frozen one is evicted
by the report within ``suspicion_grace_s`` of its last sign of life (never later than its
heartbeat timeout would). Local suspicion may act first (a rank masks a peer it gave up on) but
never contradicts the agreed record: ranks re-admit a peer the record still lists.

All changes found in one tick (several deaths, joins) are published together as ONE epoch bump:
a record ``{epoch, live, incarnations, changes}`` under ``<ns>/view/<epoch>`` and ``<ns>/view``,
then ``<ns>/epoch``, and pushed to every watch connection. Reports from a stale reporter (not a
live member with the incarnation it names) and reports or leaves naming an old incarnation of the
target are ignored, so a process that was frozen, declared dead and resumed cannot evict anyone, and
nothing addressed to a previous incarnation of a rank id can touch the current one (the
scale-up-after-scale-down hang of vLLM's NIXL-EP PR came from exactly such stale identities).

Detection time: a dead process at once (its connection's end wakes the monitor); a silent one at
the first tick at which more than ``heartbeat_timeout_s`` passed since the server last saw its
heartbeat, at most ``heartbeat_timeout_s + 2 * tick_s`` after the rank's last heartbeat
(:attr:`MembershipServer.detection_bound_s`); a silent one that a member reported, at most
``suspicion_grace_s + 2 * tick_s`` after its last sign of life or at the report, whichever is later. Every client gets the new record pushed. See
``docs/elastic-state.md``.
"""
from __future__ import annotations

import json
import logging
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Set, Tuple, Union

import torch.distributed as dist

from ..transport.liveness import Liveness
from .view import (DEFAULT_NAMESPACE, HISTORY, STORE_ERRORS, MembershipChange, MembershipError, MembershipTimeout,
                   MembershipView, _as_predicate, _check_port, _check_positive, _check_rank, _Keys, _open_master)
from .watch import WatchServer

__all__ = ["MembershipServer"]

logger = logging.getLogger(__name__)


class MembershipServer:
    """Orchestrator side: serves the store and decides membership (see the module docstring).

    Args:
        host, port: where to serve the TCPStore (``port=0``: pick a free one, see :attr:`port`).
        world_size: ranks expected at launch (informational; default for ``max_ranks``).
        heartbeat_timeout_s: silence after which a member is declared dead (frozen or partitioned;
            a process that dies is known at once through its watch connection).
        max_ranks: rank ids ``0..max_ranks-1`` may join (scale-up beyond ``world_size``).
        tick_s: monitor period; default ``heartbeat_timeout_s / 10`` clamped to [0.01, 0.25] s.
        namespace: key prefix in the store (several memberships may share one store).
        store_timeout_s: timeout of the server's own store operations.
        liveness: the :class:`~sglang_elastic.transport.Liveness` this server feeds with every
            death it publishes (default: a private one, :attr:`liveness`), for the orchestrator's waits.
        suspicion_grace_s: how long a member another member reported must stay silent before the
            report is acted on (default ``heartbeat_timeout_s / 2``; at most ``heartbeat_timeout_s``).

    The watch socket listens on ``host`` too (:attr:`watch_address`); its address is published in
    the store's config record, so clients need only the store's address.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        world_size: int,
        heartbeat_timeout_s: float = 1.0,
        max_ranks: Optional[int] = None,
        tick_s: Optional[float] = None,
        namespace: str = DEFAULT_NAMESPACE,
        store_timeout_s: float = 30.0,
        liveness: Optional[Liveness] = None,
        suspicion_grace_s: Optional[float] = None,
    ) -> None:
        self.world_size = _check_rank(world_size, "world_size")
        if self.world_size < 1:
            raise ValueError("world_size must be >= 1")
        self.max_ranks = self.world_size if max_ranks is None else _check_rank(max_ranks, "max_ranks")
        if self.max_ranks < self.world_size:
            raise ValueError(f"max_ranks ({self.max_ranks}) must be >= world_size ({self.world_size})")
        self.heartbeat_timeout_s = _check_positive(heartbeat_timeout_s, "heartbeat_timeout_s")
        self.tick_s = (min(0.25, max(0.01, self.heartbeat_timeout_s / 10)) if tick_s is None
                       else _check_positive(tick_s, "tick_s"))
        self.suspicion_grace_s = (self.heartbeat_timeout_s / 2 if suspicion_grace_s is None
                                  else min(_check_positive(suspicion_grace_s, "suspicion_grace_s"),
                                           self.heartbeat_timeout_s))
        if not hasattr(dist.TCPStore, "queue_push"):
            raise MembershipError("sglang_elastic.membership needs torch >= 2.6 (TCPStore queues)")
        self.host = host
        self._keys = _Keys(namespace)
        self._store: Optional[dist.TCPStore] = _open_master(host, _check_port(port), store_timeout_s)
        self.port: int = self._store.port
        self._store_lock = threading.Lock()
        self._cond = threading.Condition()
        self._live: Dict[int, int] = {}            # rank -> incarnation of its live member
        self._known: Dict[int, int] = {}           # rank -> last incarnation that was a member
        self._hb: Dict[int, Tuple[bytes, float]] = {}  # rank -> (counter seen, when seen)
        # rank -> (incarnation, when reported, why): reports by members, not yet confirmed
        self._suspects: Dict[int, Tuple[int, Optional[float], str]] = {}
        self._view = MembershipView(0, (), {}, ())
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._closed = False
        self.liveness = liveness if liveness is not None else Liveness()
        self._events: List[Dict[str, Any]] = []         # death requests from the watch thread
        self._gone: Set[Tuple[int, int]] = set()        # (rank, inc) whose connection ended
        self._sock_seen: Dict[int, Tuple[int, float]] = {}  # rank -> (inc, last hb line seen)
        self._watch = WatchServer(host, self._on_gone, self._on_seen, self._hello)
        self.watch_address: Tuple[str, int] = self._watch.address
        cfg = {"world_size": self.world_size, "max_ranks": self.max_ranks,
               "heartbeat_timeout_s": self.heartbeat_timeout_s, "tick_s": self.tick_s, "version": 2,
               "watch": list(self.watch_address)}
        self._store.set(self._keys.config, json.dumps(cfg))
        self._publish_locked(self._view)
        self._thread = threading.Thread(target=self._run, name=f"membership-server:{self.port}", daemon=True)
        self._thread.start()
        logger.info("membership server on %s:%d (world_size=%d, max_ranks=%d, timeout=%.3gs, tick=%.3gs)",
                    host, self.port, self.world_size, self.max_ranks, self.heartbeat_timeout_s, self.tick_s)

    # ------------------------------------------------------------------ public
    @property
    def address(self) -> Tuple[str, int]:
        return self.host, self.port

    @property
    def detection_bound_s(self) -> float:
        """Worst case from a member's last heartbeat to the record declaring it dead."""
        return self.heartbeat_timeout_s + 2 * self.tick_s

    def current(self) -> MembershipView:
        with self._cond:
            return self._view

    def wait_for_epoch(self, epoch_or_predicate: Union[int, Callable[[MembershipView], bool]],
                       timeout: float) -> MembershipView:
        """Block until the published view has ``epoch >= n`` / satisfies the predicate."""
        pred = _as_predicate(epoch_or_predicate)
        deadline = time.monotonic() + timeout
        with self._cond:
            while not pred(self._view):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise MembershipTimeout(f"membership view did not reach the condition in {timeout:g} s; "
                                            f"last view: {self._view}")
                self._cond.wait(remaining)
            return self._view

    def declare_dead(self, rank: int, reason: str = "declared dead by the orchestrator") -> None:
        """Orchestrator's own verdict; applied at once (the monitor is woken) like any report."""
        rank = _check_rank(rank)
        self._push({"op": "dead", "rank": rank, "inc": None, "reporter": None, "reporter_inc": None,
                    "reason": str(reason)})
        self._wake.set()

    def close(self) -> None:
        """Stop the monitor and the store; connected clients then get MembershipError."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        self._wake.set()
        self._thread.join()
        self._watch.close()
        with self._store_lock:
            self._store = None  # the last reference: the listening socket and its thread go away

    def __enter__(self) -> "MembershipServer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ------------------------------------------------------------------ monitor
    def _push(self, req: Dict[str, Any]) -> None:
        with self._store_lock:
            if self._store is None:
                raise MembershipError("membership server is closed")
            self._store.queue_push(self._keys.requests, json.dumps(req))

    def _drain(self) -> List[Dict[str, Any]]:
        out: List[Dict[str, Any]] = []
        with self._store_lock:
            for _ in range(10000):
                try:
                    raw = self._store.queue_pop(self._keys.requests, block=False)
                except dist.QueueEmptyError:
                    break
                try:
                    out.append(json.loads(raw))
                except ValueError:
                    logger.warning("membership: ignoring malformed request %r", raw[:200])
        return out

    # ------------------------------------------------------------------ watch callbacks
    def _on_gone(self, rank: int, inc: int, reason: str) -> None:
        """A bound watch connection ended: a death request for that incarnation, decided at once."""
        with self._cond:
            self._gone.add((rank, inc))
            self._events.append({"op": "dead", "rank": rank, "inc": inc, "reporter": None,
                                 "reporter_inc": None, "reason": reason, "source": "watch"})
        self._wake.set()

    def _on_seen(self, rank: int, inc: int) -> None:
        self._sock_seen[rank] = (inc, time.monotonic())

    def _hello(self) -> bytes:
        with self._cond:
            view = self._view
        return _view_line(view)

    def _run(self) -> None:
        while True:
            self._wake.wait(self.tick_s)
            if self._stop.is_set():
                return
            self._wake.clear()
            try:
                self._tick()
            except (MembershipError, *STORE_ERRORS):  # a store hiccup: the next tick tries again
                logger.exception("membership monitor tick failed")

    def _tick(self) -> None:
        changes: List[MembershipChange] = []
        now = time.monotonic()
        with self._cond:
            events, self._events = self._events, []
        for req in self._drain() + events:  # store requests first: a join then its death
            try:
                self._handle(req, now, changes)
            except (KeyError, TypeError, ValueError):  # a malformed request must not stop the decider
                logger.exception("membership: bad request %r", req)
        ranks = sorted(self._live)
        if ranks:
            with self._store_lock:
                values = self._store.multi_get([self._keys.heartbeat(r, self._live[r]) for r in ranks])
            now = time.monotonic()
            for r, v in zip(ranks, values):
                seen, when = self._hb[r]
                sock_inc, sock_when = self._sock_seen.get(r, (None, 0.0))
                if sock_inc == self._live[r] and sock_when > when:
                    when = sock_when  # a heartbeat line on the watch connection counts as well
                    self._hb[r] = (seen, when)
                if v != seen:
                    self._hb[r] = (v, now)
                elif now - when > self.heartbeat_timeout_s:
                    changes.append(self._remove(r, "failed", f"no heartbeat for {now - when:.2f} s "
                                                             f"(timeout {self.heartbeat_timeout_s:g} s)"))
            self._judge_suspects(now, changes)
        if changes:
            view = MembershipView(
                epoch=self._view.epoch + 1,
                live=tuple(sorted(self._live)),
                incarnations=dict(sorted(self._known.items())),
                changes=tuple(changes),
            )
            with self._store_lock:
                self._publish_locked(view)
            view.feed(self.liveness)
            self._watch.broadcast(_view_line(view))
            logger.info("membership epoch %d: live=%s changes=%s", view.epoch, list(view.live),
                        [(c.kind, c.rank, c.incarnation, c.reason) for c in changes])


    def _publish_locked(self, view: MembershipView) -> None:
        raw = view.to_json()
        self._store.set(self._keys.view_at(view.epoch), raw)
        self._store.set(self._keys.view, raw)
        self._store.set(self._keys.epoch, str(view.epoch))
        if view.epoch >= HISTORY:
            self._store.delete_key(self._keys.view_at(view.epoch - HISTORY))
        with self._cond:
            self._view = view
            self._cond.notify_all()

    def _judge_suspects(self, now: float, changes: List[MembershipChange]) -> None:
        """Confirm or drop each pending report (after this tick's heartbeats were read)."""
        for r, (inc, t_report, why) in list(self._suspects.items()):
            if self._live.get(r) != inc:  # gone meanwhile (another verdict) or replaced
                del self._suspects[r]
                continue
            last = self._hb[r][1]  # the last sign of life: a heartbeat moved or a watch line came
            if t_report is None:
                # Reported this tick: a heartbeat this tick saw move may predate the report, so only
                # signs seen after now clear the suspect.
                t_report = now
                self._suspects[r] = (inc, t_report, why)
            if now - last > self.suspicion_grace_s:
                del self._suspects[r]
                changes.append(self._remove(r, "failed", f"{why}; confirmed: no sign of life for "
                                                         f"{now - last:.2f} s (grace {self.suspicion_grace_s:g} s)"))
            elif last > t_report:
                del self._suspects[r]
                logger.info("membership: not acting on the report on rank %d (%s): it is alive (a sign of life "
                            "%.2f s after the report)", r, why, last - t_report)

    def _remove(self, rank: int, kind: str, reason: str) -> MembershipChange:
        self._suspects.pop(rank, None)
        inc = self._live.pop(rank)
        self._hb.pop(rank, None)
        with self._store_lock:
            self._store.delete_key(self._keys.heartbeat(rank, inc))
        return MembershipChange(kind, rank, inc, reason)

    def _handle(self, req: Dict[str, Any], now: float, changes: List[MembershipChange]) -> None:
        op = req.get("op")
        rank = int(req["rank"])
        if not 0 <= rank < self.max_ranks:
            logger.warning("membership: ignoring %s for rank %d outside [0, %d)", op, rank, self.max_ranks)
            return
        cur = self._live.get(rank)
        if op == "join":
            inc = int(req["inc"])
            with self._store_lock:
                ok = self._store.check([self._keys.incarnation(rank), self._keys.heartbeat(rank, inc)])
                latest = int(self._store.get(self._keys.incarnation(rank))) if ok else None
            if (rank, inc) in self._gone:
                logger.info("membership: ignoring join of rank %d incarnation %d: its process already ended",
                            rank, inc)
                return
            if latest is None or inc < latest or (cur is not None and cur >= inc):
                logger.info("membership: ignoring stale join of rank %d incarnation %d (latest %s, live %s)",
                            rank, inc, latest, cur)
                return
            if cur is not None:
                changes.append(self._remove(rank, "failed", f"replaced by incarnation {inc}"))
            with self._store_lock:
                (seen,) = self._store.multi_get([self._keys.heartbeat(rank, inc)])
            self._live[rank] = inc
            self._known[rank] = inc
            self._hb[rank] = (seen, now)
            changes.append(MembershipChange("joined", rank, inc, str(req.get("reason", ""))))
        elif op == "leave":
            if cur is not None and cur == int(req["inc"]):
                changes.append(self._remove(rank, "left", "left (planned scale-down)"))
            else:
                logger.info("membership: ignoring stale leave of rank %d incarnation %s", rank, req.get("inc"))
        elif op == "dead":
            inc = req.get("inc")
            reporter, rinc = req.get("reporter"), req.get("reporter_inc")
            if cur is None or (inc is not None and int(inc) != cur):
                return  # already dead, or the report is about an older incarnation
            if reporter is not None and (rinc is None or self._live.get(int(reporter)) != int(rinc)):
                logger.info("membership: ignoring report on rank %d from non-member %s#%s", rank, reporter, rinc)
                return
            if req.get("source") == "watch":
                changes.append(self._remove(rank, "failed", str(req.get("reason", ""))))
            elif reporter is None:  # the orchestrator's verdict (it saw the process exit, or fences it)
                changes.append(self._remove(rank, "failed", f"reported by orchestrator: {req.get('reason', '')}"))
            elif rank not in self._suspects:  # a member's suspicion: judged at every tick (_judge_suspects)
                self._suspects[rank] = (cur, None, f"reported by rank {reporter}: {req.get('reason', '')}")
        else:
            logger.warning("membership: unknown request %r", req)


def _view_line(view: MembershipView) -> bytes:
    return (json.dumps({"op": "view", "view": view.to_dict()}) + "\n").encode()
