"""Standalone torch.distributed process groups over a live set, and waits on their work that watch
for deaths: the two-sided endpoint shared by the ``torch`` transport and the ``torch`` dispatcher.

Each live set (a *view*: ``((rank, incarnation), ...)``) gets its own ``ProcessGroupGloo`` (plus
``ProcessGroupNCCL`` on cuda) over a ``PrefixStore`` unique to that view and formation; nothing
touches the default process group, so a group can be thrown away and rebuilt over the survivors
any number of times.

A gloo wait cannot be sliced into polls (a wait that times out closes the pair), so
:class:`PairWaiter` waits for each peer's works on a helper thread while the caller watches the
process's :class:`~sglang_elastic.transport.Liveness`: a peer known dead is given up at once, the
others keep their own deadline. NCCL works are polled (:class:`NcclWork`).

**Broken until rebuilt** (the one rule, kept here for every user of a group): a gloo wait that
times out closes *every* pair of its context, not only the silent peer's, so live partners would be
blamed for the closed pairs later. A group is therefore marked :attr:`Group.broken` when one of its
waits times out (:func:`wait_work`), and when a :class:`PairWaiter` abandons a wait, leaving a peer
by knowledge or by its deadline (the abandoned work stays posted and may time out later). Nothing
more should move on a broken group until its owner builds a new one (``set_peers``); the mark is on
the group object, so a late timeout of a replaced group never touches its successor. A killed
peer's pairs fail by themselves within milliseconds (the kernel closed its sockets) and break
nothing else: a peer known dead is given :data:`KNOWN_DEAD_GRACE_S` to fail that way before its
wait is abandoned, so every survivor of a kill goes on without breaking (whether it heard of the
death or saw it first), and only a frozen peer declared dead breaks the group, on every survivor.
"""
from __future__ import annotations

import datetime
import hashlib
import logging
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor
from concurrent.futures import wait as futures_wait
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from .base import PeerFailure
from .liveness import Liveness
from .store import backoff

__all__ = ["Group", "form_group", "PairWaiter", "NcclWork", "is_timeout", "td", "wait_work"]

log = logging.getLogger("sglang_elastic.transport")

# How long a wait on a peer known dead may take to end by itself (a killed peer's connection error)
# before it is abandoned and its group broken (a frozen peer's work stays posted).
KNOWN_DEAD_GRACE_S = 0.25

View = Tuple[Tuple[int, int], ...]


def td(seconds: float) -> datetime.timedelta:
    """``seconds`` (at least 1 ms) as a timedelta, for torch.distributed timeouts."""
    return datetime.timedelta(seconds=max(seconds, 0.001))


def is_timeout(exc: BaseException) -> bool:
    """Whether a torch.distributed error is a timeout (a silent peer), not a closed connection."""
    text = str(exc)
    return isinstance(exc, TimeoutError) or "imed out" in text or "timeout" in text.lower()


class Group:
    """One view's process groups over ``members`` (sorted global ranks): ``gloo``, ``nccl`` (cuda
    only), ``index[rank]`` (the group rank of a global rank), and ``broken`` (pairs may be unusable:
    set by :func:`wait_work`, :class:`PairWaiter` and users, see the module docstring; the owner
    rebuilds)."""

    def __init__(self, members: Tuple[int, ...], gloo, nccl=None) -> None:
        self.members = members
        self.index = {r: i for i, r in enumerate(members)}
        self.gloo = gloo
        self.nccl = nccl
        self.broken = False
        self._pool: Optional[ThreadPoolExecutor] = None

    def pool(self) -> ThreadPoolExecutor:
        """Helper threads for :class:`PairWaiter` (one per peer at most)."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=max(2, 2 * len(self.members)),
                                            thread_name_prefix="sgle-pair-wait")
        return self._pool

    def abort_nccl(self) -> None:
        """Abort the NCCL communicator (unblocks the GPU stream at once; NCCL's watchdog would kill
        the process later)."""
        if self.nccl is not None:
            try:
                self.nccl.abort()
            except RuntimeError as exc:  # already aborted: dropping it is enough
                log.debug("nccl abort: %s", exc)
            self.nccl = None

    def destroy(self) -> None:
        """Abort both groups (pending waits fail at once) and stop the helper threads. The group is
        marked broken first: the failures this causes in pending waits are no evidence against peers."""
        self.broken = True
        for pg in (self.nccl, self.gloo):
            if pg is None:
                continue
            try:
                pg.abort()
            except Exception as exc:  # noqa: BLE001 - already aborted / not supported: dropping it is enough
                log.debug("group abort: %s", exc)
        self.gloo = self.nccl = None
        if self._pool is not None:
            self._pool.shutdown(wait=False)
            self._pool = None


def form_group(store, ns: str, view: View, rank: int, incarnation: int, device: torch.device, timeout_s: float,
               host: str, what: str = "torch", liveness: Optional[Liveness] = None) -> Group:
    """Build process groups (gloo, plus NCCL on cuda) over ``view`` = ((rank, incarnation), ...).

    Collective over the view's members, through ``store`` under ``ns``; each formation of the same
    view gets fresh keys, so a group can be rebuilt over the same members any number of times.
    Raises :class:`PeerFailure` naming the first member that did not arrive within ``timeout_s``,
    or at once naming a member known dead in ``liveness``.

    A formation is numbered by counting arrivals (the k-th ``n`` arrivals form formation k) and is
    decided once, in the store, by the first member to conclude: ``formed`` (every member arrived)
    or abandoned, naming the members it held dead or found absent at its deadline. Members absent
    at a deadline fail the formation for everyone still waiting (``PeerFailure`` naming them); over
    a member held dead (a suspicion, which may be withdrawn) the others arrive again in the next
    formation, where their own knowledge or deadline ends the wait. So a
    member that gave up on a view and comes back to it later (a suspicion withdrawn) never lands
    in another formation than its peers, and no member builds gloo pairs with one that has left.
    """
    members = tuple(r for r, _ in view)
    n = len(members)
    h = hashlib.sha1(repr(view).encode()).hexdigest()[:16]
    base = f"{ns}/{h}"
    deadline = time.monotonic() + timeout_s
    while True:
        gen = (int(store.add(f"{base}/join", 1)) - 1) // n
        prefix = f"{base}/{gen}/"
        store.set(f"{prefix}arrived/{rank}", str(incarnation))
        verdict, missing = _formation(store, prefix, members, deadline, liveness, what)
        if verdict == "formed":
            break
        if verdict == "again":
            log.info("rank %d: %s formation %d over %s abandoned: next one", rank, what, gen, list(members))
            continue  # a member left this formation over a suspicion: meet the others in the next one
        raise PeerFailure(missing[0], f"rank(s) {missing} did not join the {what} group over {list(members)}")
    idx = members.index(rank)
    gloo = _connect_gloo(dist.PrefixStore(prefix + "gloo/", _own_client(store, timeout_s)), members, rank, timeout_s, deadline, host,
                         liveness, what)
    nccl = None
    if device.type == "cuda":
        nopts = dist.ProcessGroupNCCL.Options()
        nopts._timeout = td(timeout_s)
        nccl = dist.ProcessGroupNCCL(dist.PrefixStore(prefix + "nccl/", store), idx, n, nopts)
        # Create the communicator now, while every member is known to be here, not lazily
        # inside a later call (where a dead peer would stall its init past the deadline).
        nccl.allreduce([torch.zeros(1, device=device)]).wait()
        torch.cuda.synchronize(device)
    log.debug("rank %d: %s group gen %d over %s", rank, what, gen, list(members))
    return Group(members, gloo, nccl)


def _own_client(store, timeout_s: float):
    """A client of its own to ``store`` (when it is a TCPStore) with ``timeout_s``: gloo's rendezvous
    blocks in store reads, which on a shared client would hold up every other user of the process's
    store (step plans, marks, votes) until the store's own timeout."""
    if isinstance(store, dist.TCPStore):
        return dist.TCPStore(store.host, store.port, is_master=False, timeout=td(timeout_s))
    return store


def _connect_gloo(store, members: Tuple[int, ...], rank: int, timeout_s: float, deadline: float, host: str,
                  liveness: Optional[Liveness], what: str):
    """Connect the gloo pairs of a formed group on a helper thread, watching ``liveness``: a member
    that dies between its arrival and its connection ends the wait by knowledge (gloo's own
    rendezvous would wait for the store's timeout), as does ``deadline``."""
    opts = dist.ProcessGroupGloo._Options()
    opts._timeout = td(timeout_s)
    opts._devices = [dist.ProcessGroupGloo.create_device(hostname=host)]
    box: Dict[str, object] = {}

    def connect() -> None:
        try:
            box["pg"] = dist.ProcessGroupGloo(store, members.index(rank), len(members), opts)
        except Exception as exc:  # noqa: BLE001 - handed to the caller, who names the peer
            box["err"] = exc.with_traceback(None)

    t = threading.Thread(target=connect, name="sgle-gloo-connect", daemon=True)
    t.start()
    others = [r for r in members if r != rank]
    grace = None
    while True:
        t.join(0.001)
        if not t.is_alive() and "pg" in box:
            return box["pg"]
        if liveness is not None:
            try:
                liveness.check(others, what=f"connecting the {what} group")
            except PeerFailure:
                # Every member arrived (the formation is formed), so the others connect whatever
                # this rank believes: a member held dead on a suspicion that is alive connects
                # within milliseconds. Leaving alone would put this rank out of step with them.
                t.join(KNOWN_DEAD_GRACE_S)
                if "pg" in box:
                    return box["pg"]
                raise
        now = time.monotonic()
        if not t.is_alive() and grace is None:  # a connection failed: a member died; wait to learn which
            grace = min(deadline, now + 2.0)
        if now >= (deadline if grace is None else grace):
            why = box.get("err") or "timed out"
            raise PeerFailure(others[0], f"the {what} group over {list(members)} did not connect: "
                              f"{str(why).splitlines()[0] if str(why) else why!r}")
        if grace is not None:  # the thread is done: no join to wait in
            backoff(0.01, grace - now, liveness)


def _formation(store, prefix: str, members: Tuple[int, ...], deadline: float, liveness: Optional[Liveness],
               what: str) -> Tuple[str, List[int]]:
    """Wait for every member's arrival under ``prefix`` and decide the formation (the first decision
    wins, through ``compare_set``): ``formed``, or ``dead:<ranks>`` / ``timeout:<ranks>`` naming the
    members the deciding member held dead or found absent at its deadline. Returns
    ``("formed", [])``, ``("again", [])`` (decided before this member arrived, abandoned over a
    suspicion, which may be withdrawn, or over members that did arrive since: meet in the next
    formation) or ``("missing", ranks)`` (members absent at a deadline this member waited through,
    still absent). Raises the :class:`PeerFailure` of a missing member known
    dead, after recording the abandonment."""
    state = f"{prefix}state"

    def arrived(r: int) -> bool:
        return store.check([f"{prefix}arrived/{r}"])

    def outcome(value: bytes) -> Tuple[str, List[int]]:
        text = value.decode()
        if text == "formed":
            return "formed", []
        why, _, listed = text.partition(":")
        gone = [int(r) for r in listed.split(",") if r and not arrived(int(r))] if why == "timeout" else []
        return ("missing", gone) if gone else ("again", [])

    def abandon(missing: List[int], why: str) -> Tuple[str, List[int]]:
        return outcome(store.compare_set(state, "", f"{why}:" + ",".join(map(str, missing))))

    if store.check([state]):
        if store.get(state) == b"formed":  # decided with this member's arrival counted: connect with them
            return "formed", []
        return "again", []  # abandoned before this member arrived: that verdict is not about it
    delay = 0.002
    while True:
        if store.check([state]):
            return outcome(store.get(state))
        missing = [r for r in members if not arrived(r)]
        if not missing:
            return outcome(store.compare_set(state, "", "formed"))
        try:
            if liveness is not None:
                liveness.check(missing, what=f"forming the {what} group")
        except PeerFailure:
            if abandon(missing, "dead")[0] == "formed":
                return "formed", []  # every member had arrived meanwhile: gloo decides
            raise
        now = time.monotonic()
        if now >= deadline:
            return abandon(missing, "timeout")
        delay = backoff(delay, deadline - now, liveness)


def wait_work(group: Group, work, deadline: float) -> Optional[BaseException]:
    """Wait for one gloo ``work`` of ``group`` until ``deadline``; None when it completed, else its
    error (without traceback). A timeout marks the group broken (see the module docstring)."""
    try:
        work.wait(td(deadline - time.monotonic()))
        return None
    except Exception as exc:  # noqa: BLE001 - handed to the caller, who names the peer
        if is_timeout(exc):
            group.broken = True
        # Without its traceback: its frames hold the works, whose buffers hold the group's sockets
        # open until a garbage collection.
        return exc.with_traceback(None)


class PairWaiter:
    """Waits for each peer's gloo works (in posting order) on helper threads, until ``deadline``.

    :meth:`next` hands out peers as they finish: ``(peer, None)`` when all its works completed,
    ``(peer, exc)`` when one raised (the peer closed its connection: it is gone, or the wait timed
    out), ``(peer, PeerFailure)`` when ``liveness`` knows it dead (its helper thread is abandoned;
    it ends when gloo gives up). gloo works may be waited for once only. :meth:`calls` runs any
    per-peer blocking function the same way (``next`` then hands out its return value).

    A peer known dead gets :data:`KNOWN_DEAD_GRACE_S` for its wait to end by itself (a killed peer's
    connection error); a wait abandoned then, or still pending when ``next`` gives up at ``until``,
    marks the group broken, as does a wait that timed out (see the module docstring).
    """

    def __init__(self, group: Group, works: Dict[int, Sequence[object]], deadline: float,
                 liveness: Optional[Liveness] = None, what: str = "") -> None:
        fns = {p: (lambda ws=list(ws): self._wait_all(group, ws, deadline)) for p, ws in works.items()}
        self._start(group, fns, liveness, what)

    @classmethod
    def calls(cls, group: Group, fns: Dict[int, Callable[[], object]], liveness: Optional[Liveness] = None,
              what: str = "") -> "PairWaiter":
        """Run ``fns[peer]()`` (each bounded by its own deadline) on helper threads."""
        self = cls.__new__(cls)
        self._start(group, fns, liveness, what)
        return self

    def _start(self, group: Group, fns, liveness, what) -> None:
        self.group, self.liveness, self.what = group, liveness, what
        pool = group.pool()
        self._futs: Dict[Future, int] = {pool.submit(fn): p for p, fn in fns.items()}
        self.pending = set(fns)

    @staticmethod
    def _wait_all(group: Group, works, deadline: float) -> Optional[BaseException]:
        for w in works:
            exc = wait_work(group, w, deadline)
            if exc is not None:
                return exc
        return None

    def next(self, until: float) -> Optional[Tuple[int, Optional[BaseException]]]:
        """The next peer that finished or is known dead, or None when none did by ``until``."""
        while self.pending:
            if self.liveness is not None:
                dead = self.liveness.first_dead(sorted(self.pending))
                if dead is not None:
                    futs = [f for f, p in self._futs.items() if p == dead]
                    done, _ = futures_wait(futs, timeout=KNOWN_DEAD_GRACE_S)
                    self._drop(dead)
                    if len(done) == len(futs) and all(f.exception() is None for f in futs):
                        res = futs[0].result()
                        if not isinstance(res, BaseException):
                            return dead, res  # it finished before it died: the pair is complete
                    else:  # still blocked (frozen): abandoned, its work may time out later
                        self.group.broken = True
                    return dead, PeerFailure(dead, f"rank {dead} is dead ({self.liveness.reason(dead)})"
                                                   + (f" during {self.what}" if self.what else ""))
            live = [f for f, p in self._futs.items() if p in self.pending]
            left = until - time.monotonic()
            done, _ = futures_wait(live, timeout=max(0.0, min(left, 0.02)), return_when=FIRST_COMPLETED)
            for f in done:
                p = self._futs[f]
                self._drop(p)
                return p, f.exception() or f.result()
            if left <= 0:
                self.group.broken = True  # the pending ones' works stay posted and time out later
                return None
        return None

    def _drop(self, peer: int) -> None:
        self.pending.discard(peer)
        for f in [f for f, p in self._futs.items() if p == peer]:
            del self._futs[f]


class NcclWork:
    """Polls an NCCL work against a deadline and the process's Liveness (NCCL never raises for a
    frozen or vanished peer by itself)."""

    def __init__(self, work, peers: List[int]) -> None:
        self.work, self.peers = work, peers

    def wait_until(self, deadline: float, liveness: Optional[Liveness] = None) -> Optional[int]:
        """None when the work finished without error before ``deadline``; else the peer to suspect
        (a peer known dead in ``liveness``, or -1 when NCCL cannot say)."""
        delay, start = 2e-5, time.monotonic()
        while True:
            try:
                if self.work.is_completed():
                    self.work.wait()
                    return None
            except RuntimeError:
                return -1
            if liveness is not None:
                dead = liveness.first_dead(self.peers)
                if dead is not None:
                    return dead
            now = time.monotonic()
            if now >= deadline:
                return -1
            time.sleep(delay)
            # Tight polling for the first 50 ms (NVLink chunks finish in a few ms), then back off.
            delay = min(2 * delay, 1e-4 if now - start < 0.05 else 0.005)
