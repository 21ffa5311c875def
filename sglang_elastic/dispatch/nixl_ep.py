"""``nixl`` GPU dispatcher: NIXL-EP's low-latency kernels (``nixl_ep.Buffer``) behind our routing.

Per call, on the GPU, with no host synchronisation (``check_inputs=False``)::

    dispatch: route (one launch of the routing rule, sglang_elastic.kernels: logical -> physical slot
              on a live rank, load record, degraded-token renormalisation, per-call and cumulative
              stats; no launch at all for ids the SGLang hook already routed)
              -> nixl_ep dispatch (physical slot ids are nixl_ep's expert ids, R * S of them)
    combine:  nixl_ep combine (routed slots, effective weights)
              -> query_mask_buffer -> one Triton kernel: tokens that lost a pair to a peer nixl_ep
                 masked during the call are renormalised over their other experts (as the torch
                 dispatcher does), lost pairs are counted, and ``active_ranks`` of the
                 :class:`~sglang_elastic.state.ElasticEPState` is cleared in place for masked peers.

The output is SGLang's DeepEP low-latency layout: ``hidden_states [S, R * M, H]`` (bf16, or fp8
e4m3 with column-major float32 scales ``[S, R * M, H / 128]``), ``masked_m`` = nixl_ep's
``recv_count``. After a peer is masked on the host (``set_peers`` dropped it), nixl_ep sizes the
row dimension by the highest live rank: ``R' * M`` with ``R' <= R``; ``combine`` takes that shape.

Failure contract: nixl_ep never raises on a dead peer in low-latency mode; a receive that waits
longer than ``timeout_s`` masks the peer inside the kernel. The dispatcher turns that into
``active_ranks[peer] = 0`` on the device right after the combine that saw it (routing avoids the
peer from the next call on), and :meth:`NixlEPDispatcher.poll_failures` (a host sync, for the
control path, not per step) turns it into ``state.mark_failed``. The device update only ever
clears ``active_ranks`` (``active &= ~mask`` for connected peers; SGLang's upstream dispatcher copies
``1 - mask``, which would revive a rank the control path already declared dead); joins go through
``state.mark_joined`` and :meth:`NixlEPDispatcher.set_peers`. Degraded work is counted on the device
and folded into :attr:`stats` when that is read (a host sync). The per-call stats use a persistent
per-dispatcher accumulator, so one dispatcher must not route on two streams at once.

nixl_ep's expert ids are ``nixl_ep.topk_idx_t`` (int32 in the nixl 1.4 wheels): the routing kernel
writes that copy too, and ``DispatchOutput.topk_ids`` stays int64.

The ``nixl_ep.Buffer`` is a process-wide, lock-protected singleton (:mod:`.nixl_ep_buffer`); a death
the process learns of (state ``failed`` event, ``liveness=``) is masked in it at once, so later calls
never wait on the dead peer. Membership: :meth:`NixlEPDispatcher.set_peers` connects and
disconnects peers (``connect_ranks`` / ``disconnect_ranks``, metadata through the TCPStore).

Routing and failure accounting without host syncs: :class:`~.gpu_path.GPUPathMixin`, shared with
the Mooncake EP dispatcher (:mod:`.mooncake_ep`); the kernels are in :mod:`sglang_elastic.kernels`.
"""

from __future__ import annotations

import importlib
import logging
from typing import List, NamedTuple, Optional, Sequence

import torch

from .base import DispatchHandle, DispatchOutput, Dispatcher
from .gpu_path import KERNEL_BACKENDS, GPUPathMixin, prepare_gpu_kwargs
from .gpu_path import check_gpu_device as _check_gpu_device
from .nixl_ep_buffer import LOCK, acquire_buffer, device_ctx, release_buffers

__all__ = ["NixlEPDispatcher", "NixlEPHandle", "GPUPathMixin", "import_nixl_ep", "release_buffers", "KERNEL_BACKENDS",
           "NIXL_EP_INSTALL_HINT"]

log = logging.getLogger(__name__)

NIXL_EP_INSTALL_HINT = ("the nixl GPU dispatcher needs nixl_ep, which ships inside the NIXL CUDA wheels: "
                        "pip install nixl-cu12 (CUDA 12) or nixl-cu13 (CUDA 13), plus the matching nixl")


def import_nixl_ep():
    """Import ``nixl_ep`` or raise ImportError naming the wheels to install."""
    try:
        return importlib.import_module("nixl_ep")
    except Exception as exc:  # ImportError, or a CUDA backend that fails to load (no libcuda, ABI)
        raise ImportError(f"{NIXL_EP_INSTALL_HINT} (import failed: {exc})") from exc


class NixlEPHandle(NamedTuple):
    """``DispatchHandle.backend`` of the nixl GPU dispatcher."""

    handle: tuple            # nixl_ep's (src_info, layout_range, max_tokens, hidden)
    topk_idx: torch.Tensor   # the routed slots in nixl_ep's id dtype, as dispatched


class NixlEPDispatcher(GPUPathMixin, Dispatcher):
    """The ``nixl`` GPU dispatcher; see the module docstring.

    Args (besides :class:`~sglang_elastic.dispatch.base.Dispatcher`'s; ``dtype`` must be bf16):
        store: the ``torch.distributed.TCPStore`` nixl_ep exchanges metadata through (keys
            ``NIXL_EP/<rank>``); the same store on every rank.
        connect: connect to the state's live ranks now (collective with them); otherwise call
            :meth:`set_peers` later.
        num_rdma_bytes: buffer size (default: nixl_ep's hint for ``max_tokens_per_rank``,
            ``hidden``, ``num_ranks``, ``num_ranks * num_local_experts``).
        kernel_backend: ``"auto"`` (Triton routing kernels when usable), ``"triton"`` or ``"torch"``.
        liveness: the process's :class:`~sglang_elastic.transport.Liveness`; its deaths are recorded
            in the state, and every death the state records is masked in nixl_ep at once.

    ``timeout_s`` becomes nixl_ep's kernel timeout (``timeout_ms``), fixed when the shared buffer
    is created. Calls must run with this dispatcher's device current (as SGLang does).
    """

    kind = "nixl"

    def __init__(self, *, store=None, connect: bool = True, num_rdma_bytes: Optional[int] = None,
                 kernel_backend: str = "auto", **kw) -> None:
        nixl_ep = import_nixl_ep()
        liveness = prepare_gpu_kwargs(kw, "nixl", _check_gpu_device)
        super().__init__(**kw)
        if store is None:
            raise ValueError("the nixl GPU dispatcher needs store= (a torch.distributed.TCPStore, the same on "
                             "every rank): nixl_ep exchanges its metadata through it")
        if num_rdma_bytes is not None and int(num_rdma_bytes) <= 0:
            raise ValueError(f"num_rdma_bytes must be > 0, got {num_rdma_bytes}")
        self._nixl = nixl_ep
        self._idx_dtype = getattr(nixl_ep, "topk_idx_t", torch.int64)  # int32 in the nixl 1.4 wheels
        self._init_gpu_path(kernel_backend)
        self._closed = False
        self._shared = acquire_buffer(nixl_ep, self.device, self.rank, self.num_ranks, self.num_local_experts,
                                       self.max_tokens_per_rank, self.hidden, max(1, int(round(self.timeout_s * 1e3))),
                                       store, num_rdma_bytes)
        self._shared.watch(self.state, liveness)
        if connect:
            self.set_peers([r for r in self.state.live_ranks() if r < self.num_ranks])

    @property
    def buffer(self):
        """The shared ``nixl_ep.Buffer`` (for callers that want nixl_ep's own API)."""
        return self._shared.buffer

    # ------------------------------------------------------------------ data path
    def dispatch(self, hidden_states: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, *,
                 layer: int = 0, router_logits: Optional[torch.Tensor] = None,
                 check_inputs: bool = True) -> DispatchOutput:
        """Route and dispatch through nixl_ep; no host sync when ``check_inputs=False``."""
        if check_inputs:
            self._check_open()
            self._check_inputs(hidden_states, topk_ids, topk_weights, layer, router_logits)
        routed, ids = self._route_ids(topk_ids, topk_weights, layer, router_logits)
        x = hidden_states if hidden_states.is_contiguous() else hidden_states.contiguous()
        R, S, M, K = self.num_ranks, self.num_local_experts, self.max_tokens_per_rank, self.num_topk
        recv, count, nixl_handle, _event, _hook = self._shared.buffer.dispatch(
            x, ids, M, R * S, use_fp8=self.use_fp8, async_finish=False, return_recv_hook=False)
        hs, scale = recv if self.use_fp8 else (recv, None)
        T = x.shape[0]
        handle = DispatchHandle(layer, T, self.dtype, routed, backend=NixlEPHandle(nixl_handle, ids))
        return DispatchOutput(hs, scale, count, self._expected_m(T, R, K, S), routed.phys, routed.weights, handle,
                              routed.stats)

    def combine(self, expert_output: torch.Tensor, handle: DispatchHandle) -> torch.Tensor:
        """Combine through nixl_ep, then account for peers it masked during the call (no host sync)."""
        S, H = self.num_local_experts, self.hidden
        nb = handle.backend
        rows = nb.handle[0].shape[1]
        if expert_output.shape != (S, rows, H):
            raise ValueError(f"expert_output must be [{S}, {rows}, {H}] (the dispatch output's shape), got "
                             f"{tuple(expert_output.shape)}")
        if expert_output.dtype != torch.bfloat16:
            raise ValueError(f"expert_output must be bfloat16, got {expert_output.dtype}")
        y = expert_output if expert_output.is_contiguous() else expert_output.contiguous()
        routed = handle.routed
        sh = self._shared
        out, _event, _hook = sh.buffer.combine(y, nb.topk_idx, routed.weights, nb.handle, async_finish=False,
                                               return_recv_hook=False)
        sh.buffer.query_mask_buffer(sh.mask)
        self._after_combine(out, routed, sh.mask, True, sh.connected)
        return out

    # ------------------------------------------------------------------ control path
    def poll_failures(self) -> List[int]:
        """Mark connected peers nixl_ep has masked as failed in the state; returns them (a host sync).

        For the control path (a health loop, or after a step), not per call: the data path already
        stops routing to them on the device.
        """
        self._check_open()
        sh = self._shared
        with LOCK:
            sh.buffer.query_mask_buffer(sh.mask)
            masked = sh.mask.tolist()
            peers = sorted(sh.peers)
        newly = [r for r in peers if masked[r] and self.state.is_alive(r)]
        if newly:
            self._peer_failed(newly, f"nixl_ep masked it (no data within {self.timeout_s}s)")
        return newly

    def set_peers(self, ranks: Sequence[int]) -> None:
        """Connect to ``ranks`` (collective with the new ones) and disconnect the others.

        A restarted peer (same rank id, new process) must be dropped first and then added again:
        ``set_peers(without r)`` then ``set_peers(with r)``.
        """
        self._check_open()
        want = {int(r) for r in ranks} - {self.rank}
        bad = sorted(r for r in want if not 0 <= r < self.num_ranks)
        if bad:
            raise ValueError(f"ranks {bad} are outside the EP group of {self.num_ranks} ranks")
        sh = self._shared
        with LOCK, device_ctx(self.device):
            gone = sorted(sh.peers - want)
            new = sorted(want - sh.peers)
            if gone:
                sh.buffer.disconnect_ranks(gone)
                sh.peers -= set(gone)
            if new:
                sh.buffer.connect_ranks(new)
                sh.peers |= set(new)
            conn = torch.zeros(self.num_ranks, dtype=torch.int32)
            conn[[self.rank, *sorted(sh.peers)]] = 1
            sh.connected.copy_(conn)
            sh.buffer.query_mask_buffer(sh.mask)

    def close(self) -> None:
        """Drop this dispatcher's use of the shared buffer (kept for the process; see release_buffers)."""
        if not self._closed:
            self._closed = True
            with LOCK:
                self._shared.users -= 1

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this nixl dispatcher is closed")
