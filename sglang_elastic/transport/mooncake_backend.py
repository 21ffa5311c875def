"""``mooncake`` backend: Mooncake ``TransferEngine`` (TCP on CPU, RDMA where present); destinations
READ source rows one-sidedly.

Each rank runs one engine in ``P2PHANDSHAKE`` mode and publishes its session id
(``host:rpc_port``) and buffer addresses in the store; a restarted rank gets a new port, so a new
session id, and its predecessor's is never used again. Control messages of the protocol (READY /
RDONE / FIN / FAIL, see ``_onesided``) are store keys under ``transport/mooncake/x/<eid>/``,
deleted once every participant is through.

The engine, registrations, async transfers and probes are a
:class:`~sglang_elastic.transport.MooncakeEndpoint`. Failure detection: a death known to the
process's :class:`~sglang_elastic.transport.Liveness` ends a wait at its next poll; reads are posted as small async batches and polled without blocking
(``transfer_check_status``); a killed peer fails them within milliseconds, and a background
prober (``send_probe``, which needs the peer's RPC thread) reports an unreachable peer that we
are only waiting on. A frozen peer is caught by the deadline. The engine cannot cancel a read,
so after a timeout the scratch area it targets is retired, never reused.

The engine's first contact with a peer (segment handshake) blocks if the peer is frozen, so that
first contact runs in a helper thread and is bounded by the execute deadline like everything else.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch

from ._common import Local, Plan, log
from ._onesided import OneSidedTransport, Sync
from .mooncake_endpoint import INSTALL_HINT, MooncakeEndpoint, import_mooncake

__all__ = ["MooncakeTransport", "INSTALL_HINT"]


class _StoreSync(Sync):
    def __init__(self, t: "MooncakeTransport", eid: str, plan: Plan) -> None:
        super().__init__(eid, t.rank, plan.participants)
        self.store = t.store
        self.k = f"{t.ns}/x/{eid}"
        self.n = len(plan.participants)
        self.others = [r for r in plan.participants if r != t.rank]
        self.mine: List[str] = []

    def _set(self, key: str, value: str) -> None:
        self.store.set(key, value)
        self.mine.append(key)

    def send_ready(self, readers, version) -> None:
        if readers:
            self._set(f"{self.k}/ready/{self.me}", str(version))

    def send_rdone(self, src) -> None:
        self._set(f"{self.k}/rdone/{src}/{self.me}", "1")

    def send_fin(self) -> None:
        self._set(f"{self.k}/fin/{self.me}", "1")
        self.store.add(f"{self.k}/finc", 1)

    def send_fail(self, blamed) -> None:
        self.store.set(f"{self.k}/fail", str(blamed))

    def poll(self, want_ready, want_rdone, want_fin) -> None:
        st, k = self.store, self.k
        if self.failure is None and st.check([f"{k}/fail"]):
            self.failure = int(st.get(f"{k}/fail"))
        for s in want_ready:
            key = f"{k}/ready/{s}"
            if st.check([key]):
                self.ready[s] = int(st.get(key))
        for d in want_rdone:
            if st.check([f"{k}/rdone/{self.me}/{d}"]):
                self.rdone.add(d)
        if want_fin and int(st.add(f"{k}/finc", 0)) >= self.n:
            self.fin = set(self.others)

    def missing_fin(self, others) -> set:
        return {r for r in others if r not in self.fin and not self.store.check([f"{self.k}/fin/{r}"])}

    def close(self, ok: bool) -> None:
        try:
            if not ok:
                return  # a failed execute leaves a few keys behind; nobody reads them again
            for key in self.mine:
                self.store.delete_key(key)
            if int(self.store.add(f"{self.k}/left", 1)) >= self.n:
                for key in (f"{self.k}/finc", f"{self.k}/fail", f"{self.k}/left"):
                    self.store.delete_key(key)
        except Exception as exc:  # cleanup only
            log.debug("mooncake sync cleanup failed: %s", exc)


class MooncakeTransport(OneSidedTransport):
    kind = "mooncake"

    def __init__(self, rank: int, store, *, device="cpu", connect_timeout_s: float = 60.0,
                 host: str = "127.0.0.1", protocol: str = "tcp", device_name: str = "", liveness=None) -> None:
        import_mooncake()  # a missing library is named before the store is touched
        super().__init__(rank, store, device=device, connect_timeout_s=connect_timeout_s, host=host,
                         liveness=liveness)
        self._ep = MooncakeEndpoint(host=host, protocol=protocol, device_name=device_name, watch=self.watch)
        self._publish()

    # ---------------------------------------------------------------- metadata / registration
    def _backend_meta(self) -> dict:
        return {"session": self._ep.session}

    def _backend_register(self, name: str, loc: Local, old: Optional[Local]):
        nbytes = loc.rows * loc.row_bytes
        if nbytes > 0:
            self._ep.register(loc.addr, nbytes)
        if old is not None:
            self._backend_unregister(name, old)
        return None

    def _backend_unregister(self, name: str, old: Local) -> None:
        if old.rows * old.row_bytes > 0:
            self._ep.unregister(old.addr, old.rows * old.row_bytes)

    def _scratch_register(self, buf: torch.Tensor):
        self._ep.register(buf.data_ptr(), buf.numel())
        return (buf.data_ptr(), buf.numel())

    def _scratch_deregister(self, handle) -> None:
        self._ep.unregister(*handle)

    # ---------------------------------------------------------------- peers
    def _backend_peer_added(self, rank: int, meta: dict) -> None:
        self._ep.connect(rank, meta["session"], meta["inc"])

    def _backend_peer_removed(self, rank: int) -> None:
        meta = self._peer_meta.get(rank) or {}
        # A host tensor of the peer: the flush reads 8 bytes of it (no device memory over TCP).
        some = [t["addr"] for t in meta.get("tensors", {}).values()
                if t.get("device") == "cpu" and t["rows"] * t["row_bytes"] >= 8]
        self._ep.disconnect(rank, flush_from=some[0] if some else None)

    # ---------------------------------------------------------------- protocol hooks
    def _sync(self, eid: str, plan: Plan) -> Sync:
        return _StoreSync(self, eid, plan)

    def _post_reads(self, src: int, items) -> list:
        reqs: List[Tuple[int, int, int]] = []  # (local, remote, nbytes), merged where contiguous
        for dst, info, row in sorted(items, key=lambda it: it[1]["addr"] + it[2] * it[1]["row_bytes"]):
            nb = dst.numel()
            if nb == 0:
                continue
            loc, rem = dst.data_ptr(), info["addr"] + row * info["row_bytes"]
            if reqs and reqs[-1][0] + reqs[-1][2] == loc and reqs[-1][1] + reqs[-1][2] == rem:
                reqs[-1] = (reqs[-1][0], reqs[-1][1], reqs[-1][2] + nb)
            else:
                reqs.append((loc, rem, nb))
        return [self._ep.post("read", src, reqs)] if reqs else []

    def _poll_read(self, src: int, op) -> str:
        return self._ep.state(op)

    def _abandon(self, src: int, op) -> bool:
        return self._ep.abandon(op)

    # ---------------------------------------------------------------- lifecycle
    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        super().close()
        self._ep.close()
        self._locals.clear()
