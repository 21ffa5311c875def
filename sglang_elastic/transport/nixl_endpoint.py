"""One NIXL agent (UCX) of one rank: memory registration, peers, one-sided transfers, notifications
and failure detection. Used by the ``nixl`` transport (READs of expert rows) and the host-path
``nixl`` dispatcher (WRITEs of token rows).

    ep = NixlEndpoint("sgle", rank, incarnation, liveness=lv)
    key = ep.register(addr, nbytes)                       # refcounted per region
    store.set(..., pickle.dumps(ep.metadata()))           # peers connect with it
    ep.connect(peer, peer_meta, incarnation=peer_inc)
    x = ep.transfer("WRITE", peer, [(laddr, n, 0)], [(raddr, n, 0)], notif=b"...")
    while ep.state(x) == "PROC": ...                      # "DONE" | "PROC" | "ERR"
    for rank, inc, msg in ep.notifications(): ...

Agents are named ``<prefix>-r<rank>-i<incarnation>-<pid>``, so a notification names its sender's
rank and incarnation; senders of another prefix are ignored. Failure detection: a killed peer
makes UCX fail the next transfer or notification with ``NIXL_ERR_REMOTE_DISCONNECT``;
:meth:`NixlEndpoint.probe` sends a notification to find that out while waiting (``watch`` probes
the peers a wait still needs every ``probe_every_s``). What the endpoint sees is recorded in the
process's :class:`~sglang_elastic.transport.Liveness` through ``watch``.
"""
from __future__ import annotations

import logging
import os
import re
from typing import Dict, List, Optional, Sequence, Tuple

from .base import PeerFailure
from .liveness import Liveness
from .watch import PROBE_EVERY_S, PeerUnreachable, PeerWatch

__all__ = ["NixlEndpoint", "PeerUnreachable", "import_nixl", "make_agent", "memory_kind", "INSTALL_HINT"]

log = logging.getLogger("sglang_elastic.transport")

INSTALL_HINT = (
    "the nixl transport needs NIXL's Python API: pip install --no-deps nixl-cu12==1.5.1 nixl==1.5.1 "
    "(CPU hosts; numpy required) or pip install 'nixl[cu12]' / nixl-cu13 on CUDA hosts"
)

Desc = Tuple[int, int, int]  # (address, bytes, device index)


def import_nixl():
    """NIXL's ``(nixl_agent, nixl_agent_config)``, or ImportError naming the package to install."""
    try:
        from nixl._api import nixl_agent, nixl_agent_config  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - ImportError, or a backend wheel that fails to load: both mean "install"
        raise ImportError(f"{INSTALL_HINT} (import failed: {exc})") from exc
    return nixl_agent, nixl_agent_config


def make_agent(name: str, backends=("UCX",), num_threads: int = 0, progress_thread: bool = False):
    """A NIXL agent with ``backends``; clear errors when it cannot be made or has none of them.

    NIXL's progress thread spins a whole core (the Python API sets its delay to 0); our callers
    poll the agent themselves, which drives UCX progress, so it is off by default.
    """
    nixl_agent, nixl_agent_config = import_nixl()
    cfg = nixl_agent_config(enable_prog_thread=progress_thread, enable_listen_thread=False,
                            backends=list(backends), num_threads=num_threads)
    try:
        agent = nixl_agent(name, cfg)
    except Exception as exc:  # noqa: BLE001 - NIXL raises its own error types; re-raised with context
        raise RuntimeError(f"could not create a NIXL agent with backends {list(backends)}: {exc}") from exc
    if not agent.backends:
        raise RuntimeError(f"NIXL has none of the backends {list(backends)} (plugins: {agent.plugin_list})")
    return agent


def memory_kind(device_type: str) -> str:
    """NIXL's memory kind of a tensor on ``device_type``: DRAM for host memory, VRAM for cuda."""
    return "DRAM" if device_type == "cpu" else "VRAM"


class NixlEndpoint:
    """This rank's NIXL agent; see the module docstring.

    Args:
        prefix: agent name prefix shared by the endpoints that talk to each other (``"sgle"`` for
            the transport, ``"sgld"`` for the dispatcher).
        rank, incarnation: who this endpoint is (carried in its agent name).
        backends, num_threads, progress_thread: the agent's configuration.
        liveness / watch: the process's failure knowledge (a watch is made over ``liveness`` when
            none is given); the endpoint's probe is installed into it.
    """

    def __init__(self, prefix: str, rank: int, incarnation: int, *, backends=("UCX",), num_threads: int = 0,
                 progress_thread: bool = False, liveness: Optional[Liveness] = None,
                 watch: Optional[PeerWatch] = None, probe_every_s: float = PROBE_EVERY_S) -> None:
        import_nixl()  # a missing library is named before anything else
        self.prefix, self.rank, self.incarnation = prefix, int(rank), int(incarnation)
        self.name = f"{prefix}-r{self.rank}-i{self.incarnation}-{os.getpid()}"
        self._pattern = re.compile(rf"^{re.escape(prefix)}-r(\d+)-i(\d+)-")
        self._ping = f"{prefix}-ping".encode()
        self.watch = watch if watch is not None else PeerWatch(liveness, probe_every_s=probe_every_s,
                                                               owner=f"nixl endpoint of rank {self.rank}")
        if self.watch.probe is None:
            self.watch.probe = self.probe
        self.agent = make_agent(self.name, backends, num_threads, progress_thread)
        self._regions: Dict[Tuple[int, int, str, int], list] = {}  # region -> [reg descs, refcount]
        self._peers: Dict[int, str] = {}  # rank -> agent name
        self._metas: Dict[int, Tuple[dict, Optional[int]]] = {}  # rank -> (metadata, incarnation) loaded

    # ---------------------------------------------------------------- memory
    def metadata(self) -> dict:
        """What a peer needs to :meth:`connect` to this endpoint (publish it in the store)."""
        return {"agent": self.agent.get_agent_metadata(), "agent_name": self.name}

    def register(self, addr: int, nbytes: int, device: str = "cpu", index: int = 0) -> Tuple[int, int, str, int]:
        """Register ``nbytes`` at ``addr`` (refcounted per region); returns the key for :meth:`deregister`."""
        key = (int(addr), int(nbytes), device, int(index))
        if key[1] > 0:
            ent = self._regions.get(key)
            if ent is None:
                descs = self.agent.register_memory([(key[0], key[1], key[3], "")], memory_kind(device))
                self._regions[key] = [descs, 1]
            else:
                ent[1] += 1
        return key

    def deregister(self, key) -> None:
        """Drop one reference to a registered region; the last one deregisters it."""
        ent = self._regions.get(key)
        if ent is None:
            return
        ent[1] -= 1
        if ent[1] <= 0:
            del self._regions[key]
            try:
                self.agent.deregister_memory(ent[0])
            except Exception as exc:  # noqa: BLE001 - releasing only; a failure leaks a registration, logged
                log.debug("nixl deregister failed: %s", exc)

    # ---------------------------------------------------------------- peers
    def connect(self, rank: int, meta: dict, incarnation: Optional[int] = None) -> None:
        """Load ``rank``'s agent from its :meth:`metadata` (again: reloads its registrations).
        Raises :class:`~.base.PeerFailure` naming ``rank`` when NIXL cannot load it (e.g. its UCX
        worker is gone since it published): the caller's failure path decides, as for any peer."""
        try:
            name = self.agent.add_remote_agent(meta["agent"])
        except Exception as exc:  # noqa: BLE001 - NIXL_ERR_BACKEND and kin: this peer cannot be reached
            raise PeerFailure(rank, f"NIXL could not load rank {rank}'s agent {meta.get('agent_name')!r}: {exc}") from exc
        self._peers[int(rank)] = name.decode() if isinstance(name, bytes) else str(name)
        self._metas[int(rank)] = (meta, incarnation)
        self.watch.connected(rank, incarnation)

    def disconnect(self, rank: int) -> None:
        """Forget ``rank``'s agent (best effort)."""
        name = self._peers.pop(int(rank), None)
        self._metas.pop(int(rank), None)
        if name is not None:
            try:
                self.agent.remove_remote_agent(name)
            except Exception as exc:  # noqa: BLE001 - forgetting a peer that may be gone already
                log.debug("nixl remove_remote_agent(%s) failed: %s", name, exc)

    def connected(self, rank: int) -> bool:
        return int(rank) in self._peers

    @property
    def peers(self) -> Tuple[int, ...]:
        return tuple(sorted(self._peers))

    # ---------------------------------------------------------------- transfers
    def transfer(self, op: str, rank: int, local: Sequence[Desc], remote: Sequence[Desc], *, local_mem: str = "DRAM",
                 remote_mem: str = "DRAM", notif: bytes = b""):
        """Post one ``op`` ("READ" or "WRITE") between ``local`` and ``rank``'s ``remote`` descriptors;
        ``notif`` is delivered to the peer once the data is in place. Returns ``(handle, state)``
        (state "DONE", "PROC" or "ERR"); :meth:`state` polls the handle, :meth:`release` frees it."""
        ldescs = self.agent.get_xfer_descs(list(local), local_mem)
        rdescs = self.agent.get_xfer_descs(list(remote), remote_mem)
        try:
            handle = self.agent.initialize_xfer(op, ldescs, rdescs, self._peers[int(rank)], notif)
        except Exception as exc:  # noqa: BLE001 - NIXL_ERR_NOT_FOUND: see below; anything else again after a reload
            # Creating a transfer is local: NIXL refusing one for descriptors that the peer's current
            # metadata covers means this agent's copy of the peer went bad (seen in a 6-rank soak after
            # peers died: every retry failed the same way while the peer served everyone else, until
            # the updater gave up). Forget the peer's agent and load it again, once.
            log.warning("%s: NIXL refused a %s to rank %d (%s); loading its agent again", self.name, op, rank, exc)
            meta, inc = self._metas[int(rank)]
            self.disconnect(rank)
            self.connect(rank, meta, inc)
            handle = self.agent.initialize_xfer(op, ldescs, rdescs, self._peers[int(rank)], notif)
        return handle, self.agent.transfer(handle)

    def state(self, handle) -> str:
        """"DONE" (the handle is released), "PROC" or "ERR" (a transfer error: the peer is gone)."""
        try:
            st = self.agent.check_xfer_state(handle)
        except Exception as exc:  # noqa: BLE001 - NIXL raises on a disconnected peer: that is the answer "ERR"
            log.debug("nixl check_xfer_state: %s", exc)
            return "ERR"
        if st == "DONE":
            self.release(handle)
        return st

    def release(self, handle) -> bool:
        """Release a handle (NIXL cancels an active transfer here); True when it certainly no longer
        touches its buffers."""
        try:
            handle.release()
            return True
        except Exception as exc:  # noqa: BLE001 - a transfer that cannot be cancelled: the caller retires its buffer
            log.debug("nixl release failed: %s", exc)
            return False

    # ---------------------------------------------------------------- notifications
    def notify(self, rank: int, msg: bytes) -> None:
        """Send ``msg`` to ``rank``; raises :class:`PeerUnreachable` when it cannot be delivered."""
        name = self._peers.get(int(rank))
        if name is None:
            raise PeerUnreachable(rank, "not connected")
        try:
            self.agent.send_notif(name, msg)
        except Exception as exc:  # noqa: BLE001 - NIXL_ERR_REMOTE_DISCONNECT and kin: the peer is gone
            raise PeerUnreachable(rank, str(exc)) from exc

    def notifications(self) -> List[Tuple[int, int, bytes]]:
        """New notifications from endpoints of this prefix: ``(rank, incarnation, message)``."""
        out = []
        for name, msgs in self.agent.get_new_notifs().items():
            if isinstance(name, bytes):
                name = name.decode(errors="replace")
            m = self._pattern.match(name)
            if m is None:
                continue
            rank, inc = int(m.group(1)), int(m.group(2))
            out.extend((rank, inc, bytes(msg)) for msg in msgs if bytes(msg) != self._ping)
        return out

    def probe(self, rank: int, since: float = 0.0) -> Optional[bool]:
        """Non-blocking: False when ``rank`` is certainly gone (a notification to it fails)."""
        try:
            self.notify(rank, self._ping)
            return True
        except PeerUnreachable:
            return False

    # ---------------------------------------------------------------- lifecycle
    def close(self) -> None:
        """Disconnect every peer and deregister everything. Idempotent."""
        if self.agent is None:
            return
        for r in list(self._peers):
            self.disconnect(r)
        for key in list(self._regions):
            descs = self._regions.pop(key)[0]
            try:
                self.agent.deregister_memory(descs)
            except Exception as exc:  # noqa: BLE001 - closing: nothing to do about a failed release
                log.debug("nixl deregister failed: %s", exc)
        self.agent = None
