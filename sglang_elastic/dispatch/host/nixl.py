"""The host ``nixl`` token exchange: one NIXL agent (UCX) per rank, through
:class:`~sglang_elastic.transport.NixlEndpoint`. Each message is one WRITE of ``[rows | slot]``
carrying a notification ``(phase, k)`` that UCX delivers once the data is in place; the receiver
drains notifications, then reads the slot (see :mod:`.onesided`)."""
from __future__ import annotations

from typing import Dict, Tuple

from ...transport import NixlEndpoint, import_nixl
from .onesided import OneSidedExchange, Send

__all__ = ["NixlHostExchange"]

_MAGIC = b"sgld"


class NixlHostExchange(OneSidedExchange):
    """One NIXL agent (UCX) per rank; see :mod:`.onesided` for the protocol."""

    kind = "nixl"

    @staticmethod
    def _import():
        """NIXL's agent classes, or ImportError naming the package to install."""
        return import_nixl()

    def __init__(self, rank: int, num_ranks: int, store, *, backends=("UCX",), num_threads: int = 0,
                 progress_thread: bool = False, **kw) -> None:
        self._import()  # a missing library is named before anything else is checked
        super().__init__(rank, num_ranks, store, **kw)
        self._ep = NixlEndpoint("sgld", self.rank, self.incarnation, backends=backends, num_threads=num_threads,
                                progress_thread=progress_thread, watch=self.watch)
        self._ep.register(self.base, self.nbytes)
        self._inbox: Dict[Tuple[int, int, int], set] = {}  # (rank, inc, phase) -> k's arrived
        self._publish(self._ep.metadata())

    def _b_connect(self, peer, meta) -> None:
        self._ep.connect(peer, meta, meta["inc"])
        inc = meta["inc"]
        for key in [key for key in self._inbox if key[0] == peer and key[1] != inc]:
            del self._inbox[key]

    def _b_disconnect(self, peer) -> None:
        self._ep.disconnect(peer)

    def _b_write(self, op, peer, phase, k, local, remote, length, rows_len) -> None:
        notif = _MAGIC + bytes([phase]) + k.to_bytes(8, "little")
        op.handle, st = self._ep.transfer("WRITE", peer, [(local, length, 0)], [(remote, length, 0)], notif=notif)
        if st == "ERR":
            op.state, op.error = "ERR", "NIXL WRITE could not be posted"
        elif st == "DONE":
            self._release(op)
            op.state = "DONE"

    def _release(self, op: Send) -> None:
        if op.handle is not None:
            self._ep.release(op.handle)
            op.handle = None

    def _b_poll(self, op) -> str:
        st = self._ep.state(op.handle)  # releases the handle when DONE
        if st == "DONE":
            op.handle = None
        elif st == "ERR":
            op.error = op.error or "NIXL reported a transfer error"
            self._release(op)
        return st

    def _b_abandon(self, op) -> bool:
        if op.handle is None:
            return True
        ok = self._ep.release(op.handle)  # cancels an active transfer
        if ok:
            op.handle = None
        return ok

    def _b_progress(self) -> bool:
        new = False
        for rank, inc, msg in self._ep.notifications():
            if len(msg) != 13 or not msg.startswith(_MAGIC):
                continue  # strangers
            self._inbox.setdefault((rank, inc, msg[4]), set()).add(int.from_bytes(msg[5:], "little"))
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

    def close(self) -> None:
        if self._closed:
            return
        super().close()
        self._ep.close()
