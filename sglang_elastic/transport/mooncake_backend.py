"""``mooncake`` backend: Mooncake ``TransferEngine`` (TCP on CPU, RDMA where present); destinations
READ source rows one-sidedly.

Each rank runs one engine in ``P2PHANDSHAKE`` mode and publishes its session id
(``host:rpc_port``) and buffer addresses in the store; a restarted rank gets a new port, so a new
session id, and its predecessor's is never used again. Control messages of the protocol (READY /
RDONE / FIN / FAIL, see ``_onesided``) are store keys under ``transport/mooncake/x/<eid>/``,
deleted once every participant is through.

Failure detection: reads are posted as small async batches and polled without blocking
(``transfer_check_status``); a killed peer fails them within milliseconds, and a background
prober (``send_probe``, which needs the peer's RPC thread) reports an unreachable peer that we
are only waiting on. A frozen peer is caught by the deadline. The engine cannot cancel a read,
so after a timeout the scratch area it targets is retired, never reused.

The engine's first contact with a peer (segment handshake) blocks if the peer is frozen, so that
first contact runs in a helper thread and is bounded by the execute deadline like everything else.
"""
from __future__ import annotations

import queue
import threading
import time
from typing import Dict, List, Optional, Tuple

import torch

from ._common import Local, Plan, log
from ._onesided import OneSidedTransport, Sync

INSTALL_HINT = (
    "the mooncake transport needs Mooncake's TransferEngine: pip install mooncake-transfer-engine-non-cuda "
    "(CPU) or mooncake-transfer-engine (CUDA); it loads libibverbs.so.1 even for TCP: "
    "apt-get install -y libibverbs1 librdmacm1 libnuma1"
)

_BAD_BID = {0, (1 << 64) - 1}


def _import_engine():
    try:
        from mooncake.engine import TransferEngine
    except Exception as exc:
        raise ImportError(f"{INSTALL_HINT} (import failed: {exc})") from exc
    return TransferEngine


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


class _Read:
    """Async reads from one source: batch ids, posted by the caller or by a first-contact thread."""

    def __init__(self) -> None:
        self.bids: Optional[List[int]] = None
        self.done: List[bool] = []
        self.error: Optional[str] = None
        self.thread: Optional[threading.Thread] = None


class _Prober:
    """Background liveness probes (``send_probe`` blocks on a frozen peer, so never on the caller)."""

    def __init__(self, te) -> None:
        self.te = te
        self.q: "queue.Queue[Optional[str]]" = queue.Queue()
        self.pending = set()
        self.result: Dict[str, Tuple[float, bool]] = {}
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._loop, name="sgle-mooncake-prober", daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while True:
            s = self.q.get()
            if s is None:
                return
            try:
                ok = self.te.send_probe(s) == 0
            except Exception:
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


class MooncakeTransport(OneSidedTransport):
    kind = "mooncake"

    def __init__(self, rank: int, store, *, device="cpu", connect_timeout_s: float = 60.0,
                 host: str = "127.0.0.1", protocol: str = "tcp", device_name: str = "") -> None:
        TransferEngine = _import_engine()
        super().__init__(rank, store, device=device, connect_timeout_s=connect_timeout_s, host=host)
        self._te = TransferEngine()
        rc = self._te.initialize(host, "P2PHANDSHAKE", protocol, device_name)
        if rc != 0:
            raise RuntimeError(f"Mooncake TransferEngine.initialize({host!r}, 'P2PHANDSHAKE', {protocol!r}) returned {rc}")
        self._session = f"{host}:{self._te.get_rpc_port()}"
        self._regions: Dict[Tuple[int, int], int] = {}  # (addr, nbytes) -> refcount
        self._contacted: set = set()
        self._prober = _Prober(self._te)
        self._since: Dict[int, float] = {}
        self._publish()

    # ---------------------------------------------------------------- metadata / registration
    def _backend_meta(self) -> dict:
        return {"session": self._session}

    def _reg(self, addr: int, nbytes: int) -> None:
        n = self._regions.get((addr, nbytes), 0)
        if n == 0:
            rc = self._te.register_memory(addr, nbytes)
            if rc != 0:
                raise RuntimeError(f"Mooncake register_memory({addr:#x}, {nbytes}) returned {rc}")
        self._regions[(addr, nbytes)] = n + 1

    def _unreg(self, addr: int, nbytes: int) -> None:
        n = self._regions.get((addr, nbytes), 0)
        if n <= 1:
            self._regions.pop((addr, nbytes), None)
            if n == 1:
                self._te.unregister_memory(addr)
        else:
            self._regions[(addr, nbytes)] = n - 1

    def _backend_register(self, name: str, loc: Local, old: Optional[Local]):
        nbytes = loc.rows * loc.row_bytes
        if nbytes > 0:
            self._reg(loc.addr, nbytes)
        if old is not None and old.rows * old.row_bytes > 0:
            self._unreg(old.addr, old.rows * old.row_bytes)
        return None

    def _scratch_register(self, buf: torch.Tensor):
        self._reg(buf.data_ptr(), buf.numel())
        return (buf.data_ptr(), buf.numel())

    def _scratch_deregister(self, handle) -> None:
        self._unreg(*handle)

    # ---------------------------------------------------------------- protocol hooks
    def _sync(self, eid: str, plan: Plan) -> Sync:
        self._exec_start = time.monotonic()
        return _StoreSync(self, eid, plan)

    def _post_reads(self, src: int, items) -> list:
        session = self._peer_meta[src]["session"]
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
        if not reqs:
            return []
        rd = _Read()
        if session in self._contacted:
            self._submit(rd, session, reqs)
        else:
            def first_contact():
                self._submit(rd, session, reqs)
                if rd.error is None:
                    self._contacted.add(session)
            rd.thread = threading.Thread(target=first_contact, name=f"sgle-mooncake-open-{src}", daemon=True)
            rd.thread.start()
        return [rd]

    def _submit(self, rd: _Read, session: str, reqs) -> None:
        bids = []
        try:
            for loc, rem, nb in reqs:
                bid = self._te.batch_transfer_async_read(session, [loc], [rem], [nb])
                if bid in _BAD_BID:
                    rd.error = f"batch_transfer_async_read to {session} returned {bid}"
                    break
                bids.append(bid)
        except Exception as exc:
            rd.error = str(exc)
        rd.done = [False] * len(bids)
        rd.bids = bids

    def _poll_read(self, src: int, rd: _Read) -> str:
        if rd.thread is not None and rd.thread.is_alive():
            return "PROC"
        if rd.bids is None:
            return "PROC"
        all_done = True
        for i, bid in enumerate(rd.bids):
            if rd.done[i]:
                continue
            st = self._te.transfer_check_status(bid)  # 1 done (freed), 0 busy, -1 failed (freed), -2 timeout
            if st == 1:
                rd.done[i] = True
            elif st == 0:
                all_done = False
            else:
                if st == -1:
                    rd.done[i] = True
                rd.error = rd.error or f"read status {st}"
        if rd.error is not None:
            return "ERR"
        return "DONE" if all_done else "PROC"

    def _abandon(self, src: int, rd: _Read) -> bool:
        # The engine has no cancel: a read is only certainly over once it reported DONE or failed.
        if rd.thread is not None and rd.thread.is_alive():
            return False
        return rd.bids is not None and all(rd.done)

    def _probe(self, peer: int) -> Optional[bool]:
        meta = self._peer_meta.get(peer)
        if meta is None:
            return False
        return self._prober.ask(meta["session"], getattr(self, "_exec_start", 0.0))

    # ---------------------------------------------------------------- lifecycle
    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._prober.stop()
        super().close()
        for addr, nbytes in list(self._regions):
            try:
                self._te.unregister_memory(addr)
            except Exception:
                pass
        self._regions.clear()
        self._locals.clear()
        self._te = None
