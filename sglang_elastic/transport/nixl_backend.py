"""``nixl`` backend: one NIXL agent per rank (UCX), destinations READ source rows one-sidedly.

Agents exchange metadata through the store (``transport/nixl/<rank>/<inc>/meta``); ``set_peers``
loads new peers with ``add_remote_agent`` and drops departed ones with ``remove_remote_agent``;
nothing else is rebuilt. Registered memory is DRAM for CPU tensors and VRAM for CUDA tensors.
Control messages of the protocol (READY / RDONE / FIN / FAIL, see ``_onesided``) are NIXL
notifications; the sender's agent name carries its rank and incarnation, and every message its
execute id, so messages of a dead incarnation or an abandoned execute are never consumed.

Failure detection: a killed peer makes UCX fail the next transfer or notification with
``NIXL_ERR_REMOTE_DISCONNECT`` (the protocol probes peers it waits on every 0.2 s with a
notification, so this takes well under a second); a frozen peer is caught by the deadline.
Abandoned reads are released (NIXL cancels them) before ``PeerFailure`` is raised.
"""
from __future__ import annotations

import os
import re
from collections import OrderedDict
from typing import Dict, Optional, Tuple

import torch

from ._common import Local, Plan, log
from ._onesided import OneSidedTransport, Sync, _PeerDown

INSTALL_HINT = (
    "the nixl transport needs NIXL's Python API: pip install --no-deps nixl-cu12==1.5.1 nixl==1.5.1 "
    "(CPU hosts; numpy required) or pip install 'nixl[cu12]' / nixl-cu13 on CUDA hosts"
)

_NAME = re.compile(r"^sgle-r(\d+)-i(\d+)-")


def _import_nixl():
    try:
        from nixl._api import nixl_agent, nixl_agent_config  # noqa: F401
    except Exception as exc:  # ImportError, or a backend wheel that fails to load
        raise ImportError(f"{INSTALL_HINT} (import failed: {exc})") from exc
    return nixl_agent, nixl_agent_config


def make_agent(name: str, backends=("UCX",), num_threads: int = 0, progress_thread: bool = False):
    """A NIXL agent with ``backends``; clear errors when it cannot be made or has none of them.

    NIXL's progress thread spins a whole core (the Python API sets its delay to 0); our callers
    poll the agent themselves, which drives UCX progress, so it is off by default.
    """
    nixl_agent, nixl_agent_config = _import_nixl()
    cfg = nixl_agent_config(enable_prog_thread=progress_thread, enable_listen_thread=False,
                            backends=list(backends), num_threads=num_threads)
    try:
        agent = nixl_agent(name, cfg)
    except Exception as exc:
        raise RuntimeError(f"could not create a NIXL agent with backends {list(backends)}: {exc}") from exc
    if not agent.backends:
        raise RuntimeError(f"NIXL has none of the backends {list(backends)} (plugins: {agent.plugin_list})")
    return agent


def _mem(info_device: str) -> str:
    return "DRAM" if info_device == "cpu" else "VRAM"


class _Inbox:
    """Notifications of this agent, filed by execute id; stale ones are dropped."""

    MAX_PENDING = 4096

    def __init__(self, agent) -> None:
        self.agent = agent
        self.box: "OrderedDict[str, list]" = OrderedDict()
        self.finished: Dict[str, int] = {}

    def drain(self) -> None:
        notifs = self.agent.get_new_notifs()
        for name, msgs in notifs.items():
            if isinstance(name, bytes):
                name = name.decode(errors="replace")
            m = _NAME.match(name)
            if m is None:
                continue
            rank = int(m.group(1))
            for msg in msgs:
                parts = bytes(msg).split(b"|", 3)
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
        name = self.t._peer_agent.get(peer)
        if name is None:
            raise _PeerDown(peer)
        try:
            self.t._agent.send_notif(name, f"sgle|{self.eid}|{typ}|{payload}".encode())
        except Exception as exc:
            raise _PeerDown(peer) from exc

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
                except _PeerDown:
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
                 progress_thread: bool = False) -> None:
        _import_nixl()  # a missing library is named before the store is touched
        super().__init__(rank, store, device=device, connect_timeout_s=connect_timeout_s, host=host)
        self._name = f"sgle-r{self.rank}-i{self.incarnation}-{os.getpid()}"
        self._agent = make_agent(self._name, backends, num_threads, progress_thread)
        self._regions: Dict[Tuple[int, int, str, int], list] = {}  # region -> [reg descs, refcount]
        self._peer_agent: Dict[int, str] = {}
        self._inbox = _Inbox(self._agent)
        self._publish()

    # ---------------------------------------------------------------- metadata / registration
    def _backend_meta(self) -> dict:
        return {"agent": self._agent.get_agent_metadata(), "agent_name": self._name}

    def _region(self, loc: Local) -> Tuple[int, int, str, int]:
        i = loc.info()
        return (loc.addr, loc.rows * loc.row_bytes, i["device"], i["index"])

    def _backend_register(self, name: str, loc: Local, old: Optional[Local]):
        key = self._region(loc)
        if key[1] > 0:
            ent = self._regions.get(key)
            if ent is None:
                descs = self._agent.register_memory([(key[0], key[1], key[3], "")], _mem(key[2]))
                self._regions[key] = [descs, 1]
            else:
                ent[1] += 1
        if old is not None:
            self._unref(self._region(old))
        return key

    def _unref(self, key) -> None:
        ent = self._regions.get(key)
        if ent is None:
            return
        ent[1] -= 1
        if ent[1] <= 0:
            del self._regions[key]
            try:
                self._agent.deregister_memory(ent[0])
            except Exception as exc:
                log.debug("nixl deregister failed: %s", exc)

    def _scratch_register(self, buf: torch.Tensor):
        dev = buf.device
        return self._agent.register_memory([(buf.data_ptr(), buf.numel(), dev.index or 0, "")], _mem(dev.type))

    def _scratch_deregister(self, handle) -> None:
        try:
            self._agent.deregister_memory(handle)
        except Exception as exc:
            log.debug("nixl scratch deregister failed: %s", exc)

    # ---------------------------------------------------------------- peers
    def _backend_peer_added(self, rank: int, meta: dict) -> None:
        name = self._agent.add_remote_agent(meta["agent"])
        self._peer_agent[rank] = name.decode() if isinstance(name, bytes) else str(name)

    def _backend_peer_updated(self, rank: int, meta: dict) -> None:
        if rank in self._peer_agent:
            self._agent.add_remote_agent(meta["agent"])  # reloads the peer's registrations

    def _backend_peer_removed(self, rank: int) -> None:
        name = self._peer_agent.pop(rank, None)
        if name is not None:
            try:
                self._agent.remove_remote_agent(name)
            except Exception as exc:
                log.debug("nixl remove_remote_agent(%s) failed: %s", name, exc)

    # ---------------------------------------------------------------- protocol hooks
    def _sync(self, eid: str, plan: Plan) -> Sync:
        return _NotifSync(self, eid, plan)

    def _post_reads(self, src: int, items) -> list:
        peer = self._peer_agent[src]
        groups: Dict[Tuple[str, str], Tuple[list, list]] = {}
        for dst, info, row in items:
            nb = dst.numel()
            if nb == 0:
                continue
            ldev = dst.device
            key = (_mem(ldev.type), _mem(info["device"]))
            loc, rem = groups.setdefault(key, ([], []))
            loc.append((dst.data_ptr(), nb, ldev.index or 0))
            rem.append((info["addr"] + row * info["row_bytes"], nb, info["index"]))
        handles = []
        for (lmem, rmem), (loc, rem) in groups.items():
            ldescs = self._agent.get_xfer_descs(loc, lmem)
            rdescs = self._agent.get_xfer_descs(rem, rmem)
            h = self._agent.initialize_xfer("READ", ldescs, rdescs, peer, b"")
            handles.append(h)
            if self._agent.transfer(h) == "ERR":
                raise RuntimeError(f"NIXL READ from rank {src} could not be posted")
        return handles

    def _poll_read(self, src: int, handle) -> str:
        st = self._agent.check_xfer_state(handle)
        if st == "DONE":
            handle.release()
        return st

    def _abandon(self, src: int, handle) -> bool:
        try:
            handle.release()  # NIXL cancels an active transfer here
            return True
        except Exception as exc:
            log.debug("nixl could not cancel a read from rank %d: %s", src, exc)
            return False

    def _probe(self, peer: int) -> Optional[bool]:
        name = self._peer_agent.get(peer)
        if name is None:
            return False
        try:
            self._agent.send_notif(name, b"sgle|ping|P|")
            return True
        except Exception:
            return False

    # ---------------------------------------------------------------- lifecycle
    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for r in list(self._peer_agent):
            self._backend_peer_removed(r)
        for buf, h in list(self._scratch.values()) + self._graveyard:
            self._scratch_deregister(h)
        super().close()
        for key in list(self._regions):
            ent = self._regions.pop(key)
            try:
                self._agent.deregister_memory(ent[0])
            except Exception:
                pass
        self._locals.clear()
        self._agent = None
