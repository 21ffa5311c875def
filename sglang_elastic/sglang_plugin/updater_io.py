"""What the updater adapter (:mod:`.updater`) reads from and writes into SGLang: the transport and
store on SGLang's TCPStore, and the metadata rows of what was applied."""
from __future__ import annotations

import torch

from ..eplb.placement import Placement
from . import context
from . import options

__all__ = ["transport_kind", "default_transport", "default_store", "patch_metadata_row"]


def transport_kind(opts: options.PluginOptions) -> str:
    """``--elastic-transfer-backend``, with ``auto`` following ``--elastic-ep-backend``."""
    if opts.elastic_transfer_backend != "auto":
        return opts.elastic_transfer_backend
    try:
        from sglang.srt.runtime_context import get_exec

        backend = get_exec().moe.elastic_ep_backend
    except context.NOT_PUBLISHED:  # no runtime context published (a tool, a test): no elastic backend to follow
        backend = None
    return backend if backend in ("nixl", "mooncake") else "torch"


def default_transport(rank: int, device: torch.device):
    """Our transport on SGLang's global TCPStore (kind from the flags)."""
    from sglang.srt.distributed.utils import get_global_tcp_store

    from ..transport import make_transport

    store = get_global_tcp_store()
    if store is None:
        raise RuntimeError("sglang_elastic's expert-weight transport needs SGLang's global TCPStore "
                           "(set by init_distributed_environment)")
    ctx = context.get()
    return make_transport(transport_kind(ctx.options), rank, store, device=device, liveness=ctx.liveness)


def default_store():
    """SGLang's global TCPStore (the background updaters' ready marks)."""
    from sglang.srt.distributed.utils import get_global_tcp_store

    return get_global_tcp_store()


def patch_metadata_row(meta, layer: int, placement: Placement, rank: int) -> None:
    """Write what was applied to ``layer`` into SGLang's metadata (every map SGLang routes with)."""
    p2l, log2phy, cnt = placement.to_sglang()
    X = meta.logical_to_all_physical_map.shape[-1]
    row = torch.full((log2phy.shape[1], X), -1, dtype=meta.logical_to_all_physical_map.dtype)
    row[:, : log2phy.shape[2]] = log2phy[0]
    meta.physical_to_logical_map[layer] = p2l[0].to(meta.physical_to_logical_map)
    meta.physical_to_logical_map_cpu[layer] = p2l[0]
    meta.logical_to_all_physical_map[layer] = row.to(meta.logical_to_all_physical_map.device)
    meta.logical_to_all_physical_map_cpu[layer] = row
    meta.logical_to_all_physical_map_num_valid[layer] = cnt[0].to(meta.logical_to_all_physical_map_num_valid)
    if meta.logical_to_rank_dispatch_physical_map is not None:
        S = placement.slots_per_rank
        first = log2phy[0, :, 0]
        local = torch.where((log2phy[0] // S == rank) & (log2phy[0] >= 0), log2phy[0], torch.full_like(log2phy[0], -1))
        pick = torch.where(local.max(-1).values >= 0, local.max(-1).values, first)
        meta.logical_to_rank_dispatch_physical_map[layer] = pick.to(meta.logical_to_rank_dispatch_physical_map)
