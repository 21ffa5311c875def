"""Host-path dispatchers over one-sided writes: ``nixl`` (NIXL agent, UCX) and ``mooncake`` (Mooncake
TransferEngine, TCP on CPU), both behind :class:`~sglang_elastic.dispatch.base.HostDispatcher`.

Buffers. Each rank registers one buffer at start and never again (``R`` ranks, ``cap = M * min(K, S)``
rows, the most one rank sends another in one call; ``W_d`` / ``W_c`` dispatch / combine row bytes;
``B = recv_buffers``, default 2)::

    recv[dispatch]  B x R blocks of [rows area: round64(cap * W_d)][slot]   block (b, s): written by rank s only
    recv[combine]   B x R blocks of [rows area: round64(cap * W_c)][slot]
    send staging        R blocks of [rows area: the larger one][slot]         block p: what goes to rank p

about ``R * cap * (B * (W_d + W_c) + max(W_d, W_c))`` bytes in all.

Wire. A slot is int64 ``[2 + S + 4]`` = (header ``[2 + S]``, sender incarnation, n, checksum, k), where
``k`` numbers the messages of one (sender, receiver, phase) since the pair connected; message ``k``
goes to buffer ``(k - 1) % B``. The sender copies its ``n`` rows right-aligned against the end of the
rows area, the slot after them, and moves ``[rows | slot]`` with **one** one-sided WRITE into its own
block on the receiver, so the slot lands after the rows:

* NIXL: the WRITE carries a notification ``(phase, k)``, which UCX delivers once the data is in place;
  the receiver drains notifications, then reads the slot.
* Mooncake: one TCP transfer is written in order, so the receiver polls the slot's last word ``k``,
  checks the checksum (a torn slot is simply not ready yet) and resets ``k`` once it took the rows.
  For other protocols (RDMA slices may land out of order) the slot is written after the rows' write
  completed (``split_slot``).

Why B receive buffers suffice: a call waits for every peer's message, so a peer's message ``k + B``
of a phase needs our message ``k + B - 1``, which we send only when our call ``k + B - 1`` starts, after
call ``k`` took its rows. With ``B = 1`` this needs dispatch and combine to alternate (a peer's next
dispatch needs our combine); two overlapped micro-batches (dispatch a, dispatch b, combine a, ...)
need ``B = 2``. Rows returned by ``run`` are views into the receive block, valid until our next call
of the same phase.

Failures. A peer whose write fails, whose message does not arrive, or which does not take ours
before the deadline is returned in ``failed`` (and forgotten: if it comes back as a new incarnation,
the next call that names it connects afresh). Peers we still wait on are probed every
``probe_every_s`` (NIXL: a notification, which UCX fails with ``NIXL_ERR_REMOTE_DISCONNECT`` once the
peer is gone; Mooncake: ``send_probe`` in a helper thread), and a killed peer also fails our writes
at once, so a killed peer is given up on in well under a second; a frozen one at the deadline.

Membership. Metadata (agent / session, buffer address, layout) is published in the store under
``<ns>/<rank>/<incarnation>/meta`` and ``<ns>/<rank>/cur`` names the current incarnation.
``set_peers`` connects new peers and forgets departed ones (``add_remote_agent`` /
``remove_remote_agent``); nothing else is rebuilt, on any rank, and a peer that appears in a call
before ``set_peers`` named it is connected on the fly. A rank that comes back must be a new
incarnation (a new dispatcher): message numbers restart with a connection.
"""
from __future__ import annotations

import logging
import os
import pickle
import re
import threading
import time
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from ..transport.base import PeerFailure
from ..transport._common import store_wait
from .base import _HDR, _PHASE, PHASE_COMBINE, PHASE_DISPATCH, Exchange, HostDispatcher

__all__ = ["NixlHostExchange", "MooncakeHostExchange", "NixlHostDispatcher", "MooncakeHostDispatcher"]

log = logging.getLogger(__name__)

_ALIGN = 64
_M64 = (1 << 64) - 1
PROBE_EVERY_S = 0.2


def _round(n: int, a: int = _ALIGN) -> int:
    return -(-n // a) * a


def _checksum(words: Sequence[int]) -> int:
    """FNV-style 64-bit mix of ``words``, as a signed int64."""
    h = 0xCBF29CE484222325
    for v in words:
        h = ((h ^ (int(v) & _M64)) * 0x100000001B3) & _M64
    return h - (1 << 64) if h >= 1 << 63 else h


class _Malformed(Exception):
    """A complete message whose content contradicts itself (a peer of another build or a bug)."""


class _Send:
    """One outgoing WRITE: backend handle, state ('PROC', 'DONE', 'ERR')."""

    __slots__ = ("peer", "handle", "state", "thread", "error", "then")

    def __init__(self, peer: int) -> None:
        self.peer, self.handle, self.state, self.thread, self.error = peer, None, "PROC", None, None
        self.then = None  # a second write to post once this one is done (Mooncake, split slot)


class _OneSidedExchange(Exchange):
    """Layout, metadata, peers and the run loop; backends implement the ``_b_*`` hooks."""

    kind = "base"

    def __init__(self, rank: int, num_ranks: int, store, *, cap: int, widths: Dict[int, int], hdr_len: int,
                 device="cpu", connect_timeout_s: float = 60.0, ns: Optional[str] = None,
                 probe_every_s: float = PROBE_EVERY_S, recv_buffers: int = 2) -> None:
        if store is None:
            raise ValueError(f"the {self.kind} dispatcher needs a torch.distributed.Store (e.g. the orchestrator's "
                             "TCPStore)")
        self.rank, self.num_ranks, self.store = int(rank), int(num_ranks), store
        self.cap, self.hdr_len = int(cap), int(hdr_len)
        self.nbuf = int(recv_buffers)
        if self.nbuf < 1:
            raise ValueError(f"recv_buffers must be >= 1, got {recv_buffers}")
        self.widths = {int(p): int(w) for p, w in widths.items()}
        self.device = torch.device(device)
        self.connect_timeout_s = float(connect_timeout_s)
        self.probe_every_s = float(probe_every_s)
        self.ns = ns or f"dispatch/{self.kind}"
        self._closed = False
        # ---- layout (identical on every rank: same R, cap, widths, header length)
        R = self.num_ranks
        self.slot_words = self.hdr_len + 4
        self.slot_bytes = 8 * self.slot_words
        self.rows_area = {p: _round(self.cap * w) for p, w in self.widths.items()}
        self.block = {p: _round(a + self.slot_bytes) for p, a in self.rows_area.items()}
        off = 0
        self.recv_off: Dict[int, int] = {}
        for p in sorted(self.widths):
            self.recv_off[p] = off
            off += self.nbuf * R * self.block[p]
        self.stage_area = max(self.rows_area.values())
        self.stage_block = _round(self.stage_area + self.slot_bytes)
        self.stage_off = off
        off += R * self.stage_block
        self.scratch_off = off  # a few bytes peers may write to make first contact
        off += _ALIGN
        self.nbytes = off
        self.buf = torch.zeros(self.nbytes, dtype=torch.uint8)
        self.base = self.buf.data_ptr()
        self._b64 = self.buf.view(torch.int64)
        # slot of message k from rank s: _slots[phase][((k - 1) % nbuf) * R + s]
        self._slots = {p: self._b64.as_strided((self.nbuf * R, self.slot_words), (self.block[p] // 8, 1),
                                               (self.recv_off[p] + self.rows_area[p]) // 8)
                       for p in self.widths}
        # ---- peers
        self.incarnation = int(store.add(f"{self.ns}/{self.rank}/inc", 1))
        self._peer_inc: Dict[int, int] = {}
        self._peer_meta: Dict[int, dict] = {}
        self._sent: Dict[Tuple[int, int], int] = {}   # (peer, phase) -> messages sent since connect
        self._recvd: Dict[Tuple[int, int], int] = {}  # (peer, phase) -> messages taken since connect

    # ------------------------------------------------------------------ metadata
    def _layout(self) -> dict:
        return {"R": self.num_ranks, "cap": self.cap, "widths": self.widths, "hdr_len": self.hdr_len,
                "recv_buffers": self.nbuf}

    def _publish(self, extra: dict) -> None:
        meta = {"rank": self.rank, "inc": self.incarnation, "base": self.base, "nbytes": self.nbytes,
                "layout": self._layout(), **extra}
        self.store.set(f"{self.ns}/{self.rank}/{self.incarnation}/meta", pickle.dumps(meta))
        self.store.set(f"{self.ns}/{self.rank}/cur", str(self.incarnation))

    def _connect(self, peer: int, deadline: float, wait: bool) -> bool:
        """Connect ``peer``'s current incarnation (if not already); False if it has none (yet).
        ``wait=False`` (inside a call): a connected peer is taken as is, without asking the store."""
        if not wait and peer in self._peer_inc:
            return True
        key = f"{self.ns}/{peer}/cur"
        if not (store_wait(self.store, key, deadline) if wait else self.store.check([key])):
            return False
        inc = int(self.store.get(key))
        if self._peer_inc.get(peer) == inc:
            return True
        self._disconnect(peer)
        mkey = f"{self.ns}/{peer}/{inc}/meta"
        if not (store_wait(self.store, mkey, deadline) if wait else self.store.check([mkey])):
            return False
        meta = pickle.loads(self.store.get(mkey))
        if meta["layout"] != self._layout():
            raise ValueError(f"rank {peer}'s {self.kind} dispatcher has layout {meta['layout']}, this rank "
                             f"{self._layout()}: every rank needs the same num_ranks, hidden, dtype, num_topk, "
                             "max_tokens_per_rank, num_local_experts, use_fp8 and recv_buffers")
        self._b_connect(peer, meta)
        self._peer_inc[peer], self._peer_meta[peer] = inc, meta
        for ph in self.widths:
            self._sent[(peer, ph)] = 0
            self._recvd[(peer, ph)] = 0
        return True

    def _disconnect(self, peer: int) -> None:
        if peer in self._peer_inc:
            try:
                self._b_disconnect(peer)
            except Exception as exc:  # best effort
                log.debug("rank %d: %s disconnect of rank %d failed: %s", self.rank, self.kind, peer, exc)
            self._peer_inc.pop(peer, None)
            self._peer_meta.pop(peer, None)

    def set_peers(self, ranks: Sequence[int]) -> None:
        """Connect every rank in ``ranks`` (waiting up to ``connect_timeout_s`` for it to publish),
        forget the others. Not collective: nothing is rebuilt on any rank."""
        self._check_open()
        want = sorted({int(r) for r in ranks} - {self.rank})
        for r in [r for r in self._peer_inc if r not in want]:
            self._disconnect(r)
        deadline = time.monotonic() + self.connect_timeout_s
        missing = [r for r in want if not self._connect(r, deadline, wait=True)]
        if missing:
            raise PeerFailure(missing[0], f"rank(s) {missing} never created a {self.kind} dispatcher")
        self._b_peers_set(want, deadline)

    @property
    def peers(self) -> Tuple[int, ...]:
        return tuple(sorted(self._peer_inc))

    # ------------------------------------------------------------------ run
    def run(self, seq, phase, sends, row_bytes, deadline):
        self._check_open()
        if not sends:
            return {}, []
        W = self.widths.get(phase)
        if W is None or int(row_bytes) != W:
            raise ValueError(f"phase {phase} rows of {row_bytes} bytes; this exchange was built for {self.widths}")
        for p, (hdr, rows) in sends.items():
            if p == self.rank or not 0 <= p < self.num_ranks:
                raise ValueError(f"cannot exchange with rank {p}")
            if hdr.numel() != self.hdr_len or rows.dim() != 2 or rows.shape[1] != W:
                raise ValueError(f"header must be int64 [{self.hdr_len}] and rows uint8 [n, {W}], got "
                                 f"{tuple(hdr.shape)} and {tuple(rows.shape)}")
            if rows.shape[0] > self.cap:
                raise ValueError(f"{rows.shape[0]} rows for rank {p} exceed the receive buffer ({self.cap} = "
                                 "max_tokens_per_rank * min(num_topk, num_local_experts)); duplicate expert ids "
                                 "in a token's top-k?")
        start = time.monotonic()
        failed: List[int] = []
        ops: Dict[int, _Send] = {}
        for p, (hdr, rows) in sends.items():
            try:
                if not self._connect(p, deadline, wait=False):
                    failed.append(p)
                    continue
                ops[p] = self._post(p, phase, hdr, rows, W)
            except ValueError:
                raise
            except Exception as exc:
                log.info("rank %d: %s write to rank %d failed: %s", self.rank, self.kind, p, exc)
                failed.append(p)
        waiting = {p for p in ops}
        got: Dict[int, Tuple[torch.Tensor, torch.Tensor]] = {}
        next_probe = start + self.probe_every_s
        delay = 2e-5
        while True:
            progressed = self._b_progress()
            for p in sorted(waiting):
                op = ops[p]
                if op.state == "PROC":
                    op.state = self._b_poll(op)
                    progressed |= op.state != "PROC"
                if op.state == "ERR":
                    log.info("rank %d: %s write to rank %d failed: %s", self.rank, self.kind, p, op.error)
                    waiting.discard(p)
                    failed.append(p)
                    got.pop(p, None)
                    continue
                if p not in got:
                    k = self._recvd[(p, phase)] + 1
                    if self._b_arrived(p, phase, k):
                        try:
                            item = self._take(p, phase, k, W)
                        except _Malformed as exc:
                            log.warning("rank %d: malformed %s message from rank %d: %s", self.rank, self.kind, p,
                                        exc)
                            waiting.discard(p)
                            failed.append(p)
                            continue
                        if item is not None:
                            self._b_taken(p, phase, k)
                            got[p] = item
                            progressed = True
                if op.state == "DONE" and p in got:
                    waiting.discard(p)
            if not waiting:
                break
            now = time.monotonic()
            if now >= deadline:
                for p in sorted(waiting):
                    log.info("rank %d: %s gave up on rank %d after %.2fs (rows %s, our write %s)", self.rank,
                             self.kind, p, now - start, "in" if p in got else "missing", ops[p].state)
                    failed.append(p)
                    got.pop(p, None)
                waiting.clear()
                break
            if now >= next_probe:
                for p in sorted(waiting):
                    if self._b_probe(p, start) is False:
                        log.info("rank %d: %s probe of rank %d failed", self.rank, self.kind, p)
                        waiting.discard(p)
                        failed.append(p)
                        got.pop(p, None)
                next_probe = now + self.probe_every_s
                if not waiting:
                    break
            if progressed:
                delay = 2e-5
            else:
                time.sleep(delay)
                delay = min(2 * delay, 2.5e-4)
        for p in set(failed):
            op = ops.get(p)
            if op is not None and op.state == "PROC":
                # A write that cannot be cancelled (Mooncake) may still read its staging block; the
                # next message there goes to another incarnation, so a mix only reaches the lost one.
                self._b_abandon(op)
            # Forget it: if it comes back (a new incarnation), the next call that names it connects
            # afresh, with fresh message counters on both sides.
            self._disconnect(p)
        if self.device.type != "cpu":
            got = {p: (h, r.to(self.device)) for p, (h, r) in got.items()}
        return got, sorted(set(failed))

    def _post(self, p: int, phase: int, hdr: torch.Tensor, rows: torch.Tensor, W: int) -> _Send:
        n = int(rows.shape[0])
        area, sb = self.rows_area[phase], self.stage_block
        s0 = self.stage_off + p * sb
        lo = area - n * W
        if n:
            self.buf[s0 + lo:s0 + area].view(n, W).copy_(rows)
        k = self._sent[(p, phase)] + 1
        self._sent[(p, phase)] = k
        h = [int(x) for x in hdr.tolist()]
        words = h + [self.incarnation, n]
        slot = self._b64[(s0 + area) // 8:(s0 + area) // 8 + self.slot_words]
        slot.copy_(torch.tensor(words + [_checksum(words), k], dtype=torch.int64))
        length = n * W + self.slot_bytes
        blk = self._blk(k, self.rank)
        remote = self._peer_meta[p]["base"] + self.recv_off[phase] + blk * self.block[phase] + lo
        op = _Send(p)
        self._b_write(op, p, phase, k, self.base + s0 + lo, remote, length, n * W)
        return op

    def _blk(self, k: int, sender: int) -> int:
        """Receive block of message ``k`` from ``sender`` (within a phase)."""
        return ((k - 1) % self.nbuf) * self.num_ranks + sender

    def _take(self, p: int, phase: int, k: int, W: int) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
        """The rows of ``p``'s message ``k`` if its slot is complete, else None (not yet)."""
        blk = self._blk(k, p)
        slot = self._slots[phase][blk]
        words = slot.tolist()
        hdr, inc, n, check, kk = words[:self.hdr_len], words[-4], words[-3], words[-2], words[-1]
        if kk != k or inc != self._peer_inc[p] or check != _checksum(words[:-2]):
            return None
        if hdr[_PHASE] != phase or not 0 <= n <= self.cap or sum(hdr[_HDR:]) != n:
            raise _Malformed(f"phase {hdr[_PHASE]} (expected {phase}), {n} rows, counts {hdr[_HDR:]}")
        self._recvd[(p, phase)] = k
        slot[-1] = 0  # consumed
        b0 = self.recv_off[phase] + blk * self.block[phase]
        area = self.rows_area[phase]
        rows = self.buf[b0 + area - n * W:b0 + area].view(n, W)
        return torch.tensor(hdr, dtype=torch.int64), rows

    # ------------------------------------------------------------------ backend hooks
    def _b_connect(self, peer: int, meta: dict) -> None:
        pass

    def _b_disconnect(self, peer: int) -> None:
        pass

    def _b_peers_set(self, peers: List[int], deadline: float) -> None:
        pass

    def _b_write(self, op: _Send, peer: int, phase: int, k: int, local: int, remote: int, length: int,
                 rows_len: int) -> None:
        """Post the WRITE of ``length`` bytes (``rows_len`` of rows, then the slot) to ``peer``."""
        raise NotImplementedError

    def _b_poll(self, op: _Send) -> str:
        raise NotImplementedError

    def _b_abandon(self, op: _Send) -> bool:
        """Give up a write; True if it certainly no longer reads our staging buffer."""
        raise NotImplementedError

    def _b_progress(self) -> bool:
        return False

    def _b_arrived(self, peer: int, phase: int, k: int) -> bool:
        """Whether message ``k`` of ``peer`` in ``phase`` may be complete (its slot is then checked)."""
        raise NotImplementedError

    def _b_taken(self, peer: int, phase: int, k: int) -> None:
        """Message ``k`` was taken."""

    def _b_probe(self, peer: int, since: float) -> Optional[bool]:
        return None

    # ------------------------------------------------------------------ lifecycle
    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"the {self.kind} dispatcher exchange of rank {self.rank} is closed")

    def close(self) -> None:
        self._closed = True

    def __repr__(self) -> str:
        return (f"<{type(self).__name__} rank={self.rank} inc={self.incarnation} peers={list(self.peers)} "
                f"cap={self.cap} widths={self.widths} bytes={self.nbytes}>")


# ====================================================================================== NIXL
_NAME = re.compile(r"^sgld-r(\d+)-i(\d+)-")
_MAGIC = b"sgld"
_PING = b"sgld-ping"


class NixlHostExchange(_OneSidedExchange):
    """One NIXL agent (UCX) per rank; see the module docstring."""

    kind = "nixl"

    @staticmethod
    def _import():
        """NIXL's agent classes, or ImportError naming the package to install."""
        from ..transport.nixl_backend import _import_nixl

        return _import_nixl()

    def __init__(self, rank: int, num_ranks: int, store, *, backends=("UCX",), num_threads: int = 0,
                 progress_thread: bool = False, **kw) -> None:
        from ..transport.nixl_backend import make_agent

        self._import()  # a missing library is named before anything else is checked
        super().__init__(rank, num_ranks, store, **kw)
        self._name = f"sgld-r{self.rank}-i{self.incarnation}-{os.getpid()}"
        self._agent = make_agent(self._name, backends, num_threads, progress_thread)
        self._reg = self._agent.register_memory([(self.base, self.nbytes, 0, "")], "DRAM")
        self._peer_agent: Dict[int, str] = {}
        self._inbox: Dict[Tuple[int, int, int], set] = {}  # (rank, inc, phase) -> k's arrived
        self._publish({"agent": self._agent.get_agent_metadata(), "agent_name": self._name})

    def _b_connect(self, peer, meta) -> None:
        name = self._agent.add_remote_agent(meta["agent"])
        self._peer_agent[peer] = name.decode() if isinstance(name, bytes) else str(name)
        inc = meta["inc"]
        for key in [key for key in self._inbox if key[0] == peer and key[1] != inc]:
            del self._inbox[key]

    def _b_disconnect(self, peer) -> None:
        name = self._peer_agent.pop(peer, None)
        if name is not None:
            self._agent.remove_remote_agent(name)

    def _b_write(self, op, peer, phase, k, local, remote, length, rows_len) -> None:
        ag = self._agent
        ldesc = ag.get_xfer_descs([(local, length, 0)], "DRAM")
        rdesc = ag.get_xfer_descs([(remote, length, 0)], "DRAM")
        notif = _MAGIC + bytes([phase]) + k.to_bytes(8, "little")
        op.handle = ag.initialize_xfer("WRITE", ldesc, rdesc, self._peer_agent[peer], notif)
        st = ag.transfer(op.handle)
        if st == "ERR":
            op.state, op.error = "ERR", "NIXL WRITE could not be posted"
        elif st == "DONE":
            self._release(op)
            op.state = "DONE"

    def _release(self, op: _Send) -> None:
        if op.handle is not None:
            try:
                op.handle.release()
            except Exception as exc:
                log.debug("nixl release failed: %s", exc)
            op.handle = None

    def _b_poll(self, op) -> str:
        try:
            st = self._agent.check_xfer_state(op.handle)
        except Exception as exc:
            op.error = str(exc)
            st = "ERR"
        if st == "DONE":
            self._release(op)
        elif st == "ERR":
            op.error = op.error or "NIXL reported a transfer error"
            self._release(op)
        return st

    def _b_abandon(self, op) -> bool:
        if op.handle is None:
            return True
        try:
            op.handle.release()  # cancels an active transfer
            op.handle = None
            return True
        except Exception as exc:
            log.debug("nixl could not cancel a write to rank %d: %s", op.peer, exc)
            return False

    def _b_progress(self) -> bool:
        notifs = self._agent.get_new_notifs()
        new = False
        for name, msgs in notifs.items():
            if isinstance(name, bytes):
                name = name.decode(errors="replace")
            m = _NAME.match(name)
            if m is None:
                continue
            key0 = (int(m.group(1)), int(m.group(2)))
            for msg in msgs:
                msg = bytes(msg)
                if len(msg) != 13 or not msg.startswith(_MAGIC):
                    continue  # pings and strangers
                self._inbox.setdefault(key0 + (msg[4],), set()).add(int.from_bytes(msg[5:], "little"))
                new = True
        return new

    def _b_arrived(self, peer, phase, k) -> bool:
        ks = self._inbox.get((peer, self._peer_inc[peer], phase))
        return bool(ks) and k in ks

    def _b_taken(self, peer, phase, k) -> None:
        ks = self._inbox.get((peer, self._peer_inc[peer], phase))
        if ks:
            for x in [x for x in ks if x <= k]:
                ks.discard(x)

    def _b_probe(self, peer, since) -> Optional[bool]:
        name = self._peer_agent.get(peer)
        if name is None:
            return False
        try:
            self._agent.send_notif(name, _PING)
            return True
        except Exception:
            return False

    def close(self) -> None:
        if self._closed:
            return
        super().close()
        for r in list(self._peer_agent):
            try:
                self._b_disconnect(r)
            except Exception:
                pass
        try:
            self._agent.deregister_memory(self._reg)
        except Exception as exc:
            log.debug("nixl deregister failed: %s", exc)
        self._agent = None


# ====================================================================================== Mooncake
_BAD_BID = {0, (1 << 64) - 1}


class MooncakeHostExchange(_OneSidedExchange):
    """One Mooncake TransferEngine per rank (P2PHANDSHAKE; TCP on CPU); see the module docstring.

    The receiver polls its slots' last word; a write is one async batch polled without blocking.
    Over TCP one transfer lands in order, so rows and slot go in one write; with ``split_slot``
    (default for any other protocol, e.g. RDMA, whose slices may land out of order) the slot is
    written once the rows' write completed. The engine's first contact with a peer (segment
    handshake) blocks on a frozen peer, so it runs in a helper thread: at ``set_peers`` (a write to
    the peer's scratch bytes, bounded by the connect deadline) or, for a peer not contacted yet,
    around the first write of a call.
    """

    kind = "mooncake"

    @staticmethod
    def _import():
        """Mooncake's TransferEngine class, or ImportError naming the package to install."""
        from ..transport.mooncake_backend import _import_engine

        return _import_engine()

    def __init__(self, rank: int, num_ranks: int, store, *, host: str = "127.0.0.1", protocol: str = "tcp",
                 device_name: str = "", split_slot: Optional[bool] = None, **kw) -> None:
        from ..transport.mooncake_backend import _Prober

        TransferEngine = self._import()
        super().__init__(rank, num_ranks, store, **kw)
        self._te = TransferEngine()
        rc = self._te.initialize(host, "P2PHANDSHAKE", protocol, device_name)
        if rc != 0:
            raise RuntimeError(f"Mooncake TransferEngine.initialize({host!r}, 'P2PHANDSHAKE', {protocol!r}) "
                               f"returned {rc}")
        self._session = f"{host}:{self._te.get_rpc_port()}"
        rc = self._te.register_memory(self.base, self.nbytes)
        if rc != 0:
            raise RuntimeError(f"Mooncake register_memory({self.nbytes} bytes) returned {rc}")
        self._split = protocol != "tcp" if split_slot is None else bool(split_slot)
        self._contacted: set = set()
        self._prober = _Prober(self._te)
        self._publish({"session": self._session})

    def _sess(self, peer: int) -> str:
        return self._peer_meta[peer]["session"]

    def _b_peers_set(self, peers, deadline) -> None:
        threads = []
        for p in peers:
            s = self._sess(p)
            if s in self._contacted:
                continue
            op = _Send(p)
            remote = self._peer_meta[p]["base"] + self._peer_meta[p]["nbytes"] - _ALIGN
            local = self.base + self.scratch_off
            t = threading.Thread(target=self._submit, args=(op, s, local, remote, 8), daemon=True,
                                 name=f"sgld-mooncake-hello-{p}")
            t.start()
            threads.append((op, s, t))
        for op, s, t in threads:
            t.join(max(0.0, deadline - time.monotonic()))
            if t.is_alive():
                continue
            while op.state == "PROC" and time.monotonic() < deadline:
                op.state = self._b_poll(op)
                if op.state == "PROC":
                    time.sleep(1e-3)
            if op.state == "DONE":
                self._contacted.add(s)

    def _submit(self, op: _Send, session: str, local: int, remote: int, length: int) -> None:
        try:
            bid = self._te.batch_transfer_async_write(session, [local], [remote], [length])
            if bid in _BAD_BID:
                op.error, op.state = f"batch_transfer_async_write to {session} returned {bid}", "ERR"
            else:
                op.handle = bid
        except Exception as exc:
            op.error, op.state = str(exc), "ERR"

    def _b_write(self, op, peer, phase, k, local, remote, length, rows_len) -> None:
        s = self._sess(peer)
        if self._split and rows_len:
            op.then = (s, local + rows_len, remote + rows_len, length - rows_len)
            length = rows_len
        if s in self._contacted:
            self._submit(op, s, local, remote, length)
            return

        def first_contact():
            self._submit(op, s, local, remote, length)
            if op.state != "ERR":
                self._contacted.add(s)

        op.thread = threading.Thread(target=first_contact, daemon=True, name=f"sgld-mooncake-open-{peer}")
        op.thread.start()

    def _b_poll(self, op) -> str:
        if op.state != "PROC":
            return op.state
        if op.thread is not None and op.thread.is_alive():
            return "PROC"
        if op.handle is None:
            return op.state  # ERR set by the submitting thread, else not submitted yet
        st = self._te.transfer_check_status(op.handle)  # 1 done, 0 busy, -1 failed, -2 timeout (1/-1 free it)
        if st == 1:
            op.handle = None
            if op.then is not None:  # rows are in place: now the slot
                nxt, op.then = op.then, None
                self._submit(op, *nxt)
                return op.state
            return "DONE"
        if st == 0:
            return "PROC"
        if st == -1:
            op.handle = None
        op.error = f"write status {st}"
        return "ERR"

    def _b_abandon(self, op) -> bool:
        # The engine cannot cancel: a write is over only once it reported done or failed.
        return op.state != "PROC" or (op.thread is None or not op.thread.is_alive()) and op.handle is None

    def _b_arrived(self, peer, phase, k) -> bool:
        return int(self._slots[phase][self._blk(k, peer), -1]) == k

    def _b_probe(self, peer, since) -> Optional[bool]:
        meta = self._peer_meta.get(peer)
        if meta is None:
            return False
        return self._prober.ask(meta["session"], since)

    def close(self) -> None:
        if self._closed:
            return
        super().close()
        self._prober.stop()
        try:
            self._te.unregister_memory(self.base)
        except Exception:
            pass
        self._te = None


# ====================================================================================== dispatchers
class _OneSidedDispatcher(HostDispatcher):
    _exchange_cls = None

    def __init__(self, *, store, connect_timeout_s: float = 60.0, host: str = "127.0.0.1", connect: bool = True,
                 ns: Optional[str] = None, exchange_opts: Optional[dict] = None, **kw) -> None:
        self._exchange_cls._import()  # ImportError naming the package, before anything else
        if store is None:
            raise ValueError(f"the {self.kind} dispatcher needs a torch.distributed.Store (e.g. the orchestrator's "
                             "TCPStore)")
        super().__init__(None, **kw)
        opts = dict(exchange_opts or {})
        if self.kind == "mooncake":
            opts.setdefault("host", host)
        self.exchange = self._exchange_cls(
            self.rank, self.num_ranks, store, cap=self.max_tokens_per_rank * min(self.num_topk, self.num_local_experts),
            widths={PHASE_DISPATCH: self.dispatch_row_bytes, PHASE_COMBINE: self.combine_row_bytes},
            hdr_len=_HDR + self.num_local_experts, device=self.device, connect_timeout_s=connect_timeout_s, ns=ns,
            **opts)
        if connect:  # a joining rank may connect later; peers are also connected on first contact
            self.set_peers(self.state.live_ranks())

    def set_peers(self, ranks: Sequence[int]) -> None:
        """Connect ``ranks`` and forget the other peers (not collective; nothing is rebuilt)."""
        self.exchange.set_peers(ranks)

    def close(self) -> None:
        if self.exchange is not None:
            self.exchange.close()


class NixlHostDispatcher(_OneSidedDispatcher):
    """The host-path ``nixl`` dispatcher: ``store`` is a ``torch.distributed.Store`` served outside the
    ranks; ``exchange_opts`` go to :class:`NixlHostExchange` (``backends``, ``num_threads``,
    ``progress_thread``); see :class:`~sglang_elastic.dispatch.base.Dispatcher` for the rest."""

    kind = "nixl"
    _exchange_cls = NixlHostExchange


class MooncakeHostDispatcher(_OneSidedDispatcher):
    """The host-path ``mooncake`` dispatcher: ``store`` is a ``torch.distributed.Store`` served outside
    the ranks; ``host`` is the address the engine listens on; ``exchange_opts`` go to
    :class:`MooncakeHostExchange` (``protocol``, ``device_name``); see
    :class:`~sglang_elastic.dispatch.base.Dispatcher` for the rest."""

    kind = "mooncake"
    _exchange_cls = MooncakeHostExchange
