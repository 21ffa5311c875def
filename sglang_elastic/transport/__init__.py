"""Everything that moves bytes between processes, with one failure contract.

Transports (expert rows): ``torch`` (torch.distributed), ``nixl`` (NIXL agent), ``mooncake``
(Mooncake TransferEngine); see :mod:`sglang_elastic.transport.base` and ``docs/transports.md``.

    store = torch.distributed.TCPStore(host, port, is_master=False)   # served by the orchestrator
    t = make_transport("nixl", rank, store)
    t.register("w", weights.view(rows, -1))
    t.set_peers(live_ranks)
    t.execute([Copy(src=0, dst=1, src_name="w", src_row=3, dst_name="w", dst_row=7)], timeout_s=10)

Endpoints, the building blocks other byte movers (the host token exchanges of ``dispatch/``) use
so that connection set-up, registration and failure detection exist once:

* :class:`NixlEndpoint` (one NIXL agent: registration, peers, READ/WRITE, notifications, probes),
* :class:`MooncakeEndpoint` (one TransferEngine: registration, sessions, async reads/writes,
  first contact off the caller's thread, probes),
* :func:`form_group` / :class:`Group` / :class:`PairWaiter` / :class:`NcclWork` (standalone
  torch.distributed groups over a live set, waits that watch for deaths),
* :class:`PeerWatch` (the failure knowledge of one endpoint: the process's :class:`Liveness` plus
  the endpoint's own probes), :class:`PeerDirectory` (incarnations and metadata in the store) and
  :func:`store_wait` (a store key, or PeerFailure if its writer died).

Failure contract: every blocking wait on peers consults the process's :class:`Liveness` (passed as
``liveness=``) on every poll and ends with :class:`PeerFailure` naming a rank known dead; what an
endpoint sees die itself (a closed connection, a failed transfer or probe) it records there.
Timeouts remain for peers that are alive but silent.
"""
from __future__ import annotations

from typing import Dict

from .base import Copy, PeerFailure, Transport, slack_s
from .directory import PeerDirectory
from .groups import Group, NcclWork, PairWaiter, form_group, is_timeout, wait_work
from .liveness import Liveness
from .mooncake_endpoint import MooncakeEndpoint, MooncakeOp, import_mooncake
from .nixl_endpoint import NixlEndpoint, import_nixl, make_agent, memory_kind
from .store import store_wait
from .watch import PeerUnreachable, PeerWatch, WatchedWait

__all__ = ["Copy", "Liveness", "PeerFailure", "Transport", "make_transport", "KINDS", "slack_s",
           "NixlEndpoint", "import_nixl", "make_agent", "memory_kind", "MooncakeEndpoint", "MooncakeOp",
           "import_mooncake", "Group", "form_group", "PairWaiter", "NcclWork", "is_timeout", "wait_work", "PeerWatch",
           "WatchedWait", "PeerUnreachable", "store_wait", "PeerDirectory"]

KINDS = ("torch", "nixl", "mooncake")

_MODULES: Dict[str, tuple] = {
    "torch": ("torch_backend", "TorchTransport"),
    "nixl": ("nixl_backend", "NixlTransport"),
    "mooncake": ("mooncake_backend", "MooncakeTransport"),
}


def make_transport(kind: str, rank: int, store, *, device="cpu", **opts) -> Transport:
    """Create this rank's transport of ``kind`` ("torch", "nixl" or "mooncake").

    ``store`` is a ``torch.distributed.Store`` served outside the ranks (metadata exchange and
    rendezvous go through it, namespaced under ``transport/<kind>/``). Common options:
    ``connect_timeout_s`` (60; how long set_peers waits for peers to appear), ``host``
    ("127.0.0.1"; the address this rank's endpoints listen on), ``liveness`` (the process's
    :class:`Liveness`; every wait consults it, and deaths the transport sees are recorded in it;
    a private one when omitted). Backend options: nixl
    ``backends=("UCX",)``, ``num_threads``; mooncake ``protocol="tcp"``, ``device_name``.

    Raises ValueError for an unknown kind, ImportError naming the package to install when the
    backend's library is missing.
    """
    if kind not in _MODULES:
        raise ValueError(f"unknown transport kind {kind!r}; choose one of {', '.join(KINDS)}")
    import importlib

    mod_name, cls_name = _MODULES[kind]
    cls = getattr(importlib.import_module(f".{mod_name}", __name__), cls_name)
    return cls(rank, store, device=device, **opts)
