"""The process-wide ``nixl_ep.Buffer`` of the nixl GPU dispatcher, and how deaths reach its mask.

One buffer per (device, rank, R, S), lock-protected: every dispatcher of the process (SGLang makes
one per MoE layer) shares it, and it grows when a dispatcher needs more memory
(``update_memory_buffers``, or a collective re-creation where the installed nixl_ep allows only one
call).

**Deaths reach the device mask.** nixl_ep's kernels read the mask buffer (``is_rank_masked``) before
each send to a peer and before each receive wait, but not inside the wait loop (nixl 1.4,
``nixl_ep_ll.cu``): a peer masked on the host is skipped by every later call at once, while a call
already waiting on it ends by the kernel timeout (``timeout_ms``), which then masks it itself. So
:meth:`SharedBuffer.watch` masks a connected peer (``update_mask_buffer(rank, True)``) the moment the
process knows it is dead: from the :class:`~sglang_elastic.state.ElasticEPState` (``failed``
events, fed by the membership watch) and from a :class:`~sglang_elastic.transport.Liveness`
(its deaths are recorded in the state, which masks). A rejoin goes through ``set_peers``
(``connect_ranks`` unmasks). The timeout stays the backstop for a peer that is alive but silent.
"""
from __future__ import annotations

import contextlib
import logging
import threading
import weakref
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Set, Tuple

import torch

__all__ = ["SharedBuffer", "acquire_buffer", "release_buffers", "device_ctx", "LOCK"]

log = logging.getLogger(__name__)

@dataclass
class SharedBuffer:
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
    watched: Any = field(default_factory=weakref.WeakSet)  # states whose deaths this buffer masks

    def mask_dead(self, ranks, why: str = "") -> None:
        """Mask connected peers ``ranks`` in nixl_ep's device mask (later calls skip them at once)."""
        dev = self.key[0]
        ctx = torch.cuda.device(dev) if dev >= 0 and torch.cuda.is_available() else contextlib.nullcontext()
        with LOCK, ctx:  # listeners run on the thread that recorded the death, not the serving one
            for r in sorted(set(int(x) for x in ranks) & self.peers):
                try:
                    self.buffer.update_mask_buffer(r, True)
                except Exception as exc:  # a destroyed/broken buffer: the kernel timeout still masks
                    log.warning("rank %d: could not mask dead peer %d in nixl_ep (%s: %s)", self.key[1], r,
                                type(exc).__name__, exc)
                else:
                    log.info("rank %d: peer %d masked in nixl_ep (%s)", self.key[1], r, why or "dead")

    def watch(self, state, liveness=None) -> None:
        """Mask peers as soon as ``state`` records them failed; record ``liveness`` deaths in ``state``.

        Idempotent per state (SGLang builds one dispatcher per layer over one buffer). Listeners
        hold this buffer weakly and run on the thread that recorded the death.
        """
        from .gpu_path import link_liveness

        link_liveness(liveness, state)
        with LOCK:
            if state in self.watched:
                return
            self.watched.add(state)
        me = weakref.ref(self)

        def on_event(event) -> None:
            sh = me()
            if sh is not None and event.kind == "failed":
                sh.mask_dead(event.ranks, event.reason)

        state.add_listener(on_event)


LOCK = threading.RLock()
_BUFFERS: Dict[Tuple[int, int, int, int], SharedBuffer] = {}


def device_ctx(device: torch.device):
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _new_buffer(nixl_ep, device: torch.device, rank: int, R: int, S: int, rdma_bytes: int, timeout_ms: int, store):
    with device_ctx(device):
        buf = nixl_ep.Buffer(rank=rank, low_latency_mode=True, explicitly_destroy=True, tcp_store_group=store,
                             timeout_ms=timeout_ms)
        buf.update_memory_buffers(num_ranks=R, num_experts_per_rank=S, num_rdma_bytes=rdma_bytes)
    return buf


def acquire_buffer(nixl_ep, device: torch.device, rank: int, R: int, S: int, M: int, H: int, timeout_ms: int,
                    store, rdma_bytes: Optional[int]) -> SharedBuffer:
    """Get or create the shared buffer for (device, rank, R, S); grow it to hold M tokens of H."""
    need = int(rdma_bytes) if rdma_bytes is not None else int(
        nixl_ep.Buffer.get_rdma_size_hint(M, H, R, R * S))
    key = (device.index if device.index is not None else -1, rank, R, S)
    with LOCK:
        sh = _BUFFERS.get(key)
        if sh is None:
            buf = _new_buffer(nixl_ep, device, rank, R, S, need, timeout_ms, store)
            connected = torch.zeros(R, dtype=torch.int32, device=device)
            connected[rank] = 1
            sh = SharedBuffer(key, buf, store, timeout_ms, need, torch.zeros(R, dtype=torch.int32, device=device),
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


def _grow(nixl_ep, sh: SharedBuffer, device: torch.device, need: int) -> None:
    """Make ``sh`` hold ``need`` bytes. Collective: every peer grows its buffer the same way."""
    _, rank, R, S = sh.key
    try:
        with device_ctx(device):
            sh.buffer.update_memory_buffers(num_ranks=R, num_experts_per_rank=S, num_rdma_bytes=need)
    except RuntimeError as exc:  # nixl_ep 1.4: "Multiple calls to update_memory_buffers are not supported"
        log.info("rank %d: re-creating the nixl_ep buffer at %d bytes (%s)", rank, need, exc)
        peers = sorted(sh.peers)
        with contextlib.suppress(Exception):  # the old buffer is dropped either way; a new one replaces it
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
    with LOCK:
        for sh in list(_BUFFERS.values()):
            with contextlib.suppress(Exception):  # best effort: the process is giving the buffers up
                sh.buffer.destroy()
        _BUFFERS.clear()
