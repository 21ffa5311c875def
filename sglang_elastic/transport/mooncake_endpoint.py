"""One Mooncake ``TransferEngine`` of one rank: memory registration, peers (session ids), async
one-sided reads and writes, and failure detection. Used by the ``mooncake`` transport (READs of
expert rows) and the host-path ``mooncake`` dispatcher (WRITEs of token rows).

    ep = MooncakeEndpoint(host="127.0.0.1", liveness=lv)
    ep.register(addr, nbytes)                           # refcounted per region
    store.set(..., ep.session)                          # "host:rpc_port"; peers connect with it
    ep.connect(peer, peer_session, incarnation=peer_inc)
    op = ep.post("write", peer, [(local, remote, nbytes)])
    while ep.state(op) == "PROC": ...                   # "DONE" | "PROC" | "ERR"

The engine runs in ``P2PHANDSHAKE`` mode; a restarted rank gets a new RPC port, hence a new
session id. Transfers are posted as small async batches and polled without blocking
(``transfer_check_status``); a killed peer fails them within milliseconds. The engine's first
contact with a session (the segment handshake) blocks on a frozen peer, so it runs in a helper
thread (:meth:`MooncakeEndpoint.post` does that by itself; :meth:`MooncakeEndpoint.contact` makes
first contact ahead of time, bounded by a deadline). :meth:`MooncakeEndpoint.probe` asks a
background thread to ``send_probe`` (which needs the peer's RPC thread, and blocks on a frozen
one). The engine cannot cancel a transfer: :meth:`MooncakeEndpoint.abandon` says whether one may
still touch its buffers.
"""
from __future__ import annotations

import ctypes
import logging
import os
import queue
import threading
import time
from typing import Dict, List, Optional, Sequence, Tuple

from .liveness import Liveness
from .watch import PROBE_EVERY_S, PeerWatch

__all__ = ["MooncakeEndpoint", "MooncakeOp", "import_mooncake", "INSTALL_HINT"]

log = logging.getLogger("sglang_elastic.transport")

INSTALL_HINT = (
    "the mooncake transport needs Mooncake's TransferEngine: pip install mooncake-transfer-engine-non-cuda "
    "(CPU) or mooncake-transfer-engine (CUDA); it loads libibverbs.so.1 even for TCP: "
    "apt-get install -y libibverbs1 librdmacm1 libnuma1"
)

_BAD_BID = {0, (1 << 64) - 1}

Req = Tuple[int, int, int]  # (local address, remote address, bytes)


def import_mooncake():
    """Mooncake's ``TransferEngine`` class, or ImportError naming the package to install."""
    try:
        from mooncake.engine import TransferEngine
    except Exception as exc:  # noqa: BLE001 - ImportError, or a wheel whose libraries fail to load: both mean "install"
        raise ImportError(f"{INSTALL_HINT} (import failed: {exc})") from exc
    return TransferEngine


class MooncakeOp:
    """One posted transfer: one async batch per request, posted by the caller or, for a session not
    contacted yet, by a first-contact thread. ``then``: requests to post once these are done (a slot
    that must land after its rows)."""

    __slots__ = ("kind", "session", "bids", "done", "error", "thread", "then")

    def __init__(self, kind: str, session: str, then: Optional[List[Req]] = None) -> None:
        self.kind, self.session, self.then = kind, session, then
        self.bids: Optional[List[int]] = None
        self.done: List[bool] = []
        self.error: Optional[str] = None
        self.thread: Optional[threading.Thread] = None


def _serve(q: "queue.Queue", handle) -> None:
    """A background thread's loop: ``handle`` each item of ``q`` until ``None`` arrives."""
    while True:
        item = q.get()
        if item is None:
            return
        handle(item)


class _Prober:
    """Background liveness probes (``send_probe`` blocks on a frozen peer, so never on the caller)."""

    def __init__(self, te) -> None:
        self.te = te
        self.q: "queue.Queue[Optional[str]]" = queue.Queue()
        self.pending = set()
        self.result: Dict[str, Tuple[float, bool]] = {}
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=_serve, args=(self.q, self._probe), name="sgle-mooncake-prober",
                                       daemon=True)
        self.thread.start()

    def _probe(self, s: str) -> None:
        try:
            ok = self.te.send_probe(s) == 0
        except Exception:  # noqa: BLE001 - any failure to reach the session is the answer "gone"
            ok = False
        with self.lock:
            self.pending.discard(s)
            self.result[s] = (time.monotonic(), ok)

    def ask(self, session: str, since: float) -> Optional[bool]:
        with self.lock:
            r = self.result.get(session)
            if session not in self.pending:
                self.pending.add(session)
                self.q.put(session)
        if r is not None and r[0] >= since:
            return r[1]
        return None

    def stop(self) -> None:
        self.q.put(None)


def _open_fds() -> Optional[int]:
    """Open file descriptors of this process (``None`` where /proc is not there)."""
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return None


class _Janitor:
    """Closes the engine's idle connections to departed peers, on a background thread.

    Mooncake 0.3.13's TCP transport keeps a small pool of connections per peer and notices that the
    peer closed one only when a transfer on it fails (upstream: kvcache-ai/Mooncake#4234, open): a
    survivor kept ~4 sockets in CLOSE_WAIT per dead peer, forever. Each small read from the gone
    peer fails on one of them and the engine closes it; the reads stop once one no longer frees a
    descriptor, succeeds (the peer is alive: nothing is stale) or does not end within ``WAIT_S``
    (a frozen peer: the read stays posted, into the scratch bytes only).
    """

    READ_BYTES = 8
    MAX_READS = 16
    WAIT_S = 3.0  # a dead peer's last read fails in ~1 s (the engine's reconnect attempt)

    def __init__(self, te, scratch: int) -> None:
        self.te, self.scratch = te, scratch
        self.q: "queue.Queue[Optional[Tuple[str, int]]]" = queue.Queue()
        self.thread: Optional[threading.Thread] = None
        self.stopped = False

    def flush(self, session: str, addr: int) -> None:
        if self.thread is None:
            self.thread = threading.Thread(target=_serve, args=(self.q, self._one), name="sgle-mooncake-janitor",
                                           daemon=True)
            self.thread.start()
        self.q.put((session, addr))

    def _one(self, item: Tuple[str, int]) -> None:
        try:
            self._flush(*item)
        except Exception as exc:  # noqa: BLE001 - best effort: a failed flush leaves what upstream leaves
            log.debug("mooncake flush of %s failed: %s", item[0], exc)

    def _flush(self, session: str, addr: int) -> None:
        for _ in range(self.MAX_READS):
            if self.stopped:  # the endpoint closed: its engine is being torn down
                return
            before = _open_fds()
            bid = self.te.batch_transfer_async_read(session, [self.scratch], [addr], [self.READ_BYTES])
            if bid in _BAD_BID:
                return
            end = time.monotonic() + self.WAIT_S
            st = self.te.transfer_check_status(bid)
            while st == 0 and time.monotonic() < end:
                time.sleep(0.002)
                st = self.te.transfer_check_status(bid)
            after = _open_fds()
            if st != -1 or before is None or after is None or after >= before:
                return

    def stop(self) -> None:
        self.stopped = True
        if self.thread is not None:
            self.q.put(None)


class MooncakeEndpoint:
    """This rank's TransferEngine; see the module docstring.

    Args:
        host, protocol, device_name: what the engine listens on and how (``"tcp"`` on CPU).
        liveness / watch: the process's failure knowledge (a watch is made over ``liveness`` when
            none is given); the endpoint's probe is installed into it.
    """

    def __init__(self, *, host: str = "127.0.0.1", protocol: str = "tcp", device_name: str = "",
                 liveness: Optional[Liveness] = None, watch: Optional[PeerWatch] = None,
                 probe_every_s: float = PROBE_EVERY_S) -> None:
        TransferEngine = import_mooncake()
        self.te = TransferEngine()
        rc = self.te.initialize(host, "P2PHANDSHAKE", protocol, device_name)
        if rc != 0:
            raise RuntimeError(f"Mooncake TransferEngine.initialize({host!r}, 'P2PHANDSHAKE', {protocol!r}) "
                               f"returned {rc}")
        self.session = f"{host}:{self.te.get_rpc_port()}"
        self.watch = watch if watch is not None else PeerWatch(liveness, probe_every_s=probe_every_s,
                                                               owner="mooncake endpoint")
        if self.watch.probe is None:
            self.watch.probe = self.probe
        self._regions: Dict[Tuple[int, int], int] = {}  # (addr, nbytes) -> refcount
        self._sessions: Dict[int, str] = {}  # rank -> session
        self._contacted: set = set()
        self._prober = _Prober(self.te)
        self._scratch = ctypes.create_string_buffer(_Janitor.READ_BYTES)  # lives as long as the endpoint
        self.register(ctypes.addressof(self._scratch), _Janitor.READ_BYTES)
        self._janitor = _Janitor(self.te, ctypes.addressof(self._scratch))

    # ---------------------------------------------------------------- memory
    def register(self, addr: int, nbytes: int) -> None:
        """Register ``nbytes`` at ``addr`` (refcounted per region)."""
        n = self._regions.get((addr, nbytes), 0)
        if n == 0:
            rc = self.te.register_memory(addr, nbytes)
            if rc != 0:
                raise RuntimeError(f"Mooncake register_memory({addr:#x}, {nbytes}) returned {rc}")
        self._regions[(addr, nbytes)] = n + 1

    def unregister(self, addr: int, nbytes: int) -> None:
        """Drop one reference to a registered region; the last one unregisters it."""
        n = self._regions.get((addr, nbytes), 0)
        if n <= 1:
            self._regions.pop((addr, nbytes), None)
            if n == 1:
                self.te.unregister_memory(addr)
        else:
            self._regions[(addr, nbytes)] = n - 1

    # ---------------------------------------------------------------- peers
    def connect(self, rank: int, session: str, incarnation: Optional[int] = None) -> None:
        """Know ``rank`` by its ``session`` (nothing is contacted yet)."""
        self._sessions[int(rank)] = session
        self.watch.connected(rank, incarnation)

    def disconnect(self, rank: int, flush_from: Optional[int] = None) -> None:
        """Forget ``rank`` (the engine has no API to close a session). With ``flush_from`` (an
        address of at least 8 bytes the peer registered) and a session this endpoint used, the
        engine's idle connections to a departed peer are closed in the background (:class:`_Janitor`)."""
        session = self._sessions.pop(int(rank), None)
        if session is not None and flush_from is not None and session in self._contacted:
            self._janitor.flush(session, int(flush_from))

    def session_of(self, rank: int) -> Optional[str]:
        return self._sessions.get(int(rank))

    def contact(self, ops: Sequence[Tuple[int, Req]], deadline: float) -> None:
        """First contact ahead of time: post each ``(rank, request)`` (a few harmless bytes) to a
        session not contacted yet and wait for them until ``deadline`` (a frozen peer is left, and
        so is a peer known dead in the Liveness)."""
        lv = self.watch.liveness
        posted = [(r, self.post("write", r, [req])) for r, req in ops
                  if self._sessions[r] not in self._contacted and not lv.is_dead(r)]
        for r, op in posted:
            while time.monotonic() < deadline and not lv.is_dead(r):
                if op.thread is not None and op.thread.is_alive():
                    op.thread.join(0.01)  # the segment handshake blocks on a frozen peer
                elif self.state(op) == "PROC":
                    time.sleep(1e-3)
                else:
                    break

    # ---------------------------------------------------------------- transfers
    def post(self, kind: str, rank: int, reqs: Sequence[Req], then: Optional[List[Req]] = None) -> MooncakeOp:
        """Post ``reqs`` (``kind`` "read" or "write") to ``rank``: one async batch each; ``then``
        follows once they are done. A session not contacted yet is contacted on a helper thread."""
        session = self._sessions[int(rank)]
        op = MooncakeOp(kind, session, then)
        reqs = list(reqs)
        if session in self._contacted:
            self._submit(op, reqs)
            return op

        def first_contact():
            self._submit(op, reqs)
            if op.error is None:
                self._contacted.add(session)

        op.thread = threading.Thread(target=first_contact, name=f"sgle-mooncake-open-{rank}", daemon=True)
        op.thread.start()
        return op

    def _submit(self, op: MooncakeOp, reqs: List[Req]) -> None:
        fn = self.te.batch_transfer_async_read if op.kind == "read" else self.te.batch_transfer_async_write
        bids = []
        try:
            for loc, rem, nb in reqs:
                bid = fn(op.session, [loc], [rem], [nb])
                if bid in _BAD_BID:
                    op.error = f"batch_transfer_async_{op.kind} to {op.session} returned {bid}"
                    break
                bids.append(bid)
        except Exception as exc:  # noqa: BLE001 - the engine's errors mean the session is unreachable
            op.error = str(exc)
        op.done = [False] * len(bids)
        op.bids = bids

    def state(self, op: MooncakeOp) -> str:
        """"DONE", "PROC" or "ERR" (a failed transfer: the peer is gone or unreachable)."""
        if op.thread is not None and op.thread.is_alive():
            return "PROC"
        if op.bids is None:
            return "PROC" if op.error is None else "ERR"
        all_done = True
        for i, bid in enumerate(op.bids):
            if op.done[i]:
                continue
            st = self.te.transfer_check_status(bid)  # 1 done (freed), 0 busy, -1 failed (freed), -2 timeout
            if st == 1:
                op.done[i] = True
            elif st == 0:
                all_done = False
            else:
                if st == -1:
                    op.done[i] = True
                op.error = op.error or f"{op.kind} status {st}"
        if op.error is not None:
            return "ERR"
        if all_done and op.then:
            nxt, op.then = op.then, None
            op.bids = None
            self._submit(op, nxt)
            return "ERR" if op.error is not None else "PROC"
        return "DONE" if all_done else "PROC"

    def abandon(self, op: MooncakeOp) -> bool:
        """Give up ``op``; True if it certainly no longer touches its buffers (the engine cannot
        cancel: only a transfer that reported done or failed is over)."""
        if op.thread is not None and op.thread.is_alive():
            return False
        return op.bids is not None and all(op.done)

    def probe(self, rank: int, since: float = 0.0) -> Optional[bool]:
        """Non-blocking: False when ``rank``'s session refused a probe sent after ``since``."""
        session = self._sessions.get(int(rank))
        if session is None:
            return False
        return self._prober.ask(session, since)

    # ---------------------------------------------------------------- lifecycle
    def close(self) -> None:
        """Stop the prober and unregister everything. Idempotent."""
        if self.te is None:
            return
        self._prober.stop()
        self._janitor.stop()
        for addr, _ in list(self._regions):
            try:
                self.te.unregister_memory(addr)
            except Exception as exc:  # noqa: BLE001 - closing: nothing to do about a failed release
                log.debug("mooncake unregister failed: %s", exc)
        self._regions.clear()
        self.te = None
