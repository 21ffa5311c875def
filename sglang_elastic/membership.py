"""Agreement on the live EP ranks and an epoch, through a store that no rank hosts.

The launcher/orchestrator runs a :class:`MembershipServer`: it owns a ``torch.distributed.TCPStore``
(``is_master=True``) and a monitor thread that is the *only* writer of membership. Ranks run a
:class:`MembershipClient`: they join (getting an incarnation number), heartbeat, report peers
they saw fail, leave, and read the agreed view. Because every decision is made in one place by one
rule and published as a numbered record, all ranks agree by construction, and losing any rank
(rank 0 included) loses nothing.

The rule (applied by the server once per tick, ``tick_s``): a live member ``(rank, incarnation)``
is declared dead when

* the server has not seen its heartbeat counter move for more than ``heartbeat_timeout_s``, or
* a *live* member reported it dead (naming its current incarnation or none), or the
  orchestrator called :meth:`MembershipServer.declare_dead`, or
* a newer incarnation of the same rank id joined (the old process is replaced), or it left.

All changes found in one tick (several deaths, joins) are published together as ONE epoch bump:
a record ``{epoch, live, incarnations, changes}`` under ``<ns>/view/<epoch>`` and ``<ns>/view``,
then ``<ns>/epoch``. Reports from a stale reporter (not a live member with the incarnation it
names) and reports or leaves naming an old incarnation of the target are ignored, so a process that
was frozen, declared dead and resumed cannot evict anyone, and nothing addressed to a previous
incarnation of a rank id can touch the current one (the scale-up-after-scale-down hang of vLLM's
NIXL-EP PR came from exactly such stale identities).

Detection time: a silent rank is declared dead at the first tick at which more than
``heartbeat_timeout_s`` passed since the server last saw its counter move, i.e. at most
``heartbeat_timeout_s + tick_s`` after that observation and at most ``heartbeat_timeout_s +
2 * tick_s`` after the rank's last heartbeat (:attr:`MembershipServer.detection_bound_s`); every
client sees the new record within its ``poll_interval_s`` after that. Reports are applied at the
next tick. See ``docs/elastic-state.md``.
"""
from __future__ import annotations

import datetime
import json
import logging
import math
import operator
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple, Union

import torch.distributed as dist

__all__ = [
    "DEFAULT_NAMESPACE",
    "MembershipChange",
    "MembershipClient",
    "MembershipError",
    "MembershipServer",
    "MembershipTimeout",
    "MembershipView",
]

logger = logging.getLogger(__name__)

DEFAULT_NAMESPACE = "sglang_elastic/membership"
_HISTORY = 128  # versioned records kept in the store


class MembershipError(RuntimeError):
    """The membership store is unreachable, closed or broke; or a membership request failed."""


class MembershipTimeout(MembershipError, TimeoutError):
    """A wait on the membership view ran out of time."""


@dataclass(frozen=True)
class MembershipChange:
    """One entry of a record's change list: ``kind`` is ``joined``, ``failed`` or ``left``."""

    kind: str
    rank: int
    incarnation: int
    reason: str = ""


@dataclass(frozen=True)
class MembershipView:
    """An agreed membership record.

    Attributes:
        epoch: bumped once per published change (0: nobody joined yet).
        live: sorted live rank ids.
        incarnations: for every rank id that ever joined, the incarnation of its live member, or
            of its last member when the rank is dead.
        changes: what this epoch changed (empty for epoch 0).
    """

    epoch: int
    live: Tuple[int, ...]
    incarnations: Mapping[int, int] = field(default_factory=dict)
    changes: Tuple[MembershipChange, ...] = ()

    def is_live(self, rank: int, incarnation: Optional[int] = None) -> bool:
        """``rank`` is live (and, with ``incarnation``, that exact incarnation is the live one)."""
        if rank not in self.live:
            return False
        return incarnation is None or self.incarnations.get(rank) == incarnation

    def to_json(self) -> str:
        return json.dumps({
            "epoch": self.epoch,
            "live": list(self.live),
            "incarnations": {str(r): i for r, i in sorted(self.incarnations.items())},
            "changes": [[c.kind, c.rank, c.incarnation, c.reason] for c in self.changes],
        })

    @classmethod
    def from_json(cls, raw: Union[str, bytes]) -> "MembershipView":
        d = json.loads(raw)
        return cls(
            epoch=int(d["epoch"]),
            live=tuple(int(r) for r in d["live"]),
            incarnations={int(r): int(i) for r, i in d["incarnations"].items()},
            changes=tuple(MembershipChange(str(k), int(r), int(i), str(why)) for k, r, i, why in d["changes"]),
        )


class _Keys:
    def __init__(self, namespace: str) -> None:
        ns = namespace.rstrip("/")
        self.config = f"{ns}/config"
        self.epoch = f"{ns}/epoch"
        self.view = f"{ns}/view"
        self.requests = f"{ns}/requests"
        self._ns = ns

    def view_at(self, epoch: int) -> str:
        return f"{self._ns}/view/{epoch}"

    def incarnation(self, rank: int) -> str:
        return f"{self._ns}/inc/{rank}"

    def heartbeat(self, rank: int, incarnation: int) -> str:
        return f"{self._ns}/hb/{rank}/{incarnation}"


def _check_rank(rank: Any, what: str = "rank") -> int:
    if isinstance(rank, bool):
        raise ValueError(f"{what} must be a non-negative integer, got {rank!r}")
    try:
        r = operator.index(rank)
    except TypeError:
        raise ValueError(f"{what} must be a non-negative integer, got {rank!r}") from None
    if r < 0:
        raise ValueError(f"{what} must be a non-negative integer, got {r}")
    return r


def _check_port(port: Any) -> int:
    p = _check_rank(port, "port")
    if p > 65535:
        raise ValueError(f"port must be in [0, 65535], got {p}")
    return p


def _check_positive(x: Any, what: str) -> float:
    try:
        v = float(x)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be a positive number of seconds, got {x!r}") from None
    if not (v > 0 and math.isfinite(v)):
        raise ValueError(f"{what} must be a positive number of seconds, got {x!r}")
    return v


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _open_master(host: str, port: int, timeout_s: float) -> dist.TCPStore:
    td = datetime.timedelta(seconds=timeout_s)

    def make(p: int) -> dist.TCPStore:
        return dist.TCPStore(host, p, world_size=None, is_master=True, timeout=td, wait_for_workers=False)

    if port:
        try:
            return make(port)
        except Exception as e:
            raise MembershipError(f"cannot serve the membership store on {host}:{port}: {e}") from e
    try:  # port 0 works for the master on recent torch; otherwise bind a free port ourselves
        store = make(0)
        if store.port > 0:
            return store
        del store
    except Exception:
        pass
    last: Optional[Exception] = None
    for _ in range(5):
        try:
            return make(_free_port(host))
        except Exception as e:  # lost a race for the port
            last = e
    raise MembershipError(f"cannot serve the membership store on {host} (no free port): {last}")


def _connect(host: str, port: int, connect_timeout_s: float, store_timeout_s: float) -> dist.TCPStore:
    """A client store, or MembershipError within about ``connect_timeout_s``."""
    deadline = time.monotonic() + connect_timeout_s
    while True:  # probe first: TCPStore's own connect retries for up to ~2.5x its timeout
        remaining = deadline - time.monotonic()
        try:
            with socket.create_connection((host, port), timeout=max(0.05, min(1.0, remaining))):
                break
        except OSError as e:
            if time.monotonic() >= deadline:
                raise MembershipError(
                    f"membership store at {host}:{port} is unreachable after {connect_timeout_s:g} s "
                    f"({e}); is the MembershipServer running?") from e
            time.sleep(0.05)
    try:
        return dist.TCPStore(host, port, world_size=None, is_master=False,
                             timeout=datetime.timedelta(seconds=store_timeout_s), wait_for_workers=False)
    except Exception as e:
        raise MembershipError(f"cannot connect to the membership store at {host}:{port}: {e}") from e


class MembershipServer:
    """Orchestrator side: serves the store and decides membership (see the module docstring).

    Args:
        host, port: where to serve the TCPStore (``port=0``: pick a free one, see :attr:`port`).
        world_size: ranks expected at launch (informational; default for ``max_ranks``).
        heartbeat_timeout_s: silence after which a member is declared dead.
        max_ranks: rank ids ``0..max_ranks-1`` may join (scale-up beyond ``world_size``).
        tick_s: monitor period; default ``heartbeat_timeout_s / 10`` clamped to [0.01, 0.25] s.
        namespace: key prefix in the store (several memberships may share one store).
        store_timeout_s: timeout of the server's own store operations.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        world_size: int,
        heartbeat_timeout_s: float = 5.0,
        max_ranks: Optional[int] = None,
        tick_s: Optional[float] = None,
        namespace: str = DEFAULT_NAMESPACE,
        store_timeout_s: float = 30.0,
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
        self._view = MembershipView(0, (), {}, ())
        self._stop = threading.Event()
        self._closed = False
        cfg = {"world_size": self.world_size, "max_ranks": self.max_ranks,
               "heartbeat_timeout_s": self.heartbeat_timeout_s, "tick_s": self.tick_s, "version": 1}
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
        """Orchestrator's own verdict; applied at the next tick like any report."""
        rank = _check_rank(rank)
        self._push({"op": "dead", "rank": rank, "inc": None, "reporter": None, "reporter_inc": None,
                    "reason": str(reason)})

    def close(self) -> None:
        """Stop the monitor and the store; connected clients then get MembershipError."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        self._thread.join()
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

    def _run(self) -> None:
        while not self._stop.wait(self.tick_s):
            try:
                self._tick()
            except Exception:
                logger.exception("membership monitor tick failed")

    def _tick(self) -> None:
        changes: List[MembershipChange] = []
        now = time.monotonic()
        for req in self._drain():
            try:
                self._handle(req, now, changes)
            except Exception:
                logger.exception("membership: bad request %r", req)
        ranks = sorted(self._live)
        if ranks:
            with self._store_lock:
                values = self._store.multi_get([self._keys.heartbeat(r, self._live[r]) for r in ranks])
            now = time.monotonic()
            for r, v in zip(ranks, values):
                seen, when = self._hb[r]
                if v != seen:
                    self._hb[r] = (v, now)
                elif now - when > self.heartbeat_timeout_s:
                    changes.append(self._remove(r, "failed", f"no heartbeat for {now - when:.2f} s "
                                                             f"(timeout {self.heartbeat_timeout_s:g} s)"))
        if changes:
            view = MembershipView(
                epoch=self._view.epoch + 1,
                live=tuple(sorted(self._live)),
                incarnations=dict(sorted(self._known.items())),
                changes=tuple(changes),
            )
            with self._store_lock:
                self._publish_locked(view)
            logger.info("membership epoch %d: live=%s changes=%s", view.epoch, list(view.live),
                        [(c.kind, c.rank, c.incarnation, c.reason) for c in changes])

    def _publish_locked(self, view: MembershipView) -> None:
        raw = view.to_json()
        self._store.set(self._keys.view_at(view.epoch), raw)
        self._store.set(self._keys.view, raw)
        self._store.set(self._keys.epoch, str(view.epoch))
        if view.epoch >= _HISTORY:
            self._store.delete_key(self._keys.view_at(view.epoch - _HISTORY))
        with self._cond:
            self._view = view
            self._cond.notify_all()

    def _remove(self, rank: int, kind: str, reason: str) -> MembershipChange:
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
            who = "orchestrator" if reporter is None else f"rank {reporter}"
            changes.append(self._remove(rank, "failed", f"reported by {who}: {req.get('reason', '')}"))
        else:
            logger.warning("membership: unknown request %r", req)


def _as_predicate(x: Union[int, Callable[[MembershipView], bool]]) -> Callable[[MembershipView], bool]:
    if callable(x):
        return x
    if isinstance(x, bool):
        raise ValueError(f"expected an epoch number or a predicate, got {x!r}")
    n = operator.index(x)
    return lambda v: v.epoch >= n


class MembershipClient:
    """Rank side: join, heartbeat, report, leave, read the agreed view.

    Args:
        host, port: the :class:`MembershipServer`'s store.
        rank: this rank's id, ``0 <= rank < max_ranks`` of the server (``ValueError`` otherwise).
        heartbeat_interval_s: at most half the server's ``heartbeat_timeout_s``.
        connect_timeout_s: how long to try reaching the store before ``MembershipError``.
        store_timeout_s: per-operation timeout; a dead or frozen server gives ``MembershipError``.
        poll_interval_s: how often the background thread reads the view (default
            ``min(heartbeat_interval_s, 0.05)``).

    ``status`` is ``"new"``, ``"joining"``, ``"joined"``, ``"leaving"``, ``"left"``, ``"dead"``
    (this incarnation was declared dead: call :meth:`join` again to come back under a new
    incarnation) or ``"closed"``. :meth:`close` without :meth:`leave` is a crash to the server.
    """

    def __init__(
        self,
        host: str,
        port: int,
        rank: int,
        heartbeat_interval_s: float = 0.5,
        *,
        connect_timeout_s: float = 10.0,
        store_timeout_s: float = 10.0,
        poll_interval_s: Optional[float] = None,
        namespace: str = DEFAULT_NAMESPACE,
    ) -> None:
        self.rank = _check_rank(rank)
        port = _check_port(port)
        if port == 0:
            raise ValueError("port must be the server's port, got 0")
        self.heartbeat_interval_s = _check_positive(heartbeat_interval_s, "heartbeat_interval_s")
        self.poll_interval_s = (min(self.heartbeat_interval_s, 0.05) if poll_interval_s is None
                                else _check_positive(poll_interval_s, "poll_interval_s"))
        connect_timeout_s = _check_positive(connect_timeout_s, "connect_timeout_s")
        self.store_timeout_s = _check_positive(store_timeout_s, "store_timeout_s")
        self.host, self.port = host, port
        self._keys = _Keys(namespace)
        self._store_lock = threading.Lock()
        self._api_lock = threading.Lock()
        self._bind_lock = threading.Lock()
        self._cond = threading.Condition()
        self._error: Optional[MembershipError] = None
        self._store: Optional[dist.TCPStore] = _connect(host, port, connect_timeout_s, self.store_timeout_s)
        self._thread: Optional[threading.Thread] = None
        self._stop = threading.Event()
        self._status = "new"
        self._incarnation: Optional[int] = None
        self._next_hb = 0.0
        self._bound: Any = None
        self._applied: Optional[MembershipView] = None
        self._view = MembershipView(-1, (), {}, ())
        try:
            self.config: Dict[str, Any] = json.loads(self._op("get", self._keys.config))
            self.max_ranks = int(self.config["max_ranks"])
            timeout = float(self.config["heartbeat_timeout_s"])
            if self.rank >= self.max_ranks:
                raise ValueError(f"rank {self.rank} is out of range: the membership server admits ranks "
                                 f"0..{self.max_ranks - 1} (max_ranks={self.max_ranks})")
            if 2 * self.heartbeat_interval_s > timeout:
                raise ValueError(f"heartbeat_interval_s ({self.heartbeat_interval_s:g}) must be at most half "
                                 f"the server's heartbeat_timeout_s ({timeout:g})")
        except BaseException:
            self._store = None
            raise

    # ------------------------------------------------------------------ properties
    @property
    def status(self) -> str:
        return self._status

    @property
    def incarnation(self) -> Optional[int]:
        """This rank's current (or last) incarnation; None before the first join."""
        return self._incarnation

    def is_declared_dead(self) -> bool:
        """True when the agreed view no longer holds this incarnation though it never left."""
        return self._status == "dead"

    # ------------------------------------------------------------------ membership operations
    def join(self, timeout: float = 30.0) -> MembershipView:
        """Register under a new incarnation; returns the first view that holds it.

        Works for a first join, after :meth:`leave`, and after being declared dead. Raises
        ``RuntimeError`` if this client is already a live member.
        """
        with self._api_lock:
            if self._status in ("joining", "joined", "leaving"):
                raise RuntimeError(f"rank {self.rank} is already {self._status} (incarnation {self._incarnation})")
            if self._status == "closed":
                raise MembershipError("membership client is closed")
            inc = int(self._op("add", self._keys.incarnation(self.rank), 1))
            self._op("add", self._keys.heartbeat(self.rank, inc), 1)
            with self._cond:
                self._incarnation = inc
                self._status = "joining"
            self._next_hb = 0.0
            self._op("queue_push", self._keys.requests,
                     json.dumps({"op": "join", "rank": self.rank, "inc": inc}))
            self._ensure_thread()
        view = self.wait_for_epoch(
            lambda v: v.is_live(self.rank, inc) or v.incarnations.get(self.rank, 0) > inc, timeout)
        if not view.is_live(self.rank, inc):
            with self._cond:
                if self._incarnation == inc and self._status == "joining":
                    self._status = "dead"
            raise MembershipError(f"rank {self.rank} incarnation {inc} was superseded by incarnation "
                                  f"{view.incarnations.get(self.rank)} (another process joined as this rank)")
        return view

    def leave(self, timeout: float = 30.0) -> MembershipView:
        """Planned scale-down: leave the live set; returns the first view without this rank."""
        with self._api_lock:
            if self._status != "joined":
                raise RuntimeError(f"rank {self.rank} cannot leave: status is {self._status!r}")
            inc = self._incarnation
            with self._cond:
                self._status = "leaving"
            self._op("queue_push", self._keys.requests,
                     json.dumps({"op": "leave", "rank": self.rank, "inc": inc}))
        view = self.wait_for_epoch(lambda v: not v.is_live(self.rank, inc), timeout)
        with self._cond:
            if self._status == "leaving":
                self._status = "left"
        return view

    def report_dead(self, rank: int, reason: str = "", incarnation: Optional[int] = None) -> None:
        """Tell the server ``rank`` failed (e.g. a transport raised PeerFailure for it).

        The report names the target's incarnation (``incarnation``, else the one in this client's
        latest view) so that it can never evict a newer process under the same rank id. The
        server applies it at its next tick if this client is a live member; a stale reporter's
        report is ignored.
        """
        rank = _check_rank(rank)
        if rank >= self.max_ranks:
            raise ValueError(f"rank {rank} is out of range: the membership server admits ranks "
                             f"0..{self.max_ranks - 1}")
        if incarnation is None:
            view = self._view
            incarnation = view.incarnations.get(rank) if view.is_live(rank) else None
        self._op("queue_push", self._keys.requests, json.dumps({
            "op": "dead", "rank": rank, "inc": incarnation, "reporter": self.rank,
            "reporter_inc": self._incarnation if self._status == "joined" else None, "reason": str(reason)}))

    def current(self) -> MembershipView:
        """The latest agreed view (reads the store; MembershipError if it is gone)."""
        return self._refresh()

    def wait_for_epoch(self, epoch_or_predicate: Union[int, Callable[[MembershipView], bool]],
                       timeout: float) -> MembershipView:
        """Block until the view has ``epoch >= n`` (an int) or satisfies ``predicate(view)``.

        Raises MembershipTimeout after ``timeout`` seconds, MembershipError if the store is lost.
        """
        pred = _as_predicate(epoch_or_predicate)
        deadline = time.monotonic() + _check_positive(timeout, "timeout")
        while True:
            view = self._refresh()
            if pred(view):
                return view
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise MembershipTimeout(f"rank {self.rank}: membership view did not reach the condition in "
                                        f"{timeout:g} s; last view: {view}")
            with self._cond:
                if self._view.epoch == view.epoch and self._error is None:
                    self._cond.wait(min(remaining, self.poll_interval_s))

    def bind_state(self, manager: Any) -> None:
        """Keep an elastic-EP state in step with the agreed view.

        ``manager`` is :class:`~sglang_elastic.state.ElasticEPStateManager` (its initialised
        instance is used) or an :class:`~sglang_elastic.state.ElasticEPState`. Each new view is
        applied with ``apply_membership(live, epoch, restarted=...)``: the state's live set becomes
        the view's and its epoch the view's epoch, so every rank's state agrees. A rank whose
        incarnation changed between views is reported as failed-then-joined (``restarted``).
        A view is applied before :meth:`current` / :meth:`wait_for_epoch` return it; the epoch-0
        view (nobody joined yet) is not applied. The state's capacity must be >= ``max_ranks``.
        """
        state = manager
        if not hasattr(state, "apply_membership") or isinstance(manager, type):
            state = manager.instance() if hasattr(manager, "instance") else None
            if state is None:
                raise RuntimeError("bind_state: the ElasticEPStateManager is not initialised; call init(...) first")
        if state.ep_size < self.max_ranks:
            raise ValueError(f"bind_state: the state holds {state.ep_size} ranks but the membership admits "
                             f"{self.max_ranks}; init it with max_ep_size >= {self.max_ranks}")
        with self._bind_lock:
            self._bound = state
            self._applied = None
        self._apply_bound(self._refresh())

    def close(self) -> None:
        """Stop the background thread and drop the connection (no leave: a crash to the server)."""
        self._stop.set()
        t = self._thread
        if t is not None and t is not threading.current_thread():
            t.join()
        self._thread = None
        with self._store_lock:
            self._store = None
        with self._cond:
            self._status = "closed"
            self._cond.notify_all()

    def __enter__(self) -> "MembershipClient":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ------------------------------------------------------------------ internals
    def _op(self, name: str, *args: Any) -> Any:
        with self._store_lock:
            if self._error is not None:
                raise MembershipError(str(self._error)) from self._error.__cause__
            if self._store is None:
                raise MembershipError("membership client is closed")
            try:
                return getattr(self._store, name)(*args)
            except Exception as e:
                err = MembershipError(
                    f"rank {self.rank}: membership store at {self.host}:{self.port} failed during {name} "
                    f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                    f"is the MembershipServer still running?")
                err.__cause__ = e
                self._error = err
        with self._cond:
            self._cond.notify_all()
        raise err

    def _refresh(self) -> MembershipView:
        epoch = int(self._op("get", self._keys.epoch))
        if epoch > self._view.epoch:
            self._on_new_view(MembershipView.from_json(self._op("get", self._keys.view)))
        return self._view

    def _on_new_view(self, view: MembershipView) -> None:
        # apply to the bound state first: whoever sees view E (current, wait_for_epoch) also finds
        # the bound state at E
        self._apply_bound(view)
        with self._cond:
            if view.epoch <= self._view.epoch:
                return
            self._view = view
            inc = self._incarnation
            if inc is not None:
                live = view.is_live(self.rank, inc)
                if self._status == "joining" and live:
                    self._status = "joined"
                elif self._status == "joined" and not live:
                    self._status = "dead"
                    logger.warning("rank %d incarnation %d was declared dead at membership epoch %d: %s",
                                   self.rank, inc, view.epoch,
                                   [c.reason for c in view.changes if c.rank == self.rank] or "superseded")
                elif self._status == "leaving" and not live:
                    self._status = "left"
            self._cond.notify_all()

    def _apply_bound(self, view: MembershipView) -> None:
        with self._bind_lock:
            state, prev = self._bound, self._applied
            if state is None or view.epoch <= 0 or (prev is not None and view.epoch <= prev.epoch):
                return  # epoch 0 (nobody joined yet) leaves the state as initialised
            restarted = [r for r in view.live if prev is not None and r in prev.live
                         and prev.incarnations.get(r) != view.incarnations.get(r)]
            reason = "; ".join(f"{c.kind} {c.rank}#{c.incarnation}: {c.reason}" for c in view.changes)
            try:
                state.apply_membership(view.live, view.epoch, restarted=restarted,
                                       reason=reason or f"membership epoch {view.epoch}")
            except Exception:
                logger.exception("rank %d: applying membership epoch %d to the state failed", self.rank, view.epoch)
            self._applied = view

    def _ensure_thread(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._stop.clear()
            self._thread = threading.Thread(target=self._loop, name=f"membership-rank{self.rank}", daemon=True)
            self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                inc, status = self._incarnation, self._status
                now = time.monotonic()
                if inc is not None and status in ("joining", "joined", "leaving") and now >= self._next_hb:
                    self._op("add", self._keys.heartbeat(self.rank, inc), 1)
                    self._next_hb = now + self.heartbeat_interval_s
                self._refresh()
            except MembershipError as e:
                logger.error("%s", e)
                return
            except Exception:
                logger.exception("rank %d: membership background thread", self.rank)
            self._stop.wait(self.poll_interval_s)
