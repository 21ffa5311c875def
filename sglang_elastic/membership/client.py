"""The membership client: a rank's side of :mod:`sglang_elastic.membership` (join, heartbeat,
report, leave, read the agreed view), and the feed of the process's :class:`Liveness`.

Besides the store (requests, heartbeats, the published record), each client keeps one watch
connection to the server (:mod:`sglang_elastic.membership.watch`): the server pushes every new
record over it, so waits on the epoch end at once, and every death in a record is passed to
:meth:`Liveness.mark_dead` (a rejoin under a new incarnation to :meth:`Liveness.mark_alive`), so
every wait in this process that consults the liveness ends within milliseconds of the kill.
"""
from __future__ import annotations

import json
import logging
import threading
import time
from typing import Any, Callable, Dict, Optional, Union

import torch.distributed as dist

from ..transport.liveness import Liveness
from .view import (DEFAULT_NAMESPACE, HISTORY, STORE_ERRORS, MembershipError, MembershipTimeout, MembershipView,
                   _as_predicate, _check_port, _check_positive, _check_rank, _connect, _Keys)
from .watch import WatchLink

__all__ = ["MembershipClient"]

logger = logging.getLogger(__name__)


class MembershipClient:
    """Rank side: join, heartbeat, report, leave, read the agreed view.

    Args:
        host, port: the :class:`MembershipServer`'s store.
        rank: this rank's id, ``0 <= rank < max_ranks`` of the server (``ValueError`` otherwise).
        heartbeat_interval_s: at most half the server's ``heartbeat_timeout_s`` (default: a quarter
            of it, read from the server's config).
        connect_timeout_s: how long to try reaching the store before ``MembershipError``.
        store_timeout_s: per-operation timeout; a dead or frozen server gives ``MembershipError``.
        poll_interval_s: how often the background thread reads the view (default
            ``min(heartbeat_interval_s, 0.05)``); pushed records usually arrive first.
        liveness: this process's :class:`~sglang_elastic.transport.Liveness`, fed with every death
            the agreed records name (default: a private one, :attr:`liveness`).

    ``status`` is ``"new"``, ``"joining"``, ``"joined"``, ``"leaving"``, ``"left"``, ``"dead"``
    (this incarnation was declared dead: call :meth:`join` again to come back under a new
    incarnation) or ``"closed"``. :meth:`close` without :meth:`leave` is a crash to the server.
    """

    def __init__(
        self,
        host: str,
        port: int,
        rank: int,
        heartbeat_interval_s: Optional[float] = None,
        *,
        connect_timeout_s: float = 10.0,
        store_timeout_s: float = 10.0,
        poll_interval_s: Optional[float] = None,
        namespace: str = DEFAULT_NAMESPACE,
        liveness: Optional[Liveness] = None,
    ) -> None:
        self.rank = _check_rank(rank)
        port = _check_port(port)
        if port == 0:
            raise ValueError("port must be the server's port, got 0")
        hb = None if heartbeat_interval_s is None else _check_positive(heartbeat_interval_s, "heartbeat_interval_s")
        poll = None if poll_interval_s is None else _check_positive(poll_interval_s, "poll_interval_s")
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
        self._seen_epoch = -1                 # last record whose changes fed the liveness
        self._seen_lock = threading.RLock()  # liveness listeners may read the view
        self.liveness = liveness if liveness is not None else Liveness()
        self._watch: Optional[WatchLink] = None
        try:
            self.config: Dict[str, Any] = json.loads(self._op("get", self._keys.config))
            self.max_ranks = int(self.config["max_ranks"])
            timeout = float(self.config["heartbeat_timeout_s"])
            self.heartbeat_interval_s = timeout / 4 if hb is None else hb
            self.poll_interval_s = min(self.heartbeat_interval_s, 0.05) if poll is None else poll
            if self.rank >= self.max_ranks:
                raise ValueError(f"rank {self.rank} is out of range: the membership server admits ranks "
                                 f"0..{self.max_ranks - 1} (max_ranks={self.max_ranks})")
            if 2 * self.heartbeat_interval_s > timeout:
                raise ValueError(f"heartbeat_interval_s ({self.heartbeat_interval_s:g}) must be at most half "
                                 f"the server's heartbeat_timeout_s ({timeout:g})")
            if self.config.get("watch"):
                try:
                    self._watch = WatchLink(tuple(self.config["watch"]), self._on_pushed, self._on_lost,
                                            name=f"membership-watch-rank{self.rank}",
                                            connect_timeout_s=min(connect_timeout_s, 2.0))
                except OSError as e:
                    raise MembershipError(f"rank {self.rank}: the membership watch socket at "
                                          f"{self.config['watch']} is unreachable ({e}); is the "
                                          f"MembershipServer running?") from e
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
            if self._watch is not None:  # before the join request: from now on our end is our death
                self._watch.bind(self.rank, inc)
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
            if self._watch is not None:  # a planned leave: closing the connection later is no death
                self._watch.leaving()
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
        if self._watch is not None:
            self._watch.close()
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
            except STORE_ERRORS as e:
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
            self._advance(MembershipView.from_json(self._op("get", self._keys.view)))
        return self._view

    def _on_pushed(self, raw: Dict[str, Any]) -> None:
        """A record pushed over the watch connection (reader thread)."""
        if self._status == "closed":
            return
        self._advance(MembershipView.from_dict(raw))

    def _on_lost(self, message: str) -> None:
        """The watch connection ended and cannot be reopened: the server is gone."""
        with self._store_lock:
            if self._error is None and self._store is not None:
                self._error = MembershipError(f"rank {self.rank}: {message}; is the MembershipServer still running?")
        with self._cond:
            self._cond.notify_all()

    def _advance(self, view: MembershipView) -> None:
        """Take in a newer record (pushed or polled): liveness first, then the bound state and waiters.

        The liveness learns from every record's changes in epoch order, so a poll that jumps
        several epochs ahead (or a reconnect) reads the skipped records from the store history.
        """
        with self._seen_lock:
            last = self._seen_epoch
            if view.epoch <= last:
                return
            if last >= 0:
                for e in range(max(last + 1, view.epoch - HISTORY + 1), view.epoch):
                    key = self._keys.view_at(e)
                    if self._op("check", [key]):
                        MembershipView.from_json(self._op("get", key)).feed(self.liveness)
            view.feed(self.liveness)
            self._seen_epoch = view.epoch
            # still under the lock: a concurrent caller that finds this epoch already seen must not
            # return (from current()) before the view is applied
            self._on_new_view(view)


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
            except Exception:  # noqa: BLE001 - a failing state listener must not stop membership
                # (the record stays agreed and the next one is applied); it is logged in full
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
                    if self._watch is not None:
                        self._watch.ping()
                    self._next_hb = now + self.heartbeat_interval_s
                self._refresh()
            except MembershipError as e:
                logger.error("%s", e)
                return
            except (KeyError, TypeError, ValueError):  # a malformed record: log it, poll again
                logger.exception("rank %d: membership background thread", self.rank)
            self._stop.wait(self.poll_interval_s)
