"""The routing rule at the one place SGLang maps logical to physical experts (its top-k step).

SGLang 0.5.23's top-k (``layers/moe/topk.py``) turns each token's logical experts into physical
slots with ``eplb.expert_location_dispatch.topk_ids_logical_to_physical(topk_ids, info)``, ``info``
being the layer's ``ExpertLocationDispatchInfo`` (``static``/``dynamic``/``fake``/``lp``); its
expert-distribution recorder then counts the physical ids it returns (``on_select_experts``), and
the token dispatcher sends them. Three hooks make that step ours:

* AFTER ``ExpertLocationDispatchInfo.init_new``: the info learns its ``layer_id``;
* REPLACE ``topk_ids_logical_to_physical``: for ``static``/``dynamic``/``fake`` (any algorithm whose
  result is just "some replica"), ONE launch of the routing rule
  (:func:`sglang_elastic.kernels.map_mask_record`) maps each pair to a replica on a live rank, reading
  the state's ``active_ranks`` on the device; a pair whose expert has no live replica gets
  :data:`~sglang_elastic.dispatch.gpu_path.DROPPED_ID` (``-2``: skipped by the EP kernels and the
  recorder like ``-1``; our dispatcher renormalises its token after combine). ``lp`` (SGLang's LP
  solver) and processes without our elastic state keep SGLang's own mapping;
* AFTER ``ExpertLocationMetadata.update``: the per-layer tables are rewritten in place.

The plugin's updater (drains included) also bumps the placement version
(:meth:`.context.PluginContext.bump_placement_version`), which calls :func:`on_placement_change`:
the tables are rewritten from SGLang's global metadata right there, never lazily in a later step
(a CUDA-graph replay runs no Python that could notice). Following the global object, not the one
the tables were built from, keeps them right after SGLang installs a new metadata object (the
scale path's ``set_global_expert_location_metadata``; slots per rank stay the same there).

SGLang's recorder counts the ids we return, so the load it records is the load the live replicas
really get. Our dispatcher adapter then passes these ids straight to the EP kernels (no second
routing pass): one routing launch per MoE layer per step.

CUDA graphs: the tables (``[L, E, X]``) and the live mask are allocated once and only written in
place, so a death (state ``active_ranks``) or an EPLB update takes effect in graph replay without
recapture. ``X`` is fixed at first use (the most replicas an expert had then, at least 4, at most
``P - E + 1``); an expert that later has more replicas routes over its first ``X`` (still correct,
slightly less spread; logged once).
"""
from __future__ import annotations

import logging
import threading
from typing import Any, Optional

import torch

from ..dispatch._kernels import kernels
from ..dispatch.gpu_path import DROPPED_ID
from ..eplb.placement import Placement
from . import context

__all__ = ["SGLangRouting", "routing", "topk_ids_logical_to_physical", "tag_layer_after_init_new",
           "refresh_after_update", "on_placement_change", "maps_layers", "MAPPED_ALGORITHMS", "TARGET"]

log = logging.getLogger(__name__)

TARGET = "sglang.srt.eplb.expert_location_dispatch.topk_ids_logical_to_physical"
MAPPED_ALGORITHMS = ("static", "dynamic", "fake")
_MIN_X = 4


def _table(meta) -> torch.Tensor:
    """``[L, E, X]`` int64: every physical slot of each logical expert (from the physical map: SGLang's
    ``logical_to_all_physical_map`` keeps only the nearest replica when an a2a backend is set)."""
    p2l = meta.physical_to_logical_map_cpu
    return Placement(p2l, int(meta.ep_size), int(meta.num_logical_experts)).log2phy


class SGLangRouting:
    """This process's routing tables for SGLang's MoE layers, on the device, written in place.

    Parameters:
        meta: SGLang's ``ExpertLocationMetadata`` (``physical_to_logical_map_cpu [L, P]``, ``ep_size``,
            ``num_logical_experts``).
        live_mask: int ``[>= ep_size]`` on the device, nonzero = alive (the state's ``active_ranks``).
        token_offset: global id of this rank's token 0, for the replica choice.
    """

    def __init__(self, meta, live_mask: torch.Tensor, token_offset: int = 0) -> None:
        full = _table(meta)
        L, E, X = full.shape
        P = int(meta.physical_to_logical_map_cpu.shape[1])
        self.slots_per_rank = P // int(meta.ep_size)
        self.x_cap = max(1, min(P - E + 1, max(_MIN_X, X)))
        self.live = live_mask
        self.token_offset = int(token_offset)
        self.table = torch.full((L, E, self.x_cap), -1, dtype=torch.int64, device=live_mask.device)
        self.layers = list(self.table.unbind(0))  # per-layer views made once: no per-call indexing
        self._meta = meta
        self._warned = False
        self.refresh(meta)

    def refresh(self, meta) -> None:
        """Rewrite the tables in place from ``meta`` (after an EPLB update; rare, so a host copy is fine)."""
        full = _table(meta)
        if full.shape[:2] != self.table.shape[:2]:
            raise ValueError(f"expert-location metadata of {full.shape[0]} layers x {full.shape[1]} experts cannot "
                             f"refresh routing tables of {self.table.shape[0]} x {self.table.shape[1]}")
        self.slots_per_rank = int(meta.physical_to_logical_map_cpu.shape[1]) // int(meta.ep_size)
        X = full.shape[2]
        if X > self.x_cap and not self._warned:
            self._warned = True
            log.warning("sglang_elastic: an expert has %d replicas; routing spreads over its first %d", X, self.x_cap)
        fresh = torch.full(self.table.shape, -1, dtype=torch.int64)
        fresh[..., :min(X, self.x_cap)] = full[..., :self.x_cap]
        self.table.copy_(fresh)
        self._meta = meta

    def map(self, topk_ids: torch.Tensor, layer: int) -> torch.Tensor:
        """Logical ``topk_ids [T, K]`` -> live physical slots (same shape and dtype), one launch."""
        if topk_ids.dim() != 2:
            return self.map(topk_ids.reshape(-1, topk_ids.shape[-1]), layer).view(topk_ids.shape)
        out = torch.empty_like(topk_ids)
        kernels.map_mask_record(topk_ids, self.layers[layer], self.live, self.slots_per_rank, self.token_offset,
                                None, out=out, dropped_id=DROPPED_ID)
        return out


_lock = threading.Lock()


def _state_live_mask() -> Optional[torch.Tensor]:
    from ..state import ElasticEPStateManager

    state = ElasticEPStateManager.instance()
    return None if state is None else state.active_ranks


def routing(meta=None) -> Optional[SGLangRouting]:
    """This process's :class:`SGLangRouting` (built on first use from SGLang's global metadata and our
    state; ``None`` when either is missing: then SGLang's own mapping runs)."""
    ctx = context.get()
    if ctx.routing is not None:
        return ctx.routing
    live = _state_live_mask()
    if live is None:
        return None
    if meta is None:
        meta = _global_meta()
    if meta is None:
        return None
    with _lock:
        if ctx.routing is None:
            ctx.routing = SGLangRouting(meta, live, _token_offset())
    return ctx.routing


def _global_meta():
    """SGLang's expert-location metadata in force, or None where no runtime published it."""
    try:
        from sglang.srt.eplb.expert_location import get_global_expert_location_metadata

        return get_global_expert_location_metadata()
    except context.NOT_PUBLISHED:
        return None


def _token_offset() -> int:
    """``ep_rank * 1024``: distinct per rank (each rank routes only its own tokens), fixed per process."""
    try:
        from sglang.srt.runtime_context import get_parallel

        return int(get_parallel().moe_ep_rank) * 1024
    except context.NOT_PUBLISHED:  # no runtime published (tools, tests): any fixed offset keeps the rule valid
        return 0


def maps_layers() -> bool:
    """True when SGLang's top-k runs our rule (the hook is queued and the dispatch algorithm is one we map),
    so a dispatcher adapter must pass ids straight through."""
    if TARGET not in context.get().registered:
        return False
    try:
        from sglang.srt.runtime_context import get_exec

        algo = get_exec().moe.ep_dispatch_algorithm
    except context.NOT_PUBLISHED:  # no runtime published: SGLang maps nothing either
        return False
    return algo in MAPPED_ALGORITHMS and _state_live_mask() is not None


@torch.compiler.disable  # SGLang calls this inside torch.compile on CUDA; a Triton launch runs eagerly
def topk_ids_logical_to_physical(topk_ids: torch.Tensor, info: Any, log2phy_prob: Optional[torch.Tensor] = None):
    """REPLACE of SGLang's function of the same name (same arguments, same result type)."""
    from sglang.srt.eplb import expert_location_dispatch as eld

    if info is None:
        return topk_ids
    layer = getattr(info, "layer_id", None)
    if info.ep_dispatch_algorithm in MAPPED_ALGORITHMS and layer is not None:
        r = routing()
        if r is not None:
            return r.map(topk_ids, layer)
    # SGLang's own mapping (its private helpers: calling the public name would call us again).
    if info.ep_dispatch_algorithm == "static":
        return eld._topk_ids_logical_to_physical_static(topk_ids, info)
    if info.ep_dispatch_algorithm in ("dynamic", "fake"):
        return eld._topk_ids_logical_to_physical_dynamic(topk_ids, info)
    if info.ep_dispatch_algorithm == "lp":
        if log2phy_prob is None:
            raise RuntimeError("ep_dispatch_algorithm='lp' but log2phy_prob is None at dispatch time")
        return eld._topk_ids_logical_to_physical_probability(topk_ids, info, log2phy_prob)
    raise NotImplementedError(f"Unknown algorithm {info.ep_dispatch_algorithm}")


def tag_layer_after_init_new(result, cls, layer_id, *args, **kwargs) -> None:
    """AFTER hook on ``ExpertLocationDispatchInfo.init_new``: the info carries its layer id."""
    if result is not None:
        result.layer_id = layer_id


def refresh_after_update(result, meta, *args, **kwargs) -> None:
    """AFTER hook on ``ExpertLocationMetadata.update``: rewrite our tables in place from the new map
    (when ``meta`` is the metadata in force or the one the tables follow)."""
    r = context.get().routing
    if r is not None and (meta is r._meta or meta is _global_meta()):
        r.refresh(meta)


def on_placement_change(ctx: "context.PluginContext | None" = None) -> None:
    """Rewrite the tables now from SGLang's metadata in force (else the one they were built on).

    Called by :meth:`.context.PluginContext.bump_placement_version`, the one place that records an
    in-place change of SGLang's metadata (the plugin's updater, drains included): CUDA-graph replays
    run no Python, so they see a change only once this ran."""
    r = (ctx or context.get()).routing
    if r is not None:
        meta = _global_meta()
        r.refresh(r._meta if meta is None else meta)
