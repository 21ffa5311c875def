"""Our NIXL and Mooncake dispatchers behind SGLang's ``NixlEPDispatcher`` / ``MooncakeEPDispatcher``.

SGLang builds one dispatcher per MoE layer (two with two-batch overlap) with the constructor
``(group, router_topk, permute_fusion, num_experts, num_local_experts, hidden_size, params_dtype,
deepep_mode, async_finish, return_recv_hook)`` and calls ``dispatch(hidden_states, topk_output)``
-> ``DeepEPLLDispatchOutput`` and ``combine(combine_input) -> Tensor`` (or the ``_a``/``_b``
halves). The adapter maps that onto our contract, ``dispatch(x, topk_ids, topk_weights, layer=)``
and ``combine(expert_output, handle)``:

* SGLang's ``topk_ids`` are already *physical* slots: its top-k maps logical experts to slots, and
  with our hook there (:mod:`.routing_hook`) that mapping IS the routing rule (a live replica, the
  live mask read on the device, ``-2`` for an expert with no live replica). The adapter then hands
  the ids straight to the inner GPU dispatcher (``set_ids_routed``): no second routing pass, one
  routing launch per layer per step; the after-combine step renormalises tokens with a ``-2`` pair;
* where SGLang maps nothing (no EPLB, trivial placement, no redundant experts: ids are logical =
  physical) or the inner dispatcher is a host one, the inner dispatcher routes with an identity
  table over the ``R * S`` slots (its live mask drops and renormalises pairs on dead ranks): again
  one routing pass;
* the inner dispatcher is ours, made by name (``make_dispatcher(kind, path=...)``): the GPU kernels
  (NIXL-EP / Mooncake EP) by default, the host agents with ``--elastic-dispatch-path host``.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Dict, Optional

import torch
import torch.distributed as dist

from sglang.srt.layers.moe.token_dispatcher.base import BaseDispatcher, CombineInput
from sglang.srt.layers.moe.token_dispatcher.deepep import DeepEPLLDispatchOutput
from sglang.srt.layers.moe.utils import DeepEPMode

from ..eplb.placement import Placement
from ..state import ElasticEPStateManager as _OurManager
from . import context, options, routing_hook
from .state import add_scale_listener

__all__ = ["ElasticNixlEPDispatcher", "ElasticMooncakeEPDispatcher", "make_inner", "set_layer_id_after_init"]

log = logging.getLogger(__name__)

def make_inner(kind: str, path: str, **kw: Any):
    """Our dispatcher of ``kind`` on ``path`` (module-level so tools and tests can swap it)."""
    from ..dispatch import make_dispatcher

    return make_dispatcher(kind, path=path, **kw)


def _env_int(name: str, default: int) -> int:
    text = os.environ.get(name)
    return int(text) if text else default


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _parallel_max_ep_size() -> Optional[int]:
    try:
        from sglang.srt.runtime_context import get_parallel

        return get_parallel().max_ep_size
    except context.NOT_PUBLISHED:  # runtime not published (tools, tests)
        return None


def _global_tcp_store():
    try:
        from sglang.srt.runtime_context import get_resources

        return get_resources().tcp_store
    except context.NOT_PUBLISHED:  # runtime not published (tools, tests): the GPU dispatcher then names what it needs
        return None


class _ElasticEPDispatcher(BaseDispatcher):
    """SGLang's low-latency EP dispatcher contract over one of our dispatchers (see module docstring)."""

    kind = ""
    max_tokens_env = ""

    def __init__(self, group: "dist.ProcessGroup", router_topk: int, permute_fusion: bool = False,
                 num_experts: Optional[int] = None, num_local_experts: Optional[int] = None,
                 hidden_size: Optional[int] = None, params_dtype: Optional[torch.dtype] = None,
                 deepep_mode: DeepEPMode = DeepEPMode.LOW_LATENCY, async_finish: bool = False,
                 return_recv_hook: bool = False) -> None:
        super().__init__()
        if deepep_mode.enable_normal():
            raise NotImplementedError(f"sglang_elastic's {self.kind} dispatcher runs DeepEP's low-latency format "
                                      f"only: launch with --deepep-mode low_latency (got {deepep_mode.value})")
        if not (num_experts and num_local_experts and hidden_size):
            raise ValueError("num_experts, num_local_experts and hidden_size are required")
        self.group, self.deepep_mode = group, deepep_mode
        self.layer_id: Optional[int] = None  # set by the FusedMoE.__init__ hook (groups degraded-token counts)
        ctx = context.get()
        opts = ctx.options
        self.path = opts.elastic_dispatch_path
        self.inner_kwargs = self._inner_kwargs(group, router_topk, num_experts, num_local_experts, hidden_size,
                                               params_dtype, opts)
        self.inner = make_inner(self.kind, self.path, **self.inner_kwargs, **self._backend_kwargs(group))
        self._ids_routed: Optional[bool] = None  # decided on the first dispatch (SGLang's runtime is up then)
        # Build the routing hook's device tables now, at model construction, not in a first step that
        # a CUDA graph might be capturing (None when SGLang's metadata or our state is not there yet).
        routing_hook.routing()
        self._peers_dirty = False
        self._pending: Optional[Any] = None
        self._degraded_taken = 0  # the inner dispatcher's affected-token count at the last take
        add_scale_listener(self)
        ctx.dispatchers.add(self)

    # ------------------------------------------------------------------ construction
    def _inner_kwargs(self, group, router_topk: int, num_experts: int, num_local_experts: int, hidden_size: int,
                      params_dtype: Optional[torch.dtype], opts: options.PluginOptions) -> Dict[str, Any]:
        """Our :class:`~sglang_elastic.dispatch.base.Dispatcher` arguments from SGLang's."""
        offset = _OurManager.get_ep_join_rank_offset()
        world = dist.get_world_size(group)
        rank = dist.get_rank(group) + offset
        R = _parallel_max_ep_size() or (offset + world)
        S = int(num_local_experts)
        if num_experts > R * S:
            raise ValueError(f"{num_experts} physical experts exceed {R} ranks x {S} local experts")
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        return dict(rank=rank, num_ranks=R, num_local_experts=S, hidden=int(hidden_size), num_topk=int(router_topk),
                    max_tokens_per_rank=_env_int(self.max_tokens_env, 128),
                    placement=Placement(torch.arange(R * S).unsqueeze(0), R, R * S),
                    state=_OurManager.instance(), use_fp8=self._use_fp8(), dtype=params_dtype or torch.bfloat16,
                    device=device, timeout_s=opts.elastic_dispatch_timeout, record_load=False)

    def _backend_kwargs(self, group) -> Dict[str, Any]:
        raise NotImplementedError

    def _use_fp8(self) -> bool:
        raise NotImplementedError

    # ------------------------------------------------------------------ SGLang's contract
    def dispatch(self, hidden_states: torch.Tensor, topk_output) -> DeepEPLLDispatchOutput:
        self.dispatch_a(hidden_states, topk_output)
        return self.dispatch_b()

    def dispatch_a(self, hidden_states: torch.Tensor, topk_output) -> None:
        if self._peers_dirty:
            self._connect_new_peers()
        if self._ids_routed is None:
            self._decide_routing()
        self._pending = self.inner.dispatch(hidden_states, topk_output.topk_ids, topk_output.topk_weights, layer=0,
                                            check_inputs=False)

    def dispatch_b(self) -> DeepEPLLDispatchOutput:
        out, self._pending = self._pending, None
        if out is None:
            raise RuntimeError("dispatch_b() without dispatch_a()")
        self._handle = out.handle
        _record_low_latency(out.masked_m)
        return DeepEPLLDispatchOutput(out.hidden_states, out.hidden_states_scale, out.topk_ids, out.topk_weights,
                                      out.masked_m, out.expected_m)

    def combine(self, combine_input: CombineInput) -> torch.Tensor:
        self.combine_a(combine_input)
        return self.combine_b()

    def combine_a(self, combine_input: CombineInput) -> None:
        handle = getattr(self, "_handle", None)
        if handle is None:
            raise RuntimeError("combine() without a matching dispatch()")
        self._handle = None
        self._pending = self.inner.combine(combine_input[0], handle)

    def combine_b(self) -> torch.Tensor:
        out, self._pending = self._pending, None
        if out is None:
            raise RuntimeError("combine_b() without combine_a()")
        return out

    # ------------------------------------------------------------------ metrics
    def take_degraded_tokens(self) -> int:
        """Tokens whose pairs this adapter's calls dropped or renormalised (an expert with no live replica,
        a peer lost mid-call) since the last take. Reads the inner dispatcher's device counters, a host
        sync: for :meth:`.context.PluginContext.flush_degraded_tokens` between forward passes only."""
        now = int(self.inner.stats.affected_tokens)
        n, self._degraded_taken = now - self._degraded_taken, now
        return max(n, 0)

    # ------------------------------------------------------------------ elasticity
    def on_scale(self, from_ep_size: int, to_ep_size: int) -> None:
        """SGLang admitted ranks: connect them on the next dispatch (every rank dispatches together)."""
        self._peers_dirty = True

    def _connect_new_peers(self) -> None:
        self._peers_dirty = False
        set_peers = getattr(self.inner, "set_peers", None)
        state = _OurManager.instance()
        if set_peers is not None and state is not None:
            set_peers([r for r in state.live_ranks() if r < self.inner.num_ranks])

    def _decide_routing(self) -> None:
        """Pass ids straight through when SGLang's top-k already ran the routing rule (our hook) and the
        inner dispatcher can take routed ids; otherwise the inner one routes (identity table)."""
        set_routed = getattr(self.inner, "set_ids_routed", None)
        self._ids_routed = bool(set_routed is not None and routing_hook.maps_layers())
        if self._ids_routed:
            set_routed(True)


def _record_low_latency(masked_m: torch.Tensor) -> None:
    """Feed SGLang's expert-distribution recorder as its own low-latency dispatchers do."""
    try:
        from sglang.srt.eplb.expert_distribution import get_global_expert_distribution_recorder

        get_global_expert_distribution_recorder().on_deepep_dispatch_low_latency(masked_m)
    except context.NOT_PUBLISHED:  # no runtime (so no recorder) outside a server
        pass


class ElasticNixlEPDispatcher(_ElasticEPDispatcher):
    """``--moe-a2a-backend nixl`` on sglang_elastic (replaces SGLang's ``NixlEPDispatcher``)."""

    kind = "nixl"
    max_tokens_env = "SGLANG_NIXL_EP_NUM_MAX_DISPATCH_TOKENS_PER_RANK"

    def _backend_kwargs(self, group) -> Dict[str, Any]:
        return dict(store=_global_tcp_store())

    def _use_fp8(self) -> bool:
        return not _env_flag("SGLANG_NIXL_EP_BF16_DISPATCH")  # upstream's switch: fp8 unless asked


class ElasticMooncakeEPDispatcher(_ElasticEPDispatcher):
    """``--moe-a2a-backend mooncake`` on sglang_elastic (replaces SGLang's ``MooncakeEPDispatcher``)."""

    kind = "mooncake"
    max_tokens_env = "SGLANG_MOONCAKE_EP_NUM_MAX_DISPATCH_TOKENS_PER_RANK"

    def _backend_kwargs(self, group) -> Dict[str, Any]:
        return dict(group=group) if self.path == "gpu" else dict(store=_global_tcp_store())

    def _use_fp8(self) -> bool:
        return True  # upstream's Mooncake low-latency dispatch is fp8


def set_layer_id_after_init(result, moe_layer, *args, **kwargs) -> None:
    """AFTER hook on ``FusedMoE.__init__``: tell our dispatcher adapters which layer they serve (the
    degraded-token count adds a layer's adapters, two with two-batch overlap, before taking the max)."""
    d = getattr(moe_layer, "dispatcher", None)
    for inner in getattr(d, "_inners", None) or [d]:
        if isinstance(inner, _ElasticEPDispatcher):
            inner.layer_id = getattr(moe_layer, "layer_id", None)
