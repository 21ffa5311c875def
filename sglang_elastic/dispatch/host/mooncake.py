"""The host ``mooncake`` token exchange: one Mooncake TransferEngine per rank (P2PHANDSHAKE; TCP on
CPU), through :class:`~sglang_elastic.transport.MooncakeEndpoint`.

The receiver polls its slots' last word; a write is one async batch polled without blocking.
Over TCP one transfer lands in order, so rows and slot go in one write; with ``split_slot``
(default for any other protocol, e.g. RDMA, whose slices may land out of order) the slot is
written once the rows' write completed. The engine's first contact with a peer (segment
handshake) blocks on a frozen peer, so it runs in a helper thread: at ``set_peers`` (a write to
the peer's scratch bytes, bounded by the connect deadline) or, for a peer not contacted yet,
around the first write of a call.
"""
from __future__ import annotations

from typing import Optional

from ...transport import MooncakeEndpoint, import_mooncake
from .onesided import ALIGN, OneSidedExchange

__all__ = ["MooncakeHostExchange"]


class MooncakeHostExchange(OneSidedExchange):
    """One Mooncake TransferEngine per rank; see the module docstring and :mod:`.onesided`."""

    kind = "mooncake"

    @staticmethod
    def _import():
        """Mooncake's TransferEngine class, or ImportError naming the package to install."""
        return import_mooncake()

    def __init__(self, rank: int, num_ranks: int, store, *, host: str = "127.0.0.1", protocol: str = "tcp",
                 device_name: str = "", split_slot: Optional[bool] = None, **kw) -> None:
        self._import()
        super().__init__(rank, num_ranks, store, **kw)
        self._ep = MooncakeEndpoint(host=host, protocol=protocol, device_name=device_name, watch=self.watch)
        self._ep.register(self.base, self.nbytes)
        self._split = protocol != "tcp" if split_slot is None else bool(split_slot)
        self._publish({"session": self._ep.session})

    def _b_connect(self, peer, meta) -> None:
        self._ep.connect(peer, meta["session"], meta["inc"])

    @staticmethod
    def _scratch_of(meta: dict) -> int:
        """Address of a peer's scratch bytes (its buffer's last ALIGN bytes: first contact, flushes)."""
        return meta["base"] + meta["nbytes"] - ALIGN

    def _b_disconnect(self, peer) -> None:
        meta = self._peer_meta.get(peer)
        self._ep.disconnect(peer, flush_from=None if meta is None else self._scratch_of(meta))

    def _b_peers_set(self, peers, deadline) -> None:
        local = self.base + self.scratch_off
        hello = [(p, (local, self._scratch_of(self._peer_meta[p]), 8)) for p in peers]
        self._ep.contact(hello, deadline)

    def _b_write(self, op, peer, phase, k, local, remote, length, rows_len) -> None:
        if self._split and rows_len:  # the slot after the rows have landed
            op.handle = self._ep.post("write", peer, [(local, remote, rows_len)],
                                      then=[(local + rows_len, remote + rows_len, length - rows_len)])
        else:
            op.handle = self._ep.post("write", peer, [(local, remote, length)])

    def _b_poll(self, op) -> str:
        st = self._ep.state(op.handle)
        if st == "ERR":
            op.error = op.handle.error
        return st

    def _b_abandon(self, op) -> bool:
        return op.handle is None or self._ep.abandon(op.handle)

    def _b_arrived(self, peer, phase, k) -> bool:
        return int(self._slots[phase][self._blk(k, peer), -1]) == k

    def close(self) -> None:
        if self._closed:
            return
        super().close()
        self._ep.close()
