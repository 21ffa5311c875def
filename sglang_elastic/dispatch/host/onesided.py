"""The one-sided host token exchange shared by the ``nixl`` and ``mooncake`` host dispatchers:
buffer layout, wire format, peers and the run loop. The backends (:mod:`.nixl`, :mod:`.mooncake`)
move the bytes through the transport's endpoints (:class:`~sglang_elastic.transport.NixlEndpoint`,
:class:`~sglang_elastic.transport.MooncakeEndpoint`).

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

Failures. A peer known dead in the process's :class:`~sglang_elastic.transport.Liveness` (checked
on every poll; nothing is posted to it), a peer whose write fails, whose message does not arrive,
or which does not take ours before the deadline is returned in ``failed`` (and forgotten: if it comes back as a new incarnation,
the next call that names it connects afresh). Peers we still wait on are probed every
``probe_every_s`` (NIXL: a notification, which UCX fails with ``NIXL_ERR_REMOTE_DISCONNECT`` once the
peer is gone; Mooncake: ``send_probe`` in a helper thread), and a killed peer also fails our writes
at once, so a killed peer is given up on in well under a second (a failed write or probe is
recorded in the Liveness as its death); a frozen one at the deadline.

Membership. Metadata (agent / session, buffer address, layout) is published in the store through a
:class:`~sglang_elastic.transport.PeerDirectory` (``<ns>/<rank>/<incarnation>/meta``;
``<ns>/<rank>/cur`` names the current incarnation).
``set_peers`` connects new peers and forgets departed ones (``add_remote_agent`` /
``remove_remote_agent``); nothing else is rebuilt, on any rank, and a peer that appears in a call
before ``set_peers`` named it is connected on the fly. A rank that comes back must be a new
incarnation (a new dispatcher): message numbers restart with a connection.
"""
from __future__ import annotations

import logging
import time
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from ...transport import Liveness, PeerDirectory, PeerFailure, PeerWatch
from ...transport.watch import PROBE_EVERY_S
from ..base import _HDR, _PHASE, PHASE_DISPATCH, Exchange

__all__ = ["OneSidedExchange", "Send", "Malformed", "ALIGN"]

log = logging.getLogger("sglang_elastic.dispatch.host_onesided")

ALIGN = _ALIGN = 64
_M64 = (1 << 64) - 1


def _round(n: int, a: int = _ALIGN) -> int:
    return -(-n // a) * a


def _checksum(words: Sequence[int]) -> int:
    """FNV-style 64-bit mix of ``words``, as a signed int64."""
    h = 0xCBF29CE484222325
    for v in words:
        h = ((h ^ (int(v) & _M64)) * 0x100000001B3) & _M64
    return h - (1 << 64) if h >= 1 << 63 else h


class Malformed(Exception):
    """A complete message whose content contradicts itself (a peer of another build or a bug)."""


class Send:
    """One outgoing WRITE: the endpoint's handle, state ('PROC', 'DONE', 'ERR'), error text."""

    __slots__ = ("peer", "handle", "state", "error")

    def __init__(self, peer: int) -> None:
        self.peer, self.handle, self.state, self.error = peer, None, "PROC", None


class OneSidedExchange(Exchange):
    """Layout, metadata, peers and the run loop; backends implement the ``_b_*`` hooks over their
    transport endpoint (which installs its probe into ``self.watch``)."""

    kind = "base"

    def __init__(self, rank: int, num_ranks: int, store, *, cap: int, widths: Dict[int, int], hdr_len: int,
                 device="cpu", connect_timeout_s: float = 60.0, ns: Optional[str] = None,
                 probe_every_s: float = PROBE_EVERY_S, recv_buffers: int = 2,
                 liveness: Optional[Liveness] = None) -> None:
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
        self.ns = ns or f"dispatch/{self.kind}"
        # Failure knowledge: the process's Liveness (every wait reads it) plus the endpoint's probes.
        self.watch = PeerWatch(liveness, probe_every_s=probe_every_s, owner=f"{self.kind} dispatcher of rank {rank}")
        self.liveness = self.watch.liveness
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
        self.directory = PeerDirectory(store, self.ns, self.rank, self.liveness)
        self.incarnation = self.directory.incarnation
        self._peer_inc: Dict[int, int] = {}
        self._peer_meta: Dict[int, dict] = {}
        self._sent: Dict[Tuple[int, int], int] = {}   # (peer, phase) -> messages sent since connect
        self._recvd: Dict[Tuple[int, int], int] = {}  # (peer, phase) -> messages taken since connect
        self.watch.incarnation_of = lambda r: self._peer_inc.get(r)

    # ------------------------------------------------------------------ metadata
    def _layout(self) -> dict:
        return {"R": self.num_ranks, "cap": self.cap, "widths": self.widths, "hdr_len": self.hdr_len,
                "recv_buffers": self.nbuf}

    def _publish(self, extra: dict) -> None:
        meta = {"rank": self.rank, "inc": self.incarnation, "base": self.base, "nbytes": self.nbytes,
                "layout": self._layout(), **extra}
        self.directory.publish(meta)

    def _connect(self, peer: int, deadline: float, wait: bool) -> bool:
        """Connect ``peer``'s current incarnation (if not already); False if it has none (yet).
        ``wait=False`` (inside a call): a connected peer is taken as is, without asking the store."""
        if not wait and peer in self._peer_inc:
            return True
        inc = self.directory.current(peer, deadline if wait else None)
        if inc is None:
            return False
        if self._peer_inc.get(peer) == inc:
            return True
        self._disconnect(peer)
        meta = self.directory.meta(peer, inc, deadline if wait else None)
        if meta is None:
            return False
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
            except Exception as exc:  # noqa: BLE001 - best effort: forgetting a peer that may be gone
                log.debug("rank %d: %s disconnect of rank %d failed: %s", self.rank, self.kind, peer, exc)
            self._peer_inc.pop(peer, None)
            self._peer_meta.pop(peer, None)

    def set_peers(self, ranks: Sequence[int], rebuild: bool = False) -> None:
        """Connect every rank in ``ranks`` (waiting up to ``connect_timeout_s`` for it to publish),
        forget the others. Not collective, except with ``rebuild``: then every peer is forgotten
        and connected afresh, so message counters restart on both sides of every pair (every member
        must pass it at the same point; e.g. after a peer given up on was re-admitted)."""
        self._check_open()
        want = sorted({int(r) for r in ranks} - {self.rank})
        for r in [r for r in self._peer_inc if r not in want or rebuild]:
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
        w = self.watch.wait(f"{self.kind} {'dispatch' if phase == PHASE_DISPATCH else 'combine'}")
        failed: List[int] = [p for p, _ in w.failed(sorted(sends))]  # known dead: nothing is posted to them
        ops: Dict[int, Send] = {}
        for p, (hdr, rows) in sends.items():
            if p in failed:
                continue
            try:
                if not self._connect(p, deadline, wait=False):
                    failed.append(p)
                    continue
                ops[p] = self._post(p, phase, hdr, rows, W)
            except ValueError:
                raise
            except Exception as exc:  # noqa: BLE001 - the library's error types vary; the peer is given up
                log.info("rank %d: %s write to rank %d failed: %s", self.rank, self.kind, p, exc)
                self.watch.dead(p, f"a write to it failed: {exc}", self._peer_inc.get(p))
                failed.append(p)
        waiting = {p for p in ops}
        got: Dict[int, Tuple[torch.Tensor, torch.Tensor]] = {}
        while True:
            progressed = self._b_progress()
            for p in sorted(waiting):
                op = ops[p]
                if op.state == "PROC":
                    op.state = self._b_poll(op)
                    progressed |= op.state != "PROC"
                if op.state == "ERR":
                    log.info("rank %d: %s write to rank %d failed: %s", self.rank, self.kind, p, op.error)
                    self.watch.dead(p, f"a write to it failed: {op.error}", self._peer_inc.get(p))
                    waiting.discard(p)
                    failed.append(p)
                    got.pop(p, None)
                    continue
                if p not in got:
                    k = self._recvd[(p, phase)] + 1
                    if self._b_arrived(p, phase, k):
                        try:
                            item = self._take(p, phase, k, W)
                        except Malformed as exc:
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
            for p, why in w.failed(sorted(waiting)):  # known dead, or a probe failed
                log.info("rank %d: %s gives up on rank %d: %s", self.rank, self.kind, p, why)
                waiting.discard(p)
                failed.append(p)
                got.pop(p, None)
            if not waiting:
                break
            w.sleep(progressed, fast=2.5e-4, slow=2.5e-4)
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

    def _post(self, p: int, phase: int, hdr: torch.Tensor, rows: torch.Tensor, W: int) -> Send:
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
        op = Send(p)
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
            raise Malformed(f"phase {hdr[_PHASE]} (expected {phase}), {n} rows, counts {hdr[_HDR:]}")
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

    def _b_write(self, op: Send, peer: int, phase: int, k: int, local: int, remote: int, length: int,
                 rows_len: int) -> None:
        """Post the WRITE of ``length`` bytes (``rows_len`` of rows, then the slot) to ``peer``."""
        raise NotImplementedError

    def _b_poll(self, op: Send) -> str:
        raise NotImplementedError

    def _b_abandon(self, op: Send) -> bool:
        """Give up a write; True if it certainly no longer reads our staging buffer."""
        raise NotImplementedError

    def _b_progress(self) -> bool:
        return False

    def _b_arrived(self, peer: int, phase: int, k: int) -> bool:
        """Whether message ``k`` of ``peer`` in ``phase`` may be complete (its slot is then checked)."""
        raise NotImplementedError

    def _b_taken(self, peer: int, phase: int, k: int) -> None:
        """Message ``k`` was taken."""

    # ------------------------------------------------------------------ lifecycle
    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"the {self.kind} dispatcher exchange of rank {self.rank} is closed")

    def close(self) -> None:
        self._closed = True

    def __repr__(self) -> str:
        return (f"<{type(self).__name__} rank={self.rank} inc={self.incarnation} peers={list(self.peers)} "
                f"cap={self.cap} widths={self.widths} bytes={self.nbytes}>")


