"""The dispatcher contract and the host-path machinery shared by the torch, NIXL and Mooncake backends.

A dispatcher moves one MoE layer's tokens to the ranks holding their experts and the results back::

    out = d.dispatch(hidden_states, topk_ids, topk_weights, layer=l)   # DispatchOutput
    y = run_experts(out.hidden_states, out.masked_m)                     # [S, R * M, H]
    hidden = d.combine(y, out.handle)                                    # [T, H]

``DispatchOutput`` is SGLang's DeepEP low-latency format: ``hidden_states [S, R * M, H]`` (``S``
local experts, ``R`` ranks, ``M = max_tokens_per_rank``) holding expert ``e``'s rows in
``[e, :masked_m[e]]``, with fp8 scales ``[S, R * M, H / 128]`` when ``use_fp8``.

Failure contract (every backend): a peer that dies or freezes never makes ``dispatch``/``combine``
raise. Within ``timeout_s`` the call gives up on it, marks it failed in the
:class:`~sglang_elastic.state.ElasticEPState` (so the next call routes around it), and finishes with
what the live ranks sent. Pairs that went to or came from the failed peer are counted in
``stats`` (``DispatchStats``) and their tokens follow the degraded policy: renormalised over the
token's other experts. Bad input raises ``ValueError`` before any communication.
"""
from __future__ import annotations

import logging
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch

from ..eplb.placement import Placement
from ..state import ElasticEPState, ElasticEPStateManager
from ..transport.liveness import Liveness
from . import layout
from .routing import POLICIES, RoutingTable, Routed, renormalize, route

__all__ = ["DispatchOutput", "DispatchHandle", "DispatchStats", "Dispatcher", "HostDispatcher", "Exchange"]

log = logging.getLogger(__name__)

# Per-peer header on the wire: (sequence number, phase, S counts).
_SEQ, _PHASE, _HDR = 0, 1, 2
PHASE_DISPATCH, PHASE_COMBINE = 1, 2


@dataclass
class DispatchStats:
    """Counters of degraded work, cumulative over a dispatcher's life (host integers).

    Attributes:
        affected_tokens: tokens with a pair whose expert had no live replica (routing) or whose
            pair was lost to a peer that failed during the call.
        rerouted_pairs: pairs sent to another expert by the ``reroute`` policy.
        dropped_pairs: pairs dropped (their token renormalised over its remaining experts).
        lost_pairs: pairs whose destination failed during the call (subset of dropped).
        peer_failures: peers this dispatcher gave up on.
    """

    affected_tokens: int = 0
    rerouted_pairs: int = 0
    dropped_pairs: int = 0
    lost_pairs: int = 0
    peer_failures: int = 0

    def as_dict(self) -> Dict[str, int]:
        return dict(self.__dict__)


@dataclass
class DispatchHandle:
    """What :meth:`Dispatcher.combine` needs from the matching dispatch (opaque to callers)."""

    layer: int
    num_tokens: int
    dtype: torch.dtype
    routed: Routed
    plan: Optional[layout.SendPlan] = None
    recv_counts: Optional[torch.Tensor] = None   # [R, S] rows received per source and local expert
    recv_pos: Optional[torch.Tensor] = None      # [N] flat layout row of each received row
    peers: Tuple[int, ...] = ()                   # ranks exchanged with in dispatch
    lost_from: Tuple[int, ...] = ()               # peers that failed during dispatch
    backend: object = None                         # backend-specific (e.g. nixl_ep's handle)


@dataclass
class DispatchOutput:
    """SGLang's DeepEP low-latency dispatch output, plus what we add.

    Attributes:
        hidden_states: ``[S, R * M, H]``, the dispatch dtype (fp8 e4m3 with ``use_fp8``).
        hidden_states_scale: float32 ``[S, R * M, H / 128]`` with fp8, else ``None``.
        masked_m: int32 ``[S]`` valid rows per local expert.
        expected_m: a hint for the grouped GEMM (mean rows per local expert, at least 1).
        topk_ids: int64 ``[T, K]`` physical slot of each of this rank's pairs (``-1`` dropped).
        topk_weights: float32 ``[T, K]`` combine weights after the degraded policy.
        handle: pass to :meth:`Dispatcher.combine`.
        stats: int64 ``[3]`` for this call's routing (affected tokens, rerouted, dropped pairs).
    """

    hidden_states: torch.Tensor
    hidden_states_scale: Optional[torch.Tensor]
    masked_m: torch.Tensor
    expected_m: int
    topk_ids: torch.Tensor
    topk_weights: torch.Tensor
    handle: DispatchHandle
    stats: torch.Tensor
    format: str = field(default="deepep_low_latency")


class Dispatcher(ABC):
    """Routes, dispatches and combines one layer's tokens over the EP group; see the module docstring.

    Args:
        rank, num_ranks: this rank and the EP size ``R`` (rank ids ``0..R-1``; dead ones included).
        num_local_experts: physical slots per rank ``S``.
        hidden: hidden size ``H``.
        num_topk: ``K``.
        max_tokens_per_rank: ``M``, the most tokens one rank dispatches per call.
        placement: the expert placement in force (:meth:`set_placement` replaces it).
        state: the live-rank state (default: the process-wide ``ElasticEPStateManager`` instance,
            or all ranks live if none was initialised).
        policy: degraded-token policy, ``"renormalize"`` or ``"reroute"``.
        use_fp8: quantise dispatched rows to fp8 e4m3 with per-128 block scales.
        dtype: dtype of the hidden states (and of combine's output).
        device: where tokens live.
        timeout_s: how long a call waits for a silent peer before giving up on it.
        record_load: add the router's demand to :attr:`load` ``[L, E]`` each dispatch.
    """

    kind = "base"

    def __init__(self, *, rank: int, num_ranks: int, num_local_experts: int, hidden: int, num_topk: int,
                 max_tokens_per_rank: int, placement: Optional[Placement] = None,
                 state: Optional[ElasticEPState] = None, policy: str = "renormalize", use_fp8: bool = False,
                 dtype: torch.dtype = torch.bfloat16, device: Union[str, torch.device] = "cpu",
                 timeout_s: float = 5.0, record_load: bool = True) -> None:
        for name, v in (("num_ranks", num_ranks), ("num_local_experts", num_local_experts), ("hidden", hidden),
                        ("num_topk", num_topk), ("max_tokens_per_rank", max_tokens_per_rank)):
            if int(v) < 1:
                raise ValueError(f"{name} must be >= 1, got {v}")
        if not 0 <= rank < num_ranks:
            raise ValueError(f"rank {rank} is outside the EP group of {num_ranks} ranks")
        if policy not in POLICIES:
            raise ValueError(f"unknown degraded-token policy {policy!r}; choose one of {', '.join(POLICIES)}")
        if use_fp8 and hidden % layout.FP8_BLOCK:
            raise ValueError(f"use_fp8 needs hidden divisible by {layout.FP8_BLOCK}, got {hidden}")
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self.rank, self.num_ranks = int(rank), int(num_ranks)
        self.num_local_experts, self.hidden, self.num_topk = int(num_local_experts), int(hidden), int(num_topk)
        self.max_tokens_per_rank = int(max_tokens_per_rank)
        self.policy, self.use_fp8, self.dtype = policy, bool(use_fp8), dtype
        self.device = torch.device(device)
        self.timeout_s = float(timeout_s)
        self.record_load = record_load
        self.stats = DispatchStats()
        if state is None:
            state = ElasticEPStateManager.instance()
        if state is None:
            state = ElasticEPState(self.num_ranks, device=self.device)
        if state.ep_size < self.num_ranks:
            raise ValueError(f"the elastic state tracks {state.ep_size} ranks, the dispatcher needs {self.num_ranks}")
        self.state = state
        self.table: Optional[RoutingTable] = None
        self.load: Optional[torch.Tensor] = None
        if placement is not None:
            self.set_placement(placement)

    # ------------------------------------------------------------------ placement and load
    def set_placement(self, placement: Union[Placement, RoutingTable]) -> None:
        """Route with ``placement`` from the next call on (its R and S must match the dispatcher's)."""
        table = placement if isinstance(placement, RoutingTable) else RoutingTable.from_placement(placement, self.device)
        if table.num_ranks != self.num_ranks or table.slots_per_rank != self.num_local_experts:
            raise ValueError(f"placement is for {table.num_ranks} ranks x {table.slots_per_rank} slots, the dispatcher "
                             f"has {self.num_ranks} x {self.num_local_experts}")
        if self.table is not None and self.table.log2phy.shape[:2] != table.log2phy.shape[:2] and self.load is not None:
            self.load = None
        self.table = RoutingTable(table.log2phy.to(self.device), table.num_ranks, table.slots_per_rank)
        if self.load is None:
            self.load = torch.zeros(table.num_layers, table.num_experts, dtype=torch.int64, device=self.device)

    def take_load(self) -> torch.Tensor:
        """Return the recorded load ``[L, E]`` and start a new window."""
        out = self.load.clone()
        self.load.zero_()
        return out

    @property
    def live_mask(self) -> torch.Tensor:
        """The state's ``active_ranks`` (read in place by routing)."""
        return self.state.active_ranks[: self.num_ranks]

    # ------------------------------------------------------------------ validation
    def _check_inputs(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, layer: int,
                      router_logits: Optional[torch.Tensor]) -> None:
        if self.table is None:
            raise ValueError("no placement: call set_placement() before dispatch")
        if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.shape[1] != self.hidden:
            raise ValueError(f"hidden_states must be [tokens, {self.hidden}], got "
                             f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
        if x.dtype != self.dtype:
            raise ValueError(f"hidden_states dtype {x.dtype} != the dispatcher's {self.dtype}")
        T = x.shape[0]
        if T > self.max_tokens_per_rank:
            raise ValueError(f"{T} tokens exceed max_tokens_per_rank={self.max_tokens_per_rank} (the buffer size)")
        if topk_ids.shape != (T, self.num_topk) or topk_weights.shape != (T, self.num_topk):
            raise ValueError(f"topk_ids and topk_weights must be [{T}, {self.num_topk}], got "
                             f"{tuple(topk_ids.shape)} and {tuple(topk_weights.shape)}")
        if topk_ids.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"topk_ids must be int32 or int64, got {topk_ids.dtype}")
        if not topk_weights.is_floating_point():
            raise ValueError(f"topk_weights must be floating point, got {topk_weights.dtype}")
        for name, t in (("hidden_states", x), ("topk_ids", topk_ids), ("topk_weights", topk_weights)):
            if t.device != self.device and not (t.device.type == self.device.type == "cuda"):
                raise ValueError(f"{name} is on {t.device}, the dispatcher on {self.device}")
        if not 0 <= layer < self.table.num_layers:
            raise ValueError(f"layer {layer} out of range [0, {self.table.num_layers})")
        E = self.table.num_experts
        if T and (bool((topk_ids >= E).any()) or bool((topk_ids < -1).any())):
            bad = topk_ids[(topk_ids >= E) | (topk_ids < -1)][0].item()
            raise ValueError(f"expert id {bad} out of range [0, {E}) (-1 marks an unused pair)")
        if router_logits is not None and router_logits.shape != (T, E):
            raise ValueError(f"router_logits must be [{T}, {E}], got {tuple(router_logits.shape)}")

    def _route(self, x, topk_ids, topk_weights, layer, router_logits) -> Routed:
        return route(topk_ids, topk_weights, self.table, layer, self.live_mask,
                     token_offset=self.rank * self.max_tokens_per_rank, policy=self.policy,
                     router_logits=router_logits, load=self.load[layer] if self.record_load else None)

    # ------------------------------------------------------------------ API
    @abstractmethod
    def dispatch(self, hidden_states: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, *,
                 layer: int = 0, router_logits: Optional[torch.Tensor] = None,
                 check_inputs: bool = True) -> DispatchOutput:
        """Route ``topk_ids`` (logical experts) and send each pair's token to its expert's rank."""

    @abstractmethod
    def combine(self, expert_output: torch.Tensor, handle: DispatchHandle) -> torch.Tensor:
        """Send expert outputs ``[S, R * M, H]`` back and return ``[T, H]`` weighted sums (dispatch dtype)."""

    def close(self) -> None:
        """Release buffers and connections. Idempotent."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _account(self, routed: Routed) -> None:
        s = routed.stats.tolist()
        self.stats.affected_tokens += s[0]
        self.stats.rerouted_pairs += s[1]
        self.stats.dropped_pairs += s[2]

    def _peer_failed(self, ranks: Sequence[int], why: str) -> None:
        ranks = [r for r in ranks if self.state.is_alive(r)]
        if ranks:
            log.warning("rank %d: dispatcher gives up on rank(s) %s: %s", self.rank, ranks, why)
            self.stats.peer_failures += len(ranks)
            self.state.mark_failed(ranks, reason=f"{self.kind} dispatcher: {why}")


class Exchange(ABC):
    """Pairwise exchange of (header, rows) with every peer, each pair failing on its own.

    ``run`` sends ``sends[p] = (header int64 [2 + S], rows uint8 [n, W])`` to each peer ``p`` and
    returns what each peer sent this rank; a peer that does not deliver within the deadline is
    returned in ``failed`` and left out. Headers carry the sender's ``n`` per local expert, so the
    receiver knows every size before reading rows. Row widths are fixed per phase.
    """

    @abstractmethod
    def run(self, seq: int, phase: int, sends: Dict[int, Tuple[torch.Tensor, torch.Tensor]], row_bytes: int,
            deadline: float) -> Tuple[Dict[int, Tuple[torch.Tensor, torch.Tensor]], List[int]]:
        """Exchange with the peers in ``sends`` (never this rank); see the class docstring."""

    def set_peers(self, ranks: Sequence[int], rebuild: bool = False) -> None:
        """Membership changed: connect new peers, forget departed ones (collective where needed).

        ``rebuild``: also drop and re-form the connections to peers that stay (collective: every
        member passes it at the same point), e.g. when a peer this rank gave up on was re-admitted
        because membership kept it (a timeout on a slow peer may have left pairs unusable, or
        message counters out of step)."""

    def close(self) -> None:
        """Release everything."""


class HostDispatcher(Dispatcher):
    """A dispatcher whose bytes move through an :class:`Exchange` of whole rows (host-path backends).

    Each call exchanges with every live peer (empty rows included): the all-to-all of headers is
    what lets every rank notice a dead peer within one call, and what keeps single receive buffers
    safe without a barrier as long as dispatch and combine alternate. Overlapped micro-batches
    (dispatch a, dispatch b, combine a, ...) need two receive buffers per phase (the one-sided
    exchanges default to two) or the per-pair message order of the gloo exchange.

    ``liveness``: the process's :class:`~sglang_elastic.transport.Liveness` (a private one when
    omitted); the exchange's waits end at once on a peer known dead there, and deaths the exchange
    sees itself are recorded in it.
    """

    def __init__(self, exchange: Optional[Exchange], *, liveness: Optional[Liveness] = None, **kw) -> None:
        super().__init__(**kw)
        if liveness is not None and not isinstance(liveness, Liveness):
            raise ValueError(f"liveness must be a sglang_elastic.transport.Liveness, got {type(liveness).__name__}")
        self.liveness = liveness if liveness is not None else Liveness()
        self.exchange = exchange
        self._seq = 0
        H = self.hidden
        item = torch.empty((), dtype=self.dtype).element_size()
        self.dispatch_row_bytes = H + 4 * (H // layout.FP8_BLOCK) if self.use_fp8 else H * item
        self.combine_row_bytes = H * item

    def _live_peers(self) -> List[int]:
        cpu = self.state.active_ranks_cpu[: self.num_ranks]
        return [r for r in torch.nonzero(cpu, as_tuple=False).flatten().tolist() if r != self.rank]

    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        """Dispatch rows as bytes ``[n, W]`` (fp8 rows carry their scales after the payload)."""
        if self.use_fp8:
            q, s = layout.quantize_fp8(x)
            return torch.cat([q.view(torch.uint8), s.contiguous().view(torch.uint8)], dim=1)
        return x.contiguous().view(torch.uint8).reshape(x.shape[0], self.dispatch_row_bytes)

    def _exchange(self, phase: int, peers: Sequence[int], counts: torch.Tensor, rows: torch.Tensor, row_bytes: int):
        """Send each peer ``p`` its rows (``rows`` is grouped by rank, ``counts [R, S]`` rows per rank and
        local expert) with a header; returns ``(got, failed, starts)``, ``starts`` each rank's first row."""
        starts = [0]
        for n in counts.sum(1).tolist():
            starts.append(starts[-1] + n)
        self._seq += 1
        sends = {}
        for p in peers:
            hdr = torch.empty(_HDR + self.num_local_experts, dtype=torch.int64)
            hdr[_SEQ], hdr[_PHASE] = self._seq, phase
            hdr[_HDR:] = counts[p]
            sends[p] = (hdr, rows[starts[p]:starts[p + 1]])
        if not sends:
            return {}, [], starts
        got, failed = self.exchange.run(self._seq, phase, sends, row_bytes, time.monotonic() + self.timeout_s)
        return got, failed, starts

    def dispatch(self, hidden_states, topk_ids, topk_weights, *, layer=0, router_logits=None, check_inputs=True):
        if check_inputs:
            self._check_inputs(hidden_states, topk_ids, topk_weights, layer, router_logits)
        R, S, M, H = self.num_ranks, self.num_local_experts, self.max_tokens_per_rank, self.hidden
        routed = self._route(hidden_states, topk_ids, topk_weights, layer, router_logits)
        self._account(routed)
        plan = layout.send_plan(routed.phys, R, S)
        rows = self._rows(hidden_states.index_select(0, plan.tokens))
        peers = self._live_peers()
        # Pairs routed to a rank that is no longer in the live view (it died between routing and
        # here) are treated like pairs lost to a failed peer.
        got, failed, starts = self._exchange(PHASE_DISPATCH, peers, plan.counts, rows, self.dispatch_row_bytes)
        recv_counts = torch.zeros(R, S, dtype=torch.int64)
        chunks = []
        for s in range(R):
            if s == self.rank:
                recv_counts[s] = plan.counts[s]
                chunks.append(rows[starts[s]:starts[s + 1]])
            elif s in got:
                hdr, data = got[s]
                recv_counts[s] = hdr[_HDR:]
                chunks.append(data)
        pos, masked_m = layout.recv_positions(recv_counts.to(self.device), M)
        recv = torch.cat(chunks) if chunks else rows[:0]
        W = self.dispatch_row_bytes
        buf = torch.zeros(S * R * M, W, dtype=torch.uint8, device=self.device)
        buf[pos] = recv
        if self.use_fp8:
            hs = buf[:, :H].contiguous().view(torch.float8_e4m3fn).view(S, R * M, H)
            scale = buf[:, H:].contiguous().view(torch.float32).view(S, R * M, H // layout.FP8_BLOCK)
        else:
            hs, scale = buf.view(self.dtype).view(S, R * M, H), None
        lost = [p for p in peers if p not in got] + [p for p in failed if p not in peers]
        if failed:
            self._peer_failed(failed, f"it failed or fell silent during dispatch (timeout {self.timeout_s}s)")
        handle = DispatchHandle(layer, hidden_states.shape[0], self.dtype, routed, plan, recv_counts, pos,
                                tuple(p for p in peers if p in got), tuple(lost))
        n_valid = int(masked_m.sum())
        expected = max(1, -(-n_valid // S))
        return DispatchOutput(hs, scale, masked_m.to(torch.int32), expected, routed.phys, routed.weights, handle,
                              routed.stats)

    def combine(self, expert_output, handle):
        R, S, M, H = self.num_ranks, self.num_local_experts, self.max_tokens_per_rank, self.hidden
        if expert_output.shape != (S, R * M, H):
            raise ValueError(f"expert_output must be [{S}, {R * M}, {H}], got {tuple(expert_output.shape)}")
        if expert_output.dtype != self.dtype:
            raise ValueError(f"expert_output dtype {expert_output.dtype} != the dispatcher's {self.dtype}")
        y = expert_output.reshape(S * R * M, H)
        back = y.index_select(0, handle.recv_pos).contiguous().view(torch.uint8).view(-1, self.combine_row_bytes)
        got, failed, starts = self._exchange(PHASE_COMBINE, handle.peers, handle.recv_counts, back,
                                             self.combine_row_bytes)
        if failed:
            self._peer_failed(failed, f"it failed or fell silent during combine (timeout {self.timeout_s}s)")
        plan, routed = handle.plan, handle.routed
        T, K = routed.phys.shape
        per_dst = plan.rank_rows().tolist()
        arrived = torch.zeros(plan.order.shape[0], dtype=torch.bool, device=self.device)
        rows = torch.zeros(plan.order.shape[0], self.combine_row_bytes, dtype=torch.uint8, device=self.device)
        o = 0
        for d in range(R):
            n = per_dst[d]
            if n:
                if d == self.rank:
                    rows[o:o + n] = back[starts[d]:starts[d + 1]]
                    arrived[o:o + n] = True
                elif d in got and got[d][1].shape[0] == n:
                    rows[o:o + n] = got[d][1]
                    arrived[o:o + n] = True
            o += n
        pair_out = torch.zeros(T * K, H, dtype=self.dtype, device=self.device)
        pair_out[plan.order] = rows.view(self.dtype).view(-1, H)
        weights = routed.weights
        n_lost = int((~arrived).sum())
        if n_lost:
            ok = torch.zeros(T * K, dtype=torch.bool, device=self.device)
            ok[plan.order] = arrived
            ok = ok.view(T, K)
            lost_tok = (~ok & (routed.phys >= 0)).any(1)
            weights = renormalize(weights, ok)
            self.stats.lost_pairs += n_lost
            self.stats.dropped_pairs += n_lost
            self.stats.affected_tokens += int((lost_tok & ~routed.affected).sum())
        return layout.weighted_sum(pair_out.view(T, K, H), weights, self.dtype)
