"""``mooncake`` GPU dispatcher: Mooncake EP's low-latency kernels behind our routing.

Mooncake EP (``mooncake.mooncake_ep_buffer.Buffer(group, num_ep_buffer_bytes)``, in the CUDA
wheels ``mooncake-transfer-engine`` / ``mooncake-transfer-engine-cuda13``) has DeepEP's
low-latency API plus an ``active_ranks`` argument: an int32 ``[R]`` mask (1 = alive) that the
kernels read and **write**: a peer that does not answer within ``timeout_us`` gets
``active_ranks[peer] = 0``. This dispatcher passes the
:class:`~sglang_elastic.state.ElasticEPState`'s own ``active_ranks`` (a view of it, updated in
place), so a timeout flips the routing mask on the device with nothing in between; routing reads
the same tensor on the next call. As SGLang does, the first call waits without a timeout (``-1``:
peers may still be compiling or allocating).

Per call (no host synchronisation with ``check_inputs=False``): routing (the one routing kernel of
:mod:`sglang_elastic.kernels`, through :class:`~sglang_elastic.dispatch.gpu_path.GPUPathMixin`) ->
``Buffer.dispatch`` -> experts -> ``Buffer.combine`` -> tokens that lost a pair to a peer Mooncake
deactivated during the call are renormalised over their other experts and counted. A death the
process learns of elsewhere (membership -> ``state.mark_failed``) clears the same ``active_ranks``
entry on the device (the state writes it in place), so later calls neither send to nor wait on the
peer; with ``liveness=``, the Liveness's deaths are recorded in the state too.
:meth:`MooncakeEPDispatcher.poll_failures` (a host sync, control path) turns device-side
deactivations into ``state.mark_failed``.

The buffer is a process-wide singleton per process group (SGLang makes one dispatcher per MoE layer;
all share it); a dispatcher that needs a larger one re-creates it (collective over the group).
Membership: the group's ``mooncake`` backend owns who is in it; :meth:`MooncakeEPDispatcher.set_peers`
re-syncs the buffer with it (``Buffer.update_ep_member``) after the backend changed.

Written against Mooncake's documented API (``mooncake_ep_buffer.py``: ``dispatch(x, topk_idx,
active_ranks, num_max_dispatch_tokens_per_rank, num_experts, timeout_us, use_fp8, async_finish,
return_recv_hook)``, ``combine(x, topk_idx, topk_weights, active_ranks, timeout_us, handle, ...)``)
and SGLang 0.5.23's ``token_dispatcher/mooncake.py``; the wheel was not available on the machines
this was developed on, so only its CPU-testable parts (errors, validation, the data flow against a
fake ``Buffer``) are tested here.
"""
from __future__ import annotations

import importlib
import logging
import threading
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from .base import DispatchHandle, DispatchOutput, Dispatcher
from .gpu_path import GPUPathMixin, link_liveness, prepare_gpu_kwargs
from .gpu_path import check_gpu_device as _check_gpu_device

__all__ = ["MooncakeEPDispatcher", "import_mooncake_ep", "MOONCAKE_EP_INSTALL_HINT", "MAX_TOKENS_PER_RANK"]

log = logging.getLogger(__name__)

MOONCAKE_EP_INSTALL_HINT = ("the mooncake GPU dispatcher needs Mooncake EP, which ships only in the CUDA wheels: "
                            "pip install mooncake-transfer-engine (CUDA 12) or mooncake-transfer-engine-cuda13 "
                            "(CUDA 13); mooncake-transfer-engine-non-cuda has no EP kernels")
# Mooncake EP's low-latency kernels count tokens per (rank pair) against a tag of 1024 (SGLang asserts it).
MAX_TOKENS_PER_RANK = 1024


def import_mooncake_ep():
    """Return Mooncake EP's ``Buffer`` class or raise ImportError naming the wheel to install."""
    try:
        mod = importlib.import_module("mooncake.mooncake_ep_buffer")
        importlib.import_module("mooncake.ep")  # the compiled EP extension; absent from the non-CUDA wheel
    except Exception as exc:  # ImportError, or a CUDA extension that fails to load: both mean "not usable"
        raise ImportError(f"{MOONCAKE_EP_INSTALL_HINT} (import failed: {exc})") from exc
    return mod.Buffer


_LOCK = threading.RLock()
# id(group) -> (group, Buffer, num_ep_buffer_bytes): the group is kept so its id stays unique.
_BUFFERS: Dict[int, Tuple[Any, Any, int]] = {}


def _acquire_buffer(buffer_cls, group, num_bytes: int):
    """Get or create the shared Mooncake EP buffer of ``group`` holding at least ``num_bytes``."""
    with _LOCK:
        hit = _BUFFERS.get(id(group))
        if hit is not None and hit[0] is group and hit[2] >= num_bytes:
            return hit[1]
        buf = buffer_cls(group, num_bytes)
        _BUFFERS[id(group)] = (group, buf, num_bytes)
        return buf


def release_buffers() -> None:
    """Forget every shared Mooncake EP buffer of this process (their dispatchers become unusable)."""
    with _LOCK:
        _BUFFERS.clear()


class MooncakeEPDispatcher(GPUPathMixin, Dispatcher):
    """The ``mooncake`` GPU dispatcher; see the module docstring.

    Args (besides :class:`~sglang_elastic.dispatch.base.Dispatcher`'s; ``dtype`` must be bf16,
    ``max_tokens_per_rank`` at most 1024):
        group: the EP ``torch.distributed`` process group (``mooncake`` backend for elastic EP; its
            size must be ``num_ranks`` and its rank ``rank``).
        num_ep_buffer_bytes: buffer size (default: ``Buffer.get_ep_buffer_size_hint`` for
            ``max_tokens_per_rank``, ``hidden``, ``num_ranks``, ``num_ranks * num_local_experts``).
        timeout_us: Mooncake's per-call timeout (default ``timeout_s``).
        kernel_backend: routing kernels, ``"auto"``, ``"triton"`` or ``"torch"``.
    """

    kind = "mooncake"

    def __init__(self, *, group=None, num_ep_buffer_bytes: Optional[int] = None, timeout_us: Optional[int] = None,
                 kernel_backend: str = "auto", **kw) -> None:
        buffer_cls = import_mooncake_ep()
        liveness = prepare_gpu_kwargs(kw, "mooncake", _check_gpu_device)
        super().__init__(**kw)
        if self.max_tokens_per_rank > MAX_TOKENS_PER_RANK:
            raise ValueError(f"Mooncake EP's low-latency kernels take at most {MAX_TOKENS_PER_RANK} tokens per rank, "
                             f"got max_tokens_per_rank={self.max_tokens_per_rank}")
        if group is None:
            raise ValueError("the mooncake GPU dispatcher needs group= (the EP process group, mooncake backend)")
        if group.size() != self.num_ranks or group.rank() != self.rank:
            raise ValueError(f"group has size {group.size()} and rank {group.rank()}; the dispatcher is rank "
                             f"{self.rank} of {self.num_ranks}")
        if timeout_us is not None and int(timeout_us) <= 0:
            raise ValueError(f"timeout_us must be > 0, got {timeout_us}")
        if num_ep_buffer_bytes is not None and int(num_ep_buffer_bytes) <= 0:
            raise ValueError(f"num_ep_buffer_bytes must be > 0, got {num_ep_buffer_bytes}")
        self._init_gpu_path(kernel_backend)
        self.group = group
        self.timeout_us = int(timeout_us) if timeout_us is not None else max(1, int(round(self.timeout_s * 1e6)))
        R, S = self.num_ranks, self.num_local_experts
        if num_ep_buffer_bytes is None:
            num_ep_buffer_bytes = buffer_cls.get_ep_buffer_size_hint(self.max_tokens_per_rank, self.hidden, R, R * S)
        self.buffer = _acquire_buffer(buffer_cls, group, int(num_ep_buffer_bytes))
        link_liveness(liveness, self.state)
        self._first_call = True

    def _timeout(self) -> int:
        return -1 if self._first_call else self.timeout_us

    # ------------------------------------------------------------------ data path
    def dispatch(self, hidden_states: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, *,
                 layer: int = 0, router_logits: Optional[torch.Tensor] = None,
                 check_inputs: bool = True) -> DispatchOutput:
        """Route and dispatch through Mooncake EP; no host sync when ``check_inputs=False``."""
        if check_inputs:
            self._check_inputs(hidden_states, topk_ids, topk_weights, layer, router_logits)
        routed = self._route(hidden_states, topk_ids, topk_weights, layer, router_logits)  # int64 ids, as Mooncake wants
        x = hidden_states if hidden_states.is_contiguous() else hidden_states.contiguous()
        R, S, M, K = self.num_ranks, self.num_local_experts, self.max_tokens_per_rank, self.num_topk
        recv, count, mc_handle, _event, _hook = self.buffer.dispatch(
            x, routed.phys, self._live, M, R * S, self._timeout(), use_fp8=self.use_fp8, async_finish=False,
            return_recv_hook=False)
        hs, scale = recv if self.use_fp8 else (recv, None)
        T = x.shape[0]
        handle = DispatchHandle(layer, T, self.dtype, routed, backend=mc_handle)
        return DispatchOutput(hs, scale, count, self._expected_m(T, R, K, S), routed.phys, routed.weights, handle,
                              routed.stats)

    def combine(self, expert_output: torch.Tensor, handle: DispatchHandle) -> torch.Tensor:
        """Combine through Mooncake EP, then account for peers it deactivated during the call."""
        S, H = self.num_local_experts, self.hidden
        rows = self.num_ranks * self.max_tokens_per_rank
        if expert_output.shape != (S, rows, H):
            raise ValueError(f"expert_output must be [{S}, {rows}, {H}], got {tuple(expert_output.shape)}")
        if expert_output.dtype != torch.bfloat16:
            raise ValueError(f"expert_output must be bfloat16, got {expert_output.dtype}")
        y = expert_output if expert_output.is_contiguous() else expert_output.contiguous()
        routed = handle.routed
        out, _event, _hook = self.buffer.combine(y, routed.phys, routed.weights, self._live, self._timeout(),
                                                 handle.backend, async_finish=False, return_recv_hook=False)
        self._first_call = False
        self._after_combine(out, routed, self._live, False)
        return out

    # ------------------------------------------------------------------ control path
    def poll_failures(self) -> List[int]:
        """Mark peers Mooncake EP deactivated on the device as failed in the state (a host sync)."""
        dev = self._live.tolist()
        newly = [r for r in range(self.num_ranks) if r != self.rank and not dev[r] and self.state.is_alive(r)]
        if newly:
            self._peer_failed(newly, f"Mooncake EP deactivated it (no answer within {self.timeout_us} us)")
        return newly

    def set_peers(self, ranks: Sequence[int]) -> None:
        """Re-sync the buffer with the group's membership after its mooncake backend changed it.

        ``ranks`` must be the group's live members (validated); Mooncake EP learns them from the
        backend, not from this call.
        """
        bad = sorted(int(r) for r in ranks if not 0 <= int(r) < self.num_ranks)
        if bad:
            raise ValueError(f"ranks {bad} are outside the EP group of {self.num_ranks} ranks")
        update = getattr(self.buffer, "update_ep_member", None)
        if update is None:
            raise RuntimeError("the installed Mooncake EP has no Buffer.update_ep_member(); upgrade "
                               "mooncake-transfer-engine to change membership without a restart")
        with _LOCK:
            update()
