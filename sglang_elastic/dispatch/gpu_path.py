"""What the GPU-path dispatchers (nixl_ep, Mooncake EP) share: routing and failure accounting on the device.

Per call, with no host synchronisation:

* **routing**: one launch of the routing rule (:func:`sglang_elastic.kernels.route_renormalize`:
  logical -> live physical slot, load record, ``renormalize`` policy, per-call and cumulative counts,
  and the slots in the EP kernels' id dtype), or none at all when the caller hands over ids that
  the rule already mapped (:meth:`GPUPathMixin.set_ids_routed`, the SGLang hook's case);
* **after combine**: one launch (:func:`sglang_elastic.kernels.after_combine`) that rescales the
  tokens that lost a pair to a peer the EP kernels gave up on during the call (and, for pre-routed
  ids, the pairs the rule marked :data:`DROPPED_ID`), counts them, and clears ``active_ranks`` of
  peers the EP library masked. Its programs exit after reading the slots when nothing was lost.

The live mask is the :class:`~sglang_elastic.state.ElasticEPState`'s ``active_ranks`` itself (a view,
only ever written in place), so a death recorded in the state reaches the next call, CUDA-graph
replays included, without a rebuild.
"""
from __future__ import annotations

import inspect
import logging
import threading
import weakref
from typing import Any, Callable, Dict, Optional, Tuple

import torch

from .base import Dispatcher, DispatchStats
from ._kernels import kernels
from .routing import Routed

__all__ = ["GPUPathMixin", "KERNEL_BACKENDS", "DROPPED_ID", "check_gpu_device", "prepare_gpu_kwargs", "link_liveness"]

log = logging.getLogger(__name__)

KERNEL_BACKENDS = ("auto", "triton", "torch")
# Slot id the routing rule writes (in pre-routed ids) for a pair whose expert has no live replica:
# EP kernels skip every negative id like -1 (unused), and after combine the token is renormalised.
DROPPED_ID = -2

# Cumulative device counters: affected tokens, rerouted pairs, dropped pairs, lost pairs.
_AFF, _REROUTED, _DROPPED, _LOST = 0, 1, 2, 3
_N_STATS = 4


def check_gpu_device(device: torch.device, what: str) -> None:
    """The GPU-path dispatchers run on CUDA only (tests replace this to drive them with fakes on CPU)."""
    if device.type != "cuda":
        raise ValueError(f"the {what} dispatcher runs on the GPU: pass device='cuda' (got {device}); "
                         "use path='host' for CPU tokens")


# Whether the Dispatcher base takes liveness= itself (else the GPU dispatchers keep it to themselves).
_BASE_TAKES_LIVENESS = "liveness" in inspect.signature(Dispatcher.__init__).parameters


def prepare_gpu_kwargs(kw: Dict[str, Any], what: str, check: Callable[[torch.device, str], None]) -> Any:
    """The GPU dispatchers' shared constructor preamble, in place on ``kw``: ``check(device, what)``,
    the CUDA device pinned to the current index, bf16 (the only dtype allowed); returns ``liveness=`` (or None)."""
    device = torch.device(kw.get("device", "cuda"))
    check(device, what)
    liveness = kw.get("liveness") if _BASE_TAKES_LIVENESS else kw.pop("liveness", None)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    kw["device"] = device
    kw.setdefault("dtype", torch.bfloat16)
    if kw["dtype"] != torch.bfloat16:  # both libraries' low-latency kernels take bf16 (fp8 via use_fp8)
        lib = {"nixl": "nixl_ep", "mooncake": "Mooncake EP"}.get(what, what)
        raise ValueError(f"{lib} dispatches bfloat16 tokens (use_fp8 for fp8), got dtype {kw['dtype']}")
    return liveness


_link_lock = threading.Lock()
_LINKED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # Liveness -> WeakSet of states


def link_liveness(liveness: Any, state: Any) -> None:
    """Record ``liveness``'s deaths in ``state`` (``mark_failed``), once per pair whatever the number of
    dispatchers (SGLang builds one per MoE layer); both are held weakly. The state then reaches the
    device: ``active_ranks`` in place, and nixl_ep's mask through :meth:`.nixl_ep_buffer.SharedBuffer.watch`."""
    if liveness is None:
        return
    with _link_lock:
        states = _LINKED.setdefault(liveness, weakref.WeakSet())
        if state in states:
            return
        states.add(state)
    ref = weakref.ref(state)

    def on_death(rank: int, reason: str) -> None:
        st = ref()
        if st is not None and 0 <= int(rank) < st.ep_size and st.is_alive(rank):
            st.mark_failed([int(rank)], reason=f"liveness: {reason}")

    liveness.add_listener(on_death)


def _triton_usable(device: torch.device) -> bool:
    """Triton imports and can run here (a CUDA device, or the interpreter)."""
    return kernels.triton_available() and (kernels._interpret() or device.type == "cuda")


class GPUPathMixin:
    """Routing and failure accounting of the GPU-path dispatchers, without host synchronisation.

    Mix in before :class:`~sglang_elastic.dispatch.base.Dispatcher`; call :meth:`_init_gpu_path`
    after ``Dispatcher.__init__``. Counters live on the device and are folded into :attr:`stats`
    (a host sync) when it is read.
    """

    _stats_dev: Optional[torch.Tensor] = None
    _idx_dtype: torch.dtype = torch.int64  # the expert-id dtype of the EP kernels behind
    ids_routed: bool = False

    def _init_gpu_path(self, kernel_backend: str) -> None:
        if kernel_backend not in KERNEL_BACKENDS:
            raise ValueError(f"unknown kernel_backend {kernel_backend!r}; choose one of {', '.join(KERNEL_BACKENDS)}")
        if self.state.device != self.device and not (self.state.device.type == self.device.type == "cuda"):
            raise ValueError(f"the elastic state's active_ranks live on {self.state.device}; the {self.kind} GPU "
                             f"dispatcher reads them on {self.device} (create the state on the GPU)")
        usable = _triton_usable(self.device)
        if kernel_backend == "triton" and not usable:
            raise ImportError("kernel_backend='triton' needs Triton (pip install triton) and a CUDA device")
        self._use_triton = usable and kernel_backend != "torch"
        self._stats_dev = torch.zeros(_N_STATS, dtype=torch.int64, device=self.device)
        self._stats_acc = torch.zeros(3, dtype=torch.int64, device=self.device)  # per-call partial sums
        self._stats_folded = [0] * _N_STATS
        self._live = self.live_mask  # a view of state.active_ranks (never replaced, only written in place)
        # For pre-routed calls: nothing was dropped by routing here (persistent, so no per-call fill).
        self._no_aff = torch.zeros(self.max_tokens_per_rank, dtype=torch.bool, device=self.device)
        self._no_stats = torch.zeros(3, dtype=torch.int64, device=self.device)

    def set_ids_routed(self, routed: bool = True) -> None:
        """Take ``topk_ids`` as physical slots already mapped by the routing rule (no routing launch).

        Pairs with id ``-1`` are unused; :data:`DROPPED_ID` marks pairs whose expert had no live
        replica (their token is renormalised after combine). For the SGLang hook, which runs the rule
        where SGLang maps logical to physical experts (``docs/dispatch.md``).
        """
        self.ids_routed = bool(routed)

    @property
    def backend(self) -> str:
        """``"triton"`` or ``"torch"``: what the routing and after-combine steps run on."""
        return "triton" if self._use_triton else "torch"

    # ---------------------------------------------------------------- stats (host view, synced on read)
    @property
    def stats(self) -> DispatchStats:
        """Cumulative :class:`DispatchStats`; reading it folds the device counters in (a host sync)."""
        host = self.__dict__.setdefault("_host_stats", DispatchStats())
        dev = self._stats_dev
        if dev is not None:
            now = [int(v) for v in dev.tolist()]
            d = [a - b for a, b in zip(now, self._stats_folded)]
            self._stats_folded = now
            host.affected_tokens += d[_AFF]
            host.rerouted_pairs += d[_REROUTED]
            host.dropped_pairs += d[_DROPPED]
            host.lost_pairs += d[_LOST]
        return host

    @stats.setter
    def stats(self, value: DispatchStats) -> None:
        self.__dict__["_host_stats"] = value

    # ---------------------------------------------------------------- routing
    def _route(self, x, topk_ids, topk_weights, layer, router_logits) -> Routed:
        """The routing rule without host syncs (one launch; policy ``renormalize`` on the kernel)."""
        return self._route_ids(topk_ids, topk_weights, layer, router_logits)[0]

    def _route_ids(self, topk_ids, topk_weights, layer, router_logits) -> Tuple[Routed, torch.Tensor]:
        """:meth:`_route` plus the routed slots in the EP kernels' id dtype (``phys`` itself if int64)."""
        if self.ids_routed:
            return self._passthrough(topk_ids, topk_weights)
        if self.policy == "renormalize":
            if self._use_triton:
                try:
                    return self._route_kernel("triton", topk_ids, topk_weights, layer)
                except Exception as exc:  # a Triton that cannot compile here (any error): torch from now on
                    log.warning("%s dispatcher: Triton routing failed (%s: %s); using torch", self.kind,
                                type(exc).__name__, exc)
                    self._use_triton = False
            return self._route_kernel("torch", topk_ids, topk_weights, layer)
        from .routing import route  # policy "reroute": the host path's torch chain (needs router_logits)

        routed = route(topk_ids, topk_weights, self.table, layer, self._live,
                       token_offset=self.rank * self.max_tokens_per_rank, policy=self.policy,
                       router_logits=router_logits, load=self.load[layer] if self.record_load else None)
        self._stats_dev[:3] += routed.stats
        return routed, (routed.phys if self._idx_dtype == torch.int64 else routed.phys.to(self._idx_dtype))

    def _route_kernel(self, backend: str, topk_ids, topk_weights, layer) -> Tuple[Routed, torch.Tensor]:
        r, ids = kernels.route_renormalize(
            topk_ids, topk_weights, self.table.log2phy[layer], self._live, self.num_local_experts,
            self.rank * self.max_tokens_per_rank, self.load[layer] if self.record_load else None,
            acc=self._stats_acc, cum=self._stats_dev, idx_dtype=self._idx_dtype, backend=backend)
        return Routed(r.phys, r.logical, r.weights, r.affected, r.stats), ids

    def _passthrough(self, topk_ids, topk_weights) -> Tuple[Routed, torch.Tensor]:
        """Pre-routed ids: no launch unless a dtype must change (SGLang's are int32 ids, float32 weights).

        The ids are physical slots; ``Routed.logical`` carries them too (the logical experts stay
        with the caller), and ``DispatchOutput.topk_ids`` keeps the caller's dtype."""
        ids = topk_ids if topk_ids.dtype == self._idx_dtype else topk_ids.to(self._idx_dtype)
        w = topk_weights if topk_weights.dtype == torch.float32 else topk_weights.float()
        T = ids.shape[0]
        aff = self._no_aff[:T] if T <= self._no_aff.numel() else torch.zeros(T, dtype=torch.bool, device=ids.device)
        return Routed(ids, ids, w, aff, self._no_stats), ids

    # ---------------------------------------------------------------- after combine
    def _after_combine(self, out: torch.Tensor, routed: Routed, flags: torch.Tensor, flag_is_mask: bool,
                       connected: Optional[torch.Tensor] = None) -> None:
        """Renormalise tokens that lost pairs to peers ``flags`` marks gone (and, pre-routed, pairs the
        rule dropped), count them; with ``connected``, also clear ``active_ranks`` of masked connected
        peers (all in place)."""
        args = (out, routed.phys, routed.weights, routed.affected, flags, flag_is_mask, self.num_ranks,
                self.num_local_experts, self._stats_dev, connected, self._live if connected is not None else None,
                DROPPED_ID if self.ids_routed else None)
        if self._use_triton:
            try:
                kernels.after_combine(*args, backend="triton")
                return
            except Exception as exc:  # as in routing: any Triton failure falls back to torch for good
                log.warning("%s dispatcher: Triton post-combine failed (%s: %s); using torch", self.kind,
                            type(exc).__name__, exc)
                self._use_triton = False
        kernels.after_combine(*args, backend="torch")

    @staticmethod
    def _expected_m(T: int, R: int, K: int, S: int) -> int:
        """SGLang's grouped-GEMM hint for DeepEP low-latency outputs (host arithmetic only)."""
        return max(1, (T * R * K + R * S) // (R * S))
