"""Byte movers with one failure contract: ``torch`` (torch.distributed), ``nixl`` (NIXL agent),
``mooncake`` (Mooncake TransferEngine). See :mod:`sglang_elastic.transport.base` and
``docs/transports.md``.

    store = torch.distributed.TCPStore(host, port, is_master=False)   # served by the orchestrator
    t = make_transport("nixl", rank, store)
    t.register("w", weights.view(rows, -1))
    t.set_peers(live_ranks)
    t.execute([Copy(src=0, dst=1, src_name="w", src_row=3, dst_name="w", dst_row=7)], timeout_s=10)
"""
from __future__ import annotations

from typing import Dict

from .base import Copy, PeerFailure, Transport, slack_s
from .liveness import Liveness

__all__ = ["Copy", "Liveness", "PeerFailure", "Transport", "make_transport", "KINDS", "slack_s"]

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
    ("127.0.0.1"; the address this rank's endpoints listen on). Backend options: nixl
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
