"""``nixl`` backend: one NIXL agent per rank (UCX), destinations READ source rows one-sidedly.

Agents exchange metadata through the store (``transport/nixl/<rank>/<inc>/meta``); ``set_peers``
loads new peers with ``add_remote_agent`` and drops departed ones with ``remove_remote_agent``;
nothing else is rebuilt. Registered memory is DRAM for CPU tensors and VRAM for CUDA tensors.
Control messages of the protocol (READY / RDONE / FIN / FAIL, see ``_onesided``) are NIXL
notifications; the sender's agent name carries its rank and incarnation, and every message its
execute id, so messages of a dead incarnation or an abandoned execute are never consumed.

The agent, registrations, peers and probes are a :class:`~sglang_elastic.transport.NixlEndpoint`.
Failure detection: a killed peer makes UCX fail the next transfer or notification with
``NIXL_ERR_REMOTE_DISCONNECT`` (the protocol probes peers it waits on every 0.2 s with a
notification, so this takes well under a second), and a death known to the process's
:class:`~sglang_elastic.transport.Liveness` ends the wait at the next poll; a frozen peer is caught
by the deadline.
Abandoned reads are released (NIXL cancels them) before ``PeerFailure`` is raised.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Dict, Optional, Tuple

import torch

from ._common import Local, Plan
from ._onesided import OneSidedTransport, Sync
from .nixl_endpoint import INSTALL_HINT, NixlEndpoint, import_nixl, memory_kind
from .watch import PeerUnreachable

__all__ = ["NixlTransport", "INSTALL_HINT"]


class _Inbox:
    """Notifications of this endpoint, filed by execute id; stale ones are dropped."""

    MAX_PENDING = 4096

    def __init__(self, ep: NixlEndpoint) -> None:
        self.ep = ep
        self.box: "OrderedDict[str, list]" = OrderedDict()
        self.finished: Dict[str, int] = {}

    def drain(self) -> None:
        for rank, _inc, msg in self.ep.notifications():
            parts = msg.split(b"|", 3)
            if len(parts) != 4 or parts[0] != b"sgle":
                continue
            eid = parts[1].decode()
            h, _, n = eid.rpartition(".")
            if not n.isdigit() or int(n) <= self.finished.get(h, 0):
                continue
            self.box.setdefault(eid, []).append((rank, parts[2].decode(), parts[3].decode()))
        while len(self.box) > self.MAX_PENDING:
            self.box.popitem(last=False)

    def take(self, eid: str) -> list:
        self.drain()
        return self.box.pop(eid, [])

    def finish(self, eid: str) -> None:
        h, _, n = eid.rpartition(".")
        self.finished[h] = max(self.finished.get(h, 0), int(n))
        for k in [k for k in self.box if k.rpartition(".")[0] == h and int(k.rpartition(".")[2]) <= int(n)]:
            del self.box[k]


class _NotifSync(Sync):
    def __init__(self, t: "NixlTransport", eid: str, plan: Plan) -> None:
        super().__init__(eid, t.rank, plan.participants)
        self.t = t
        self.others = [r for r in plan.participants if r != t.rank]

    def _send(self, peer: int, typ: str, payload="") -> None:
        self.t._ep.notify(peer, f"sgle|{self.eid}|{typ}|{payload}".encode())  # PeerUnreachable: it is gone

    def send_ready(self, readers, version) -> None:
        for r in readers:
            self._send(r, "R", version)

    def send_rdone(self, src) -> None:
        self._send(src, "D")

    def send_fin(self) -> None:
        for r in self.others:
            self._send(r, "F")

    def send_fail(self, blamed) -> None:
        for r in self.others:
            if r != blamed:
                try:
                    self._send(r, "X", blamed)
                except PeerUnreachable:
                    pass

    def poll(self, want_ready, want_rdone, want_fin) -> None:
        for rank, typ, payload in self.t._inbox.take(self.eid):
            if typ == "R":
                self.ready[rank] = int(payload)
            elif typ == "D":
                self.rdone.add(rank)
            elif typ == "F":
                self.fin.add(rank)
            elif typ == "X" and self.failure is None:
                self.failure = int(payload)

    def close(self, ok: bool) -> None:
        self.t._inbox.finish(self.eid)


class NixlTransport(OneSidedTransport):
    kind = "nixl"

    def __init__(self, rank: int, store, *, device="cpu", connect_timeout_s: float = 60.0,
                 host: str = "127.0.0.1", backends=("UCX",), num_threads: int = 0,
                 progress_thread: bool = False, liveness=None) -> None:
        import_nixl()  # a missing library is named before the store is touched
        super().__init__(rank, store, device=device, connect_timeout_s=connect_timeout_s, host=host,
                         liveness=liveness)
        self._ep = NixlEndpoint("sgle", self.rank, self.incarnation, backends=backends, num_threads=num_threads,
                                progress_thread=progress_thread, watch=self.watch)
        self._agent = self._ep.agent  # bench_transfer_gpu.py drives the agent directly
        self._inbox = _Inbox(self._ep)
        self._publish()

    # ---------------------------------------------------------------- metadata / registration
    def _backend_meta(self) -> dict:
        return self._ep.metadata()

    def _backend_register(self, name: str, loc: Local, old: Optional[Local]):
        i = loc.info()
        key = self._ep.register(loc.addr, loc.rows * loc.row_bytes, i["device"], i["index"])
        if old is not None:
            self._backend_unregister(name, old)
        return key

    def _backend_unregister(self, name: str, old: Local) -> None:
        self._ep.deregister(old.handle)

    def _scratch_register(self, buf: torch.Tensor):
        dev = buf.device
        return self._ep.register(buf.data_ptr(), buf.numel(), dev.type, dev.index or 0)

    def _scratch_deregister(self, handle) -> None:
        self._ep.deregister(handle)

    # ---------------------------------------------------------------- peers
    def _backend_peer_added(self, rank: int, meta: dict) -> None:
        self._ep.connect(rank, meta, meta["inc"])

    def _backend_peer_updated(self, rank: int, meta: dict) -> None:
        if self._ep.connected(rank):
            self._ep.connect(rank, meta, meta["inc"])  # reloads the peer's registrations

    def _backend_peer_removed(self, rank: int) -> None:
        self._ep.disconnect(rank)

    # ---------------------------------------------------------------- protocol hooks
    def _sync(self, eid: str, plan: Plan) -> Sync:
        return _NotifSync(self, eid, plan)

    def _post_reads(self, src: int, items) -> list:
        groups: Dict[Tuple[str, str], Tuple[list, list]] = {}
        for dst, info, row in items:
            nb = dst.numel()
            if nb == 0:
                continue
            ldev = dst.device
            key = (memory_kind(ldev.type), memory_kind(info["device"]))
            loc, rem = groups.setdefault(key, ([], []))
            loc.append((dst.data_ptr(), nb, ldev.index or 0))
            rem.append((info["addr"] + row * info["row_bytes"], nb, info["index"]))
        handles = []
        for (lmem, rmem), (loc, rem) in groups.items():
            h, st = self._ep.transfer("READ", src, loc, rem, local_mem=lmem, remote_mem=rmem)
            handles.append(h)
            if st == "ERR":
                raise RuntimeError(f"NIXL READ from rank {src} could not be posted")
        return handles

    def _poll_read(self, src: int, handle) -> str:
        return self._ep.state(handle)

    def _abandon(self, src: int, handle) -> bool:
        return self._ep.release(handle)  # NIXL cancels an active transfer here

    def _probe(self, peer: int) -> Optional[bool]:
        return self._ep.probe(peer)

    # ---------------------------------------------------------------- lifecycle
    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for buf, h in list(self._scratch.values()) + self._graveyard:
            self._scratch_deregister(h)
        super().close()
        self._ep.close()
        self._locals.clear()
        self._agent = None
