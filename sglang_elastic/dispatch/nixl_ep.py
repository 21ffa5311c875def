"""``nixl`` GPU dispatcher: NIXL-EP's low-latency kernels (``nixl_ep.Buffer``) behind our routing.

Per call, on the GPU, with no host synchronisation (``check_inputs=False``)::

    dispatch: route (one Triton kernel: logical -> physical slot on a live rank, load record,
              degraded-token renormalisation, per-call and cumulative stats)
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

The ``nixl_ep.Buffer`` is a process-wide, lock-protected singleton per (device, rank, R, S): every
dispatcher of the process (SGLang makes one per MoE layer) shares it, and it grows when a dispatcher
needs more memory (``update_memory_buffers``, or a collective re-creation where the installed
nixl_ep allows only one call). Membership: :meth:`NixlEPDispatcher.set_peers` connects and
disconnects peers (``connect_ranks`` / ``disconnect_ranks``, metadata through the TCPStore).

:class:`GPUPathMixin` (routing and failure accounting without host syncs) is shared with the
Mooncake EP dispatcher (:mod:`.mooncake_ep`).
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import logging
import os
import threading
from dataclasses import dataclass, field
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Set, Tuple

import torch

from .base import DispatchHandle, DispatchOutput, DispatchStats, Dispatcher
from .routing import Routed, route

__all__ = ["NixlEPDispatcher", "NixlEPHandle", "GPUPathMixin", "import_nixl_ep", "release_buffers", "KERNEL_BACKENDS",
           "NIXL_EP_INSTALL_HINT"]

log = logging.getLogger(__name__)

NIXL_EP_INSTALL_HINT = ("the nixl GPU dispatcher needs nixl_ep, which ships inside the NIXL CUDA wheels: "
                        "pip install nixl-cu12 (CUDA 12) or nixl-cu13 (CUDA 13), plus the matching nixl")
KERNEL_BACKENDS = ("auto", "triton", "torch")

# Cumulative device counters: affected tokens, rerouted pairs, dropped pairs, lost pairs.
_AFF, _REROUTED, _DROPPED, _LOST = 0, 1, 2, 3
_N_STATS = 4


def import_nixl_ep():
    """Import ``nixl_ep`` or raise ImportError naming the wheels to install."""
    try:
        return importlib.import_module("nixl_ep")
    except Exception as exc:  # ImportError, or a CUDA backend that fails to load (no libcuda, ABI)
        raise ImportError(f"{NIXL_EP_INSTALL_HINT} (import failed: {exc})") from exc


def _check_gpu_device(device: torch.device, what: str) -> None:
    """The GPU-path dispatchers run on CUDA only (tests replace this to drive them with fakes on CPU)."""
    if device.type != "cuda":
        raise ValueError(f"the {what} dispatcher runs on the GPU: pass device='cuda' (got {device}); "
                         "use path='host' for CPU tokens")


# ---------------------------------------------------------------------------------------- Triton kernels
# Plain functions, compiled by triton.jit on first use (Triton is imported lazily, so this module
# imports without it). ``tl`` is bound when the kernels are built.

tl: Any = None


def _route_kernel_src(ids_ptr, w_ptr, l2p_ptr, live_ptr, phys_ptr, idx32_ptr, logical_ptr, wout_ptr, aff_ptr,
                      call_ptr, acc_ptr, cum_ptr, load_ptr, T, K, E, X, R, S, token_offset,
                      HAS_LOAD: tl.constexpr, HAS_IDX32: tl.constexpr, K_PAD: tl.constexpr, X_PAD: tl.constexpr,
                      BLOCK_T: tl.constexpr):
    """``routing.route`` (policy ``renormalize``) for ``BLOCK_T`` tokens per program, plus the load record,
    per-call and cumulative stats, and an int32 copy of the slots for EP kernels with int32 expert ids.

    Per-call totals: each program adds its share to ``acc`` (persistent, zero between calls) and takes a
    ticket; the last program publishes the totals to ``call``, adds them to ``cum`` and resets ``acc``.
    """
    pid = tl.program_id(0)
    ks = tl.arange(0, K_PAD)
    xs = tl.arange(0, X_PAD)
    ts = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    row = ts < T
    pm = row[:, None] & (ks[None, :] < K)
    off = ts[:, None].to(tl.int64) * K + ks[None, :]
    ids = tl.load(ids_ptr + off, mask=pm, other=-1).to(tl.int64)
    known = pm & (ids >= 0) & (ids < E)
    e = tl.where(known, ids, 0)
    # Replica rule of routing._pick_replica: the j-th live replica in log2phy order,
    # j = (token_offset + t + e) mod n_live (floor modulo).
    cand = tl.load(l2p_ptr + e[:, :, None] * X + xs[None, None, :],
                   mask=known[:, :, None] & (xs[None, None, :] < X), other=-1)
    valid = cand >= 0
    rank = tl.where(valid, cand, 0) // S
    alive = tl.load(live_ptr + rank, mask=valid & (rank < R), other=0) != 0
    live = (valid & alive).to(tl.int32)
    n_live = tl.sum(live, axis=2)
    m = tl.maximum(n_live, 1).to(tl.int64)
    j = (ts[:, None].to(tl.int64) + token_offset + e) % m
    j = tl.where(j < 0, j + m, j)
    nth = (tl.cumsum(live, axis=2) - 1).to(tl.int64)
    hit = (live != 0) & (nth == j[:, :, None])
    phys = tl.sum(tl.where(hit, cand, 0), axis=2)
    phys = tl.where(known & (n_live > 0), phys, -1)
    tl.store(phys_ptr + off, phys, mask=pm)
    if HAS_IDX32:
        tl.store(idx32_ptr + off, phys.to(tl.int32), mask=pm)
    tl.store(logical_ptr + off, tl.where(phys >= 0, ids, -1), mask=pm)
    if HAS_LOAD:
        tl.atomic_add(load_ptr + e, 1, mask=known)
    # routing.renormalize: drop unrouted pairs, rescale rows that lost weight to their sum.
    w = tl.load(w_ptr + off, mask=pm, other=0.0).to(tl.float32)
    gone = pm & (phys < 0)
    total = tl.sum(w, axis=1)
    kw = tl.where(phys >= 0, w, 0.0)
    ksum = tl.sum(kw, axis=1)
    shrunk = tl.sum((gone & (w != 0.0)).to(tl.int32), axis=1) > 0
    scale = tl.where(ksum != 0.0, total / tl.where(ksum != 0.0, ksum, 1.0), 0.0)
    tl.store(wout_ptr + off, tl.where(shrunk[:, None], kw * scale[:, None], kw), mask=pm)
    nd = tl.sum((gone & (ids >= 0)).to(tl.int32), axis=1)
    tl.store(aff_ptr + ts, (nd > 0).to(tl.uint8), mask=row)
    tl.atomic_add(acc_ptr + 0, tl.sum((nd > 0).to(tl.int32), axis=0).to(tl.int64))
    tl.atomic_add(acc_ptr + 1, tl.sum(nd, axis=0).to(tl.int64))
    ticket = tl.atomic_add(acc_ptr + 2, 1)
    if ticket == tl.num_programs(0) - 1:
        a = tl.atomic_xchg(acc_ptr + 0, 0)
        d = tl.atomic_xchg(acc_ptr + 1, 0)
        tl.atomic_xchg(acc_ptr + 2, 0)
        tl.store(call_ptr + 0, a)
        tl.store(call_ptr + 1, a * 0)
        tl.store(call_ptr + 2, d)
        tl.atomic_add(cum_ptr + 0, a)
        tl.atomic_add(cum_ptr + 2, d)


def _post_kernel_src(out_ptr, phys_ptr, w_ptr, aff_ptr, flag_ptr, conn_ptr, active_ptr, cum_ptr, T, H, K, S, NR,
                     FLAG_IS_MASK: tl.constexpr, UPDATE_ACTIVE: tl.constexpr, K_PAD: tl.constexpr,
                     BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, R_PAD: tl.constexpr):
    """After combine: renormalise tokens whose pairs a failed peer lost, count them, clear ``active``."""
    pid = tl.program_id(0)
    if UPDATE_ACTIVE:
        if pid == 0:
            rs = tl.arange(0, R_PAD)
            rm = rs < NR
            mk = tl.load(flag_ptr + rs, mask=rm, other=0)
            cn = tl.load(conn_ptr + rs, mask=rm, other=0)
            act = tl.load(active_ptr + rs, mask=rm, other=0)
            tl.store(active_ptr + rs, tl.where((mk != 0) & (cn != 0), act * 0, act), mask=rm)
    ts = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    row = ts < T
    ks = tl.arange(0, K_PAD)
    pm = row[:, None] & (ks[None, :] < K)
    off = ts[:, None].to(tl.int64) * K + ks[None, :]
    phys = tl.load(phys_ptr + off, mask=pm, other=-1)
    sent = phys >= 0
    rank = tl.where(sent, phys, 0) // S
    if FLAG_IS_MASK:
        fl = tl.load(flag_ptr + rank, mask=sent & (rank < NR), other=0)
        lost = sent & (fl != 0)
    else:
        fl = tl.load(flag_ptr + rank, mask=sent & (rank < NR), other=1)
        lost = sent & (fl == 0)
    n_lost = tl.sum(lost.to(tl.int32), axis=1)
    need = n_lost > 0
    if tl.sum(need.to(tl.int32), axis=0) > 0:
        w = tl.load(w_ptr + off, mask=pm, other=0.0)
        total = tl.sum(tl.where(sent, w, 0.0), axis=1)
        keep = tl.sum(tl.where(sent & (lost == 0), w, 0.0), axis=1)
        scale = tl.where(keep != 0.0, total / tl.where(keep != 0.0, keep, 1.0), 0.0)
        for h0 in range(0, H, BLOCK_H):
            hs = h0 + tl.arange(0, BLOCK_H)
            m2 = need[:, None] & (hs[None, :] < H)
            p = out_ptr + ts[:, None].to(tl.int64) * H + hs[None, :]
            v = tl.load(p, mask=m2, other=0.0).to(tl.float32)
            tl.store(p, (v * scale[:, None]).to(out_ptr.dtype.element_ty), mask=m2)
        fresh = need & (tl.load(aff_ptr + ts, mask=row, other=1) == 0)
        nl = tl.sum(n_lost, axis=0).to(tl.int64)
        tl.atomic_add(cum_ptr + 3, nl)
        tl.atomic_add(cum_ptr + 2, nl)
        tl.atomic_add(cum_ptr + 0, tl.sum(fresh.to(tl.int32), axis=0).to(tl.int64))


@functools.lru_cache(maxsize=None)
def _triton_kernels() -> Tuple[Any, Any, Any]:
    """``(triton, route_kernel, post_kernel)``; raises ImportError without Triton."""
    global tl
    import triton
    import triton.language as language

    tl = language
    route_k = triton.jit(_route_kernel_src, do_not_specialize=["T", "token_offset"])  # T varies per call
    post_k = triton.jit(_post_kernel_src, do_not_specialize=["T"])
    return triton, route_k, post_k


def _triton_usable(device: torch.device) -> bool:
    """Triton imports and can run here (a CUDA device, or the interpreter)."""
    try:
        _triton_kernels()
    except Exception:
        return False
    interp = os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")
    return interp or device.type == "cuda"


def _pow2(n: int) -> int:
    """Smallest power of two >= n (n >= 1)."""
    return 1 << max(0, int(n) - 1).bit_length()


def _floor_pow2(n: int) -> int:
    """Largest power of two <= n (n >= 1)."""
    return 1 << (max(1, int(n)).bit_length() - 1)


# ---------------------------------------------------------------------------------------- shared GPU path
class GPUPathMixin:
    """Routing and failure accounting of the GPU-path dispatchers, without host synchronisation.

    Mix in before :class:`~sglang_elastic.dispatch.base.Dispatcher`; call :meth:`_init_gpu_path`
    after ``Dispatcher.__init__``. Counters live on the device and are folded into :attr:`stats`
    (a host sync) when it is read.
    """

    _stats_dev: Optional[torch.Tensor] = None
    _idx_dtype: torch.dtype = torch.int64  # the expert-id dtype of the EP kernels behind

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
        """``routing.route`` without host syncs (Triton when usable, policy ``renormalize``)."""
        return self._route_ids(topk_ids, topk_weights, layer, router_logits)[0]

    def _route_ids(self, topk_ids, topk_weights, layer, router_logits) -> Tuple[Routed, torch.Tensor]:
        """:meth:`_route` plus the routed slots in the EP kernels' id dtype (``phys`` itself if int64)."""
        if self._use_triton and self.policy == "renormalize":
            try:
                return self._route_triton(topk_ids, topk_weights, layer)
            except Exception as exc:  # a Triton that cannot compile here: torch from now on
                log.warning("%s dispatcher: Triton routing failed (%s: %s); using torch", self.kind,
                            type(exc).__name__, exc)
                self._use_triton = False
        routed = self._route_torch(topk_ids, topk_weights, layer, router_logits)
        ids = routed.phys if self._idx_dtype == torch.int64 else routed.phys.to(self._idx_dtype)
        return routed, ids

    def _route_torch(self, topk_ids, topk_weights, layer, router_logits) -> Routed:
        routed = route(topk_ids, topk_weights, self.table, layer, self._live,
                       token_offset=self.rank * self.max_tokens_per_rank, policy=self.policy,
                       router_logits=router_logits, load=None)
        if self.record_load:
            ids = topk_ids.to(torch.int64).reshape(-1)
            self.load[layer].index_add_(0, ids.clamp(min=0), (ids >= 0).to(self.load.dtype))
        self._stats_dev[:3] += routed.stats
        return routed

    def _route_triton(self, topk_ids, topk_weights, layer) -> Tuple[Routed, torch.Tensor]:
        _, kernel, _ = _triton_kernels()
        T, K = topk_ids.shape
        dev = self.device
        ibuf = torch.empty(2 * T * K + 3, dtype=torch.int64, device=dev)
        phys, logical, call = ibuf[:T * K].view(T, K), ibuf[T * K:2 * T * K].view(T, K), ibuf[2 * T * K:]
        weights = torch.empty(T, K, dtype=torch.float32, device=dev)
        aff = torch.empty(T, dtype=torch.uint8, device=dev)
        idx32 = torch.empty(T, K, dtype=torch.int32, device=dev) if self._idx_dtype == torch.int32 else None
        l2p = self.table.log2phy[layer]
        E, X = l2p.shape
        k_pad, x_pad = max(2, _pow2(K)), max(2, _pow2(X))
        block_t = max(2, min(64, _floor_pow2(512 // (k_pad * x_pad))))  # a [block_t, K, X] tile per program
        load = self.load[layer] if self.record_load else phys
        kernel[(max(1, -(-T // block_t)),)](
            topk_ids.contiguous(), topk_weights.contiguous(), l2p, self._live, phys,
            idx32 if idx32 is not None else phys, logical, weights, aff, call, self._stats_acc, self._stats_dev, load,
            T, K, E, X, self.num_ranks, self.num_local_experts, self.rank * self.max_tokens_per_rank,
            HAS_LOAD=self.record_load, HAS_IDX32=idx32 is not None, K_PAD=k_pad, X_PAD=x_pad, BLOCK_T=block_t,
            num_warps=4)
        routed = Routed(phys, logical, weights, aff.view(torch.bool), call)
        if idx32 is not None:
            return routed, idx32
        return routed, (phys if self._idx_dtype == torch.int64 else phys.to(self._idx_dtype))

    # ---------------------------------------------------------------- after combine
    def _after_combine(self, out: torch.Tensor, routed: Routed, flags: torch.Tensor, flag_is_mask: bool,
                       connected: Optional[torch.Tensor] = None) -> None:
        """Renormalise tokens that lost pairs to peers ``flags`` marks gone, count them; with
        ``connected``, also clear ``active_ranks`` of masked connected peers (all in place)."""
        if self._use_triton:
            try:
                self._after_combine_triton(out, routed, flags, flag_is_mask, connected)
                return
            except Exception as exc:
                log.warning("%s dispatcher: Triton post-combine failed (%s: %s); using torch", self.kind,
                            type(exc).__name__, exc)
                self._use_triton = False
        self._after_combine_torch(out, routed, flags, flag_is_mask, connected)

    def _after_combine_triton(self, out, routed, flags, flag_is_mask, connected) -> None:
        _, _, kernel = _triton_kernels()
        T, K = routed.phys.shape
        H = out.shape[1]
        NR = self.num_ranks
        active = self._live
        block_t = 32
        grid = (max(1, -(-T // block_t)),)
        kernel[grid](out, routed.phys, routed.weights, routed.affected.view(torch.uint8), flags,
                     connected if connected is not None else flags, active, self._stats_dev, T, H, K,
                     self.num_local_experts, NR, FLAG_IS_MASK=flag_is_mask, UPDATE_ACTIVE=connected is not None,
                     K_PAD=max(2, _pow2(K)), BLOCK_T=block_t, BLOCK_H=128, R_PAD=max(2, _pow2(NR)), num_warps=4)

    def _after_combine_torch(self, out, routed, flags, flag_is_mask, connected) -> None:
        NR, S = self.num_ranks, self.num_local_experts
        fl = flags[:NR]
        if connected is not None:
            gone_rank = (fl != 0) & (connected[:NR] != 0)
            self._live.mul_((~gone_rank).to(self._live.dtype))
        phys = routed.phys
        sent = phys >= 0
        fr = fl[(phys.clamp(min=0) // S)]
        lost = sent & ((fr != 0) if flag_is_mask else (fr == 0))
        n_lost = lost.sum(1)
        need = n_lost > 0
        w = routed.weights.float()
        zero = torch.zeros_like(w)
        total = torch.where(sent, w, zero).sum(1)
        keep = torch.where(sent & ~lost, w, zero).sum(1)
        scale = torch.where(keep != 0, total / torch.where(keep != 0, keep, torch.ones_like(keep)),
                            torch.zeros_like(keep))
        scaled = (out.float() * scale[:, None]).to(out.dtype)
        out.copy_(torch.where(need[:, None], scaled, out))
        nl = n_lost.sum()
        self._stats_dev[_LOST] += nl
        self._stats_dev[_DROPPED] += nl
        self._stats_dev[_AFF] += (need & ~routed.affected).sum()

    @staticmethod
    def _expected_m(T: int, R: int, K: int, S: int) -> int:
        """SGLang's grouped-GEMM hint for DeepEP low-latency outputs (host arithmetic only)."""
        return max(1, (T * R * K + R * S) // (R * S))


# ---------------------------------------------------------------------------------------- the shared buffer
@dataclass
class _SharedBuffer:
    """A process-wide ``nixl_ep.Buffer`` and what every dispatcher using it needs."""

    key: Tuple[int, int, int, int]      # (device index, rank, R, S)
    buffer: Any
    store: Any
    timeout_ms: int
    rdma_bytes: int
    mask: torch.Tensor                  # int32 [R]: last query_mask_buffer (1 = masked)
    connected: torch.Tensor             # int32 [R]: this rank and its connected peers
    peers: Set[int] = field(default_factory=set)
    users: int = 0


_LOCK = threading.RLock()
_BUFFERS: Dict[Tuple[int, int, int, int], _SharedBuffer] = {}


def _device_ctx(device: torch.device):
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _new_buffer(nixl_ep, device: torch.device, rank: int, R: int, S: int, rdma_bytes: int, timeout_ms: int, store):
    with _device_ctx(device):
        buf = nixl_ep.Buffer(rank=rank, low_latency_mode=True, explicitly_destroy=True, tcp_store_group=store,
                             timeout_ms=timeout_ms)
        buf.update_memory_buffers(num_ranks=R, num_experts_per_rank=S, num_rdma_bytes=rdma_bytes)
    return buf


def _acquire_buffer(nixl_ep, device: torch.device, rank: int, R: int, S: int, M: int, H: int, timeout_ms: int,
                    store, rdma_bytes: Optional[int]) -> _SharedBuffer:
    """Get or create the shared buffer for (device, rank, R, S); grow it to hold M tokens of H."""
    need = int(rdma_bytes) if rdma_bytes is not None else int(
        nixl_ep.Buffer.get_rdma_size_hint(M, H, R, R * S))
    key = (device.index if device.index is not None else -1, rank, R, S)
    with _LOCK:
        sh = _BUFFERS.get(key)
        if sh is None:
            buf = _new_buffer(nixl_ep, device, rank, R, S, need, timeout_ms, store)
            connected = torch.zeros(R, dtype=torch.int32, device=device)
            connected[rank] = 1
            sh = _SharedBuffer(key, buf, store, timeout_ms, need, torch.zeros(R, dtype=torch.int32, device=device),
                               connected)
            _BUFFERS[key] = sh
        else:
            if timeout_ms != sh.timeout_ms:
                log.warning("rank %d: the shared nixl_ep buffer keeps its timeout of %d ms (asked: %d ms)", rank,
                            sh.timeout_ms, timeout_ms)
            if need > sh.rdma_bytes:
                _grow(nixl_ep, sh, device, need)
        sh.users += 1
        return sh


def _grow(nixl_ep, sh: _SharedBuffer, device: torch.device, need: int) -> None:
    """Make ``sh`` hold ``need`` bytes. Collective: every peer grows its buffer the same way."""
    _, rank, R, S = sh.key
    try:
        with _device_ctx(device):
            sh.buffer.update_memory_buffers(num_ranks=R, num_experts_per_rank=S, num_rdma_bytes=need)
    except RuntimeError as exc:  # nixl_ep 1.4: "Multiple calls to update_memory_buffers are not supported"
        log.info("rank %d: re-creating the nixl_ep buffer at %d bytes (%s)", rank, need, exc)
        peers = sorted(sh.peers)
        with contextlib.suppress(Exception):
            sh.buffer.destroy()
        sh.buffer = _new_buffer(nixl_ep, device, rank, R, S, need, sh.timeout_ms, sh.store)
        sh.peers = set()
        if peers:
            sh.buffer.connect_ranks(peers)
            sh.peers = set(peers)
    sh.rdma_bytes = need


def release_buffers() -> None:
    """Destroy every shared ``nixl_ep`` buffer of this process (their dispatchers become unusable).

    Collective in spirit: peers still connected see this rank vanish. Not called at exit (a
    destroy that waits on a dead peer's transport could stall the interpreter's shutdown).
    """
    with _LOCK:
        for sh in list(_BUFFERS.values()):
            with contextlib.suppress(Exception):
                sh.buffer.destroy()
        _BUFFERS.clear()


# ---------------------------------------------------------------------------------------- the dispatcher
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

    ``timeout_s`` becomes nixl_ep's kernel timeout (``timeout_ms``), fixed when the shared buffer
    is created. Calls must run with this dispatcher's device current (as SGLang does).
    """

    kind = "nixl"

    def __init__(self, *, store=None, connect: bool = True, num_rdma_bytes: Optional[int] = None,
                 kernel_backend: str = "auto", **kw) -> None:
        nixl_ep = import_nixl_ep()
        device = torch.device(kw.get("device", "cuda"))
        _check_gpu_device(device, "nixl")
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        kw["device"] = device
        kw.setdefault("dtype", torch.bfloat16)
        super().__init__(**kw)
        if self.dtype != torch.bfloat16:
            raise ValueError(f"nixl_ep dispatches bfloat16 tokens (use_fp8 for fp8), got dtype {self.dtype}")
        if store is None:
            raise ValueError("the nixl GPU dispatcher needs store= (a torch.distributed.TCPStore, the same on "
                             "every rank): nixl_ep exchanges its metadata through it")
        if num_rdma_bytes is not None and int(num_rdma_bytes) <= 0:
            raise ValueError(f"num_rdma_bytes must be > 0, got {num_rdma_bytes}")
        self._nixl = nixl_ep
        self._idx_dtype = getattr(nixl_ep, "topk_idx_t", torch.int64)  # int32 in the nixl 1.4 wheels
        self._init_gpu_path(kernel_backend)
        self._closed = False
        self._shared = _acquire_buffer(nixl_ep, self.device, self.rank, self.num_ranks, self.num_local_experts,
                                       self.max_tokens_per_rank, self.hidden, max(1, int(round(self.timeout_s * 1e3))),
                                       store, num_rdma_bytes)
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
        with _LOCK:
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
        with _LOCK, _device_ctx(self.device):
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
            with _LOCK:
                self._shared.users -= 1

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this nixl dispatcher is closed")
