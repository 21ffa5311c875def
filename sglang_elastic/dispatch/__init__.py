"""Token dispatchers with failure masking: route logical experts to live physical slots, move tokens
to their experts' ranks in SGLang's DeepEP low-latency layout, and combine the results.

    d = make_dispatcher("torch", rank=r, num_ranks=R, num_local_experts=S, hidden=H, num_topk=K,
                        max_tokens_per_rank=M, placement=placement, store=store)
    out = d.dispatch(x, topk_ids, topk_weights, layer=l)
    y = experts(out.hidden_states, out.masked_m)
    x = d.combine(y, out.handle)

Backends: ``torch`` (gloo / NCCL), ``nixl`` (host: NIXL agent one-sided writes; GPU: ``nixl_ep``),
``mooncake`` (host: Mooncake TransferEngine; GPU: Mooncake EP). See ``docs/dispatch.md``.
"""
from __future__ import annotations

import importlib
from typing import Dict, Tuple

from .base import DispatchHandle, DispatchOutput, DispatchStats, Dispatcher, HostDispatcher
from .routing import POLICIES, RoutingTable, Routed, route

__all__ = ["DispatchHandle", "DispatchOutput", "DispatchStats", "Dispatcher", "HostDispatcher", "POLICIES",
           "RoutingTable", "Routed", "route", "make_dispatcher", "KINDS"]

KINDS = ("torch", "nixl", "mooncake")

# (kind, path) -> (module, class); path "host" moves tokens through host-side agents (CPU or GPU
# memory), "gpu" wraps the GPU-initiated EP kernels (nixl_ep, Mooncake EP).
_IMPL: Dict[Tuple[str, str], Tuple[str, str]] = {
    ("torch", "host"): ("torch_a2a", "TorchDispatcher"),
    ("torch", "gpu"): ("torch_a2a", "TorchDispatcher"),
    ("nixl", "host"): ("host_onesided", "NixlHostDispatcher"),
    ("mooncake", "host"): ("host_onesided", "MooncakeHostDispatcher"),
    ("nixl", "gpu"): ("nixl_ep", "NixlEPDispatcher"),
    ("mooncake", "gpu"): ("mooncake_ep", "MooncakeEPDispatcher"),
}


def make_dispatcher(kind: str, *, path: str = "auto", **kw) -> Dispatcher:
    """Create this rank's dispatcher of ``kind`` ("torch", "nixl" or "mooncake").

    ``path`` is "host", "gpu" or "auto" (gpu when ``device`` is cuda, else host). Keyword
    arguments are :class:`Dispatcher`'s plus the backend's (``store`` for every host backend;
    ``group``/``buffer`` options for the GPU ones). Raises ValueError for an unknown kind or path,
    ImportError naming the package to install when the backend's library is missing.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown dispatcher kind {kind!r}; choose one of {', '.join(KINDS)}")
    if path == "auto":
        import torch

        path = "gpu" if torch.device(kw.get("device", "cpu")).type == "cuda" else "host"
    if path not in ("host", "gpu"):
        raise ValueError(f"unknown dispatcher path {path!r}; choose host, gpu or auto")
    mod, cls = _IMPL[(kind, path)]
    return getattr(importlib.import_module(f".{mod}", __name__), cls)(**kw)
