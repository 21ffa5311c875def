"""The watch connection: one TCP connection per rank to the membership server, news both ways.

Why: a process killed with SIGKILL cannot say goodbye, but the kernel closes its sockets when it
dies, and the peer of a closed TCP connection sees end-of-file at once (on the same host, and on
another host as soon as the dying host's kernel sends its FIN). So the server learns of a death in
about a millisecond instead of after a heartbeat timeout; heartbeats remain for processes that are
alive but silent (frozen, partitioned) and for hosts that vanish without a FIN.

Protocol (newline-delimited JSON, one object per line):

* client -> server: ``{"op": "bind", "rank": r, "inc": i}`` (the end of this connection means
  incarnation ``i`` of rank ``r`` died), ``{"op": "leaving"}`` (a planned leave follows: the end of
  the connection is not a death), ``{"op": "hb"}`` (proof of life, counted like a store heartbeat).
* server -> client: ``{"op": "view", "view": {...}}`` for every published membership record, in
  epoch order, and the current one right after connecting.

Only the server decides: the end of a bound connection becomes a death *request* that the server's
one decider applies like any report (:mod:`sglang_elastic.membership.server`).
"""
from __future__ import annotations

import json
import logging
import selectors
import socket
import threading
import time
from typing import Callable, Dict, List, Optional, Tuple

__all__ = ["WatchLink", "WatchServer", "GONE_REASON"]

logger = logging.getLogger(__name__)

GONE_REASON = "heartbeat connection closed (the process exited or its host dropped the link)"
_SEND_TIMEOUT_S = 0.5   # a client that cannot take a few hundred bytes for this long is frozen
_MAX_LINE = 1 << 20     # protects the server from a peer that streams garbage without newlines


def _lines(buf: bytearray, data: bytes) -> List[dict]:
    """Append ``data`` to ``buf`` and pop every complete JSON line (malformed lines are skipped)."""
    buf += data
    out = []
    while True:
        i = buf.find(b"\n")
        if i < 0:
            break
        raw = bytes(buf[:i])
        del buf[: i + 1]
        try:
            msg = json.loads(raw)
        except ValueError:
            logger.warning("membership watch: ignoring malformed line %r", raw[:200])
            continue
        if isinstance(msg, dict):
            out.append(msg)
    return out


class _Conn:
    __slots__ = ("sock", "buf", "rank", "inc", "leaving", "dropped", "lock")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = bytearray()
        self.rank: Optional[int] = None
        self.inc: Optional[int] = None
        self.leaving = False
        self.dropped = False  # the server cut it (client too slow): its end is not a death
        self.lock = threading.Lock()


class WatchServer:
    """Server side: accepts watch connections, reports bound connections that end, broadcasts.

    Args:
        host: address to listen on (the membership server's host).
        on_gone: ``on_gone(rank, incarnation, reason)`` when a bound connection ends without a
            ``leaving`` notice; called from the watch thread.
        on_seen: ``on_seen(rank, incarnation)`` on every ``hb`` line.
        hello: returns the line sent to a client right after it connects (the current view).
    """

    def __init__(self, host: str, on_gone: Callable[[int, int, str], None],
                 on_seen: Callable[[int, int], None], hello: Callable[[], bytes]) -> None:
        self._on_gone, self._on_seen, self._hello = on_gone, on_seen, hello
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind((host, 0))
        self._listener.listen(256)
        self._listener.setblocking(False)
        self.address: Tuple[str, int] = (host, self._listener.getsockname()[1])
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._sel = selectors.DefaultSelector()
        self._sel.register(self._listener, selectors.EVENT_READ, None)
        self._sel.register(self._wake_r, selectors.EVENT_READ, None)
        self._lock = threading.Lock()
        self._conns: List[_Conn] = []
        self._bound: Dict[int, _Conn] = {}
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=f"membership-watch:{self.address[1]}", daemon=True)
        self._thread.start()

    def broadcast(self, line: bytes) -> None:
        """Send ``line`` to every connected client (called by the monitor after each publish)."""
        with self._lock:
            conns = list(self._conns)
        for c in conns:
            self._send(c, line)

    def close(self) -> None:
        """Stop the thread and close every connection (clients see the server go)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._wake_w.send(b"x")
        self._thread.join()
        for c in list(self._conns):
            self._forget(c)
        self._sel.close()
        for s in (self._listener, self._wake_r, self._wake_w):
            s.close()

    # ------------------------------------------------------------------ internals
    def _send(self, c: _Conn, line: bytes) -> None:
        with c.lock:
            if c.dropped or c.sock.fileno() < 0:  # cut by us, or already closed
                return
            try:
                c.sock.sendall(line)
            except socket.timeout:
                # Alive but not reading (frozen): cut it; heartbeats decide about the process.
                c.dropped = True
                logger.warning("membership watch: rank %s stopped reading its connection; dropped it", c.rank)
                self._shutdown(c)
            except OSError:
                self._shutdown(c)  # the peer is gone: the watch thread sees the end and reports it

    @staticmethod
    def _shutdown(c: _Conn) -> None:
        try:
            c.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass  # already closed by the peer

    def _run(self) -> None:
        while not self._closed:
            for key, _ in self._sel.select():
                obj = key.fileobj
                if obj is self._listener:
                    self._accept()
                elif obj is self._wake_r:
                    try:
                        self._wake_r.recv(64)
                    except BlockingIOError:
                        pass
                else:
                    self._read(key.data)

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:  # e.g. out of fds: keep serving the connections we have
                logger.warning("membership watch: accept failed: %s", e)
                return
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.settimeout(_SEND_TIMEOUT_S)
            c = _Conn(sock)
            with self._lock:
                self._conns.append(c)
            self._sel.register(sock, selectors.EVENT_READ, c)
            self._send(c, self._hello())

    def _read(self, c: _Conn) -> None:
        try:
            data = c.sock.recv(65536)
        except (socket.timeout, BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""  # reset by the peer: an end like any other
        if not data or len(c.buf) > _MAX_LINE:
            self._end(c)
            return
        for msg in _lines(c.buf, data):
            op = msg.get("op")
            if op == "hb" and c.rank is not None:
                self._on_seen(c.rank, c.inc)
            elif op == "bind":
                try:
                    rank, inc = int(msg["rank"]), int(msg["inc"])
                except (KeyError, TypeError, ValueError):
                    logger.warning("membership watch: bad bind %r", msg)
                    continue
                with self._lock:
                    prev = self._bound.get(rank)
                    if prev is None or prev.inc is None or prev.inc <= inc:
                        self._bound[rank] = c
                c.rank, c.inc, c.leaving = rank, inc, False
                self._on_seen(rank, inc)
            elif op == "leaving":
                c.leaving = True

    def _forget(self, c: _Conn) -> bool:
        """Unregister and close ``c``; True when it was the live binding of its rank."""
        try:
            self._sel.unregister(c.sock)
        except (KeyError, ValueError):
            pass  # never registered, or the selector is closed
        with c.lock:  # never while the monitor is sending on it (its fd number could be reused)
            c.sock.close()
        with self._lock:
            if c in self._conns:
                self._conns.remove(c)
            bound = c.rank is not None and self._bound.get(c.rank) is c
            if bound:
                del self._bound[c.rank]
        return bound

    def _end(self, c: _Conn) -> None:
        bound = self._forget(c)
        if bound and not c.leaving and not c.dropped and not self._closed:
            self._on_gone(c.rank, c.inc, GONE_REASON)


class WatchLink:
    """Client side: one connection to the :class:`WatchServer`, a reader thread, reconnects.

    Args:
        address: the server's watch address (published in the membership config).
        on_view: ``on_view(view_dict)`` for every pushed record (from the reader thread).
        on_lost: ``on_lost(message)`` once, when the server is gone (no reconnect possible).
        name: thread name.
        connect_timeout_s: how long the first connect (and each reconnect) may try.
    """

    def __init__(self, address: Tuple[str, int], on_view: Callable[[dict], None],
                 on_lost: Callable[[str], None], name: str, connect_timeout_s: float = 5.0) -> None:
        self.address = (str(address[0]), int(address[1]))
        self._on_view, self._on_lost = on_view, on_lost
        self._connect_timeout_s = connect_timeout_s
        self._lock = threading.Lock()
        self._binding: Optional[Tuple[int, int]] = None
        self._leaving = False
        self._closed = False
        self._sock = self._dial()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def bind(self, rank: int, inc: int) -> None:
        """From now on the end of this connection means ``(rank, inc)`` died."""
        with self._lock:
            self._binding, self._leaving = (int(rank), int(inc)), False
        self._send({"op": "bind", "rank": int(rank), "inc": int(inc)})

    def leaving(self) -> None:
        """A planned leave follows: the end of the connection is not a death."""
        with self._lock:
            self._leaving = True
        self._send({"op": "leaving"})

    def ping(self) -> None:
        """Proof of life for the bound incarnation."""
        if self._binding is not None:
            self._send({"op": "hb"})

    def close(self) -> None:
        """Close the connection (to the server: the bound process ended) and join the reader."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            sock = self._sock
        try:
            sock.shutdown(socket.SHUT_RDWR)  # wakes the reader's recv
        except OSError:
            pass  # already gone
        if self._thread is not threading.current_thread():
            self._thread.join()
        sock.close()

    # ------------------------------------------------------------------ internals
    def _dial(self) -> socket.socket:
        deadline = time.monotonic() + self._connect_timeout_s
        while True:
            try:
                sock = socket.create_connection(self.address, timeout=max(0.05, min(1.0, self._connect_timeout_s)))
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sock.settimeout(None)
                return sock
            except OSError:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.05)

    def _send(self, msg: dict) -> None:
        line = (json.dumps(msg) + "\n").encode()
        with self._lock:
            if self._closed:
                return
            try:
                self._sock.sendall(line)
            except OSError:
                pass  # the reader sees the end and reconnects (or reports the server lost)

    def _run(self) -> None:
        buf = bytearray()
        while True:
            try:
                data = self._sock.recv(65536)
            except OSError:
                data = b""
            if data:
                for msg in _lines(buf, data):
                    if msg.get("op") == "view" and isinstance(msg.get("view"), dict):
                        self._deliver(msg["view"])
                continue
            if self._closed:
                return
            buf.clear()
            try:  # the server dropped us (we were slow) or restarted its end: dial again, re-bind
                sock = self._dial()
            except OSError as e:
                if not self._closed:
                    self._on_lost(f"membership watch connection to {self.address[0]}:{self.address[1]} "
                                  f"closed and cannot be reopened ({e})")
                return
            with self._lock:
                if self._closed:
                    sock.close()
                    return
                old, self._sock = self._sock, sock
                binding, leaving = self._binding, self._leaving
            old.close()
            if binding is not None:
                self._send({"op": "bind", "rank": binding[0], "inc": binding[1]})
                if leaving:
                    self._send({"op": "leaving"})

    def _deliver(self, view: dict) -> None:
        try:
            self._on_view(view)
        except Exception:  # noqa: BLE001 - a bad record or a failing state listener must not end
            # the reader: the next record (or the store poll) brings the client up to date
            logger.exception("membership watch: handling a pushed view failed")
