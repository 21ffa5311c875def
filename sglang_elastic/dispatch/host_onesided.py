"""Host-path dispatchers over one-sided writes: ``nixl`` (NIXL agent, UCX) and ``mooncake`` (Mooncake
TransferEngine, TCP on CPU), both behind :class:`~sglang_elastic.dispatch.base.HostDispatcher`.

Each rank registers one buffer at start and never again; a message is ``[rows | slot]`` moved by
**one** one-sided WRITE into the sender's own block on the receiver, double-buffered so that two
micro-batches may overlap; peers join and leave without rebuilding anything. The buffer layout,
wire format and failure handling are described in :mod:`sglang_elastic.dispatch.host.onesided`;
the bytes move through the transport's endpoints (:mod:`sglang_elastic.dispatch.host.nixl`,
:mod:`sglang_elastic.dispatch.host.mooncake`). A death known to the process's
:class:`~sglang_elastic.transport.Liveness` (``liveness=``) ends every wait on that peer at once.
"""
from __future__ import annotations

from typing import Optional, Sequence

from ..transport import Liveness
from .base import _HDR, PHASE_COMBINE, PHASE_DISPATCH, HostDispatcher
from .host.mooncake import MooncakeHostExchange
from .host.nixl import NixlHostExchange

__all__ = ["NixlHostExchange", "MooncakeHostExchange", "NixlHostDispatcher", "MooncakeHostDispatcher"]


class _OneSidedDispatcher(HostDispatcher):
    _exchange_cls = None

    def __init__(self, *, store, connect_timeout_s: float = 60.0, host: str = "127.0.0.1", connect: bool = True,
                 ns: Optional[str] = None, exchange_opts: Optional[dict] = None, liveness: Optional[Liveness] = None,
                 **kw) -> None:
        self._exchange_cls._import()  # ImportError naming the package, before anything else
        if store is None:
            raise ValueError(f"the {self.kind} dispatcher needs a torch.distributed.Store (e.g. the orchestrator's "
                             "TCPStore)")
        super().__init__(None, liveness=liveness, **kw)
        opts = dict(exchange_opts or {})
        if self.kind == "mooncake":
            opts.setdefault("host", host)
        self.exchange = self._exchange_cls(
            self.rank, self.num_ranks, store, cap=self.max_tokens_per_rank * min(self.num_topk, self.num_local_experts),
            widths={PHASE_DISPATCH: self.dispatch_row_bytes, PHASE_COMBINE: self.combine_row_bytes},
            hdr_len=_HDR + self.num_local_experts, device=self.device, connect_timeout_s=connect_timeout_s, ns=ns,
            liveness=self.liveness, **opts)
        if connect:  # a joining rank may connect later; peers are also connected on first contact
            self.set_peers(self.state.live_ranks())

    def set_peers(self, ranks: Sequence[int], rebuild: bool = False) -> None:
        """Connect ``ranks`` and forget the other peers (not collective; nothing is rebuilt unless
        ``rebuild``, which every member passes together: see :meth:`Exchange.set_peers`)."""
        self.exchange.set_peers(ranks, rebuild)

    def close(self) -> None:
        if self.exchange is not None:
            self.exchange.close()


class NixlHostDispatcher(_OneSidedDispatcher):
    """The host-path ``nixl`` dispatcher: ``store`` is a ``torch.distributed.Store`` served outside the
    ranks; ``exchange_opts`` go to :class:`NixlHostExchange` (``backends``, ``num_threads``,
    ``progress_thread``); see :class:`~sglang_elastic.dispatch.base.Dispatcher` for the rest."""

    kind = "nixl"
    _exchange_cls = NixlHostExchange


class MooncakeHostDispatcher(_OneSidedDispatcher):
    """The host-path ``mooncake`` dispatcher: ``store`` is a ``torch.distributed.Store`` served outside
    the ranks; ``host`` is the address the engine listens on; ``exchange_opts`` go to
    :class:`MooncakeHostExchange` (``protocol``, ``device_name``); see
    :class:`~sglang_elastic.dispatch.base.Dispatcher` for the rest."""

    kind = "mooncake"
    _exchange_cls = MooncakeHostExchange
