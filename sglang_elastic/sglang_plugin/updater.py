"""Our expert-location updater behind SGLang's ``ExpertLocationUpdater``.

SGLang calls ``ExpertLocationUpdater().update(routed_experts_weights_of_layer, new_metadata,
update_layer_ids, nnodes, rank)`` from every EP rank together, once per chunk of
``--eplb-rebalance-layers-per-chunk`` layers (periodic EPLB, the fault rebalance, the post-scale
rebalance), and reloads from disk (or its DRAM backup) the logical experts the call reports missing.

SGLang keeps each MoE layer's expert weights as separate tensors ``[S, ...]``, while our
:class:`~sglang_elastic.location.updater.ExpertLocationUpdater` moves ``[layers, S, ...]`` tensors.
:class:`LayerwiseBridge` therefore runs one of ours per MoE layer over zero-copy ``[1, S, ...]``
views of SGLang's tensors, all on one transport, with one staging buffer shared by every layer
(layers move one at a time on every rank). What that gives SGLang:

* sources are live ranks only (an expert with a live replica is never reported missing);
* experts with no live replica come from our host-memory backup store on a peer;
* only experts lost with their backup are reported missing, and only by the ranks whose new slots
  need them (SGLang then reloads exactly those from disk);
* a peer that dies mid-update is marked failed in the shared state and the layer is re-planned
  over the survivors (our algorithm repairs the target); SGLang's metadata gets what was applied.

Membership: deaths since the last call re-home backups (:meth:`ExpertLocationUpdater.set_live`);
joins (and the first call) rebuild the per-layer updaters from SGLang's metadata and refill the
backups, collectively. A joined rank's slots are taken to hold what SGLang's metadata says (a scale
joiner loads them from disk; a recovered rank too, and our dead-slot filler equals SGLang's trivial
placement); the next rebalance fills them from live peers.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..eplb.placement import Placement
from ..location.repair import lost_experts, lost_on_rank, repair_target
from ..location.updater import ChunkReport, ExpertLocationUpdater, staging_name
from ..state import ElasticEPStateManager as _OurManager
from . import context
from . import eplb as _eplb
from . import options
from .state import bump_placement_version

__all__ = ["LayerwiseBridge", "ElasticExpertLocationUpdater", "UpdateSummary"]

log = logging.getLogger(__name__)

TransportFactory = Callable[[int, torch.device], object]


@dataclass
class UpdateSummary(ChunkReport):
    """What one :meth:`LayerwiseBridge.update` did, summed over its chunks (logged as one line):
    the chunks' figures plus the experts left for SGLang to reload from disk and the wall time."""

    missing: Dict[int, List[int]] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def restored_from_backup(self) -> int:
        """Experts restored from the backup store (``restored``, under SGLang's log name)."""
        return self.restored

    def line(self) -> str:
        return (f"layers={self.layers} remote={self.copies_remote} local={self.copies_local} "
                f"restored_from_backup={self.restored_from_backup} bytes={self.bytes_moved} "
                f"replans={self.replans} failed_ranks={self.failed_ranks} "
                f"missing_reloaded_from_disk={self.missing} time={self.seconds:.3f}s")


def _weight_name(layer: int, index: int) -> str:
    return f"L{layer}.{index}"


class LayerwiseBridge:
    """One of our updaters per MoE layer over SGLang's per-layer weight tensors (see module docstring).

    Args:
        rank: this EP rank.
        make_transport: ``(rank, device) -> Transport``, called once.
        backup: keep the host-memory backup store.
        timeout_s: transfer timeout before a silent peer counts as failed.
        vote: optional agreement hook for our updater (e.g. :class:`~sglang_elastic.location.updater.StoreVote`).
        liveness: the process's :class:`~sglang_elastic.transport.Liveness` (the plugin context's),
            so a death known anywhere in the process ends the layer updaters' waits.
    """

    def __init__(self, rank: int, make_transport: TransportFactory, *, backup: bool = True,
                 timeout_s: float = 30.0, vote=None, liveness=None) -> None:
        self.rank = int(rank)
        self._make_transport = make_transport
        self.transport = None
        self.backup = backup
        self.timeout_s = timeout_s
        self.vote = vote
        self.liveness = liveness
        self.updaters: Dict[int, ExpertLocationUpdater] = {}
        self.live: Optional[np.ndarray] = None
        self._staging: Dict[Tuple, torch.Tensor] = {}
        self._rpn: Optional[int] = None
        self._E = 0
        # Layers whose lost experts SGLang reloads from disk after our call: their backups were filled
        # from slots that did not hold them yet, so they are refilled at the start of the next call.
        self._refill: set = set()

    # ------------------------------------------------------------------ entry point
    def update(self, weights_of_layer: Dict[int, List[torch.Tensor]], old_p2l: torch.Tensor, new_p2l: torch.Tensor,
               layer_ids: Sequence[int], num_logical: int, ranks_per_node: Optional[int] = None
               ) -> Tuple[Dict[int, List[int]], Dict[int, Placement], UpdateSummary]:
        """Move this rank's weights of ``layer_ids`` from ``old_p2l`` to ``new_p2l`` (SGLang maps, ``[L, P]``).

        Collective over the live ranks. Returns ``(missing, applied, summary)``: logical experts per
        layer this rank must reload from disk, and the placements applied where they differ from
        ``new_p2l`` (a peer died mid-update, or the target used a dead rank).
        """
        t0 = time.perf_counter()
        summary = UpdateSummary(layers=list(layer_ids))
        some = weights_of_layer[layer_ids[0]] if layer_ids else next(iter(weights_of_layer.values()))
        S = int(some[0].shape[0])
        P = int(old_p2l.shape[1])
        if P % S:
            raise ValueError(f"{P} physical slots are not a whole number of ranks of {S} local slots")
        R = P // S
        self._E = num_logical
        live = _eplb.live_mask(R)
        self._adopt(live, weights_of_layer, old_p2l, ranks_per_node, summary)
        self._refill_reloaded(old_p2l)
        missing: Dict[int, List[int]] = {}
        applied: Dict[int, Placement] = {}
        for l in layer_ids:
            self._sync_live(summary)
            upd = self.updaters[l]
            self._sync_committed(upd, old_p2l[l:l + 1])
            wanted = Placement.from_sglang(new_p2l[l:l + 1], R, num_logical, self.live)
            target = self._checked_target(wanted, l)
            lost = self._pretend_lost(upd, target)
            if lost:
                self._refill.add(l)
            mine = self._lost_on_rank(target, lost)
            if mine:
                missing[l] = mine
            self._move_layer(upd, l, target, summary)
            if not torch.equal(upd.target.phy2log, wanted.phy2log):
                applied[l] = upd.target
        summary.missing = missing
        summary.seconds = time.perf_counter() - t0
        return missing, applied, summary

    # ------------------------------------------------------------------ membership
    def _adopt(self, live: np.ndarray, weights_of_layer, old_p2l, ranks_per_node, summary: UpdateSummary) -> None:
        """First call or a join: (re)build every layer's updater; deaths only: re-home backups."""
        joined = self.live is None or bool((live & ~self.live).any()) or set(weights_of_layer) != set(self.updaters)
        if not live[self.rank]:
            raise RuntimeError(f"rank {self.rank} is not live in the elastic EP state")
        if joined or ranks_per_node != self._rpn:
            self._build(live, weights_of_layer, old_p2l, ranks_per_node)
            return
        if bool((self.live & ~live).any()):
            summary.failed_ranks.extend(np.flatnonzero(self.live & ~live).tolist())
            self.live = live
            self._sync_live(summary)

    def _refill_reloaded(self, old_p2l: torch.Tensor) -> None:
        """Refill the backups of layers SGLang reloaded from disk since the last call (collective)."""
        for l in sorted(self._refill):
            upd = self.updaters.get(l)
            if upd is not None:
                self._sync_committed(upd, old_p2l[l:l + 1])
                upd.fill_backup()
        self._refill.clear()

    def _sync_live(self, summary: UpdateSummary) -> None:
        """Bring every layer's updater to the bridge's live set (collective; re-homes backups)."""
        for upd in self.updaters.values():
            if not np.array_equal(upd.live, self.live):
                upd.set_live(self.live)

    def _build(self, live: np.ndarray, weights_of_layer, old_p2l: torch.Tensor, ranks_per_node) -> None:
        """New per-layer updaters from SGLang's metadata, and a full backup refill (collective)."""
        device = next(iter(weights_of_layer.values()))[0].device
        if self.transport is None:
            self.transport = self._make_transport(self.rank, device)
        self.transport.set_peers(np.flatnonzero(live).tolist())
        R = live.shape[0]
        self.live, self._rpn = live.copy(), ranks_per_node
        self.updaters = {}
        self._refill = set()
        for l in sorted(weights_of_layer):
            current = Placement.from_sglang(old_p2l[l:l + 1], R, self._E, live)
            weights = {_weight_name(l, i): t.unsqueeze(0) for i, t in enumerate(weights_of_layer[l])}
            upd = ExpertLocationUpdater(self.rank, self.transport, weights, current, live, layers_per_chunk=1,
                                        ranks_per_node=ranks_per_node, backup=self.backup,
                                        timeout_s=self.timeout_s, vote=self.vote, liveness=self.liveness)
            self._share_staging(upd, weights)
            self.updaters[l] = upd
        restored = sum(upd.fill_backup() for upd in self.updaters.values())
        log.info("[sglang_elastic] updater ready: %d layers, live ranks %s, %d backup rows filled on this rank's "
                 "peers", len(self.updaters), np.flatnonzero(live).tolist(), restored)

    def _share_staging(self, upd: ExpertLocationUpdater, weights: Dict[str, torch.Tensor]) -> None:
        """Point the updater's staging at one buffer per tensor shape, shared by all layers.

        Layers move one at a time on every rank, so one staging buffer serves all of them; without
        this, every layer would keep its own copy of a layer's expert weights on the GPU.
        """
        for name, t in weights.items():
            own = upd._staging[name]  # our updater's staging; registered under staging_name(name)
            key = (tuple(own.shape), own.dtype, own.device)
            shared = self._staging.setdefault(key, own)
            if shared is not own:
                upd._staging[name] = shared
                self.transport.register(staging_name(name), shared.view(shared.shape[0], -1))

    # ------------------------------------------------------------------ one layer
    def _sync_committed(self, upd: ExpertLocationUpdater, old_row: torch.Tensor) -> None:
        """Adopt SGLang's map where it differs from ours (a disk reload or broadcast rewrote weights)."""
        now = Placement.from_sglang(old_row, upd.placement.num_ranks, self._E, self.live)
        if not torch.equal(now.phy2log, upd.placement.phy2log):
            upd.placement = now

    def _checked_target(self, target: Placement, layer: int) -> Placement:
        """The target if every expert has a replica on a live rank, else our algorithm's repair of it."""
        load = context.get().last_load
        w = load[layer:layer + 1] if load is not None and load.shape[0] > layer else None
        fixed, repaired = repair_target(target, self.live, w, self._rpn)
        if repaired:
            log.warning("[sglang_elastic] layer %d: target used dead ranks; repaired over live ranks %s", layer,
                        np.flatnonzero(self.live).tolist())
        return fixed

    def _pretend_lost(self, upd: ExpertLocationUpdater, target: Placement) -> List[int]:
        """Experts of ``target`` only disk can restore (see :func:`~sglang_elastic.location.repair.lost_experts`);
        ``upd``'s committed placement is told they already sit in their target slots."""
        layout = upd.backup_layout
        lost, committed = lost_experts(upd.placement.phy2log[0], target.phy2log[0], self.live,
                                       layout.holder[0] if layout is not None else None, self._E)
        if lost:
            upd.placement = Placement(committed.unsqueeze(0), upd.placement.num_ranks,
                                      upd.placement.num_logical_experts)
        return lost

    def _lost_on_rank(self, target: Placement, lost: List[int]) -> List[int]:
        """The lost experts this rank's target slots hold (what this rank must reload)."""
        return lost_on_rank(target.phy2log[0], lost, self.rank, target.slots_per_rank)

    def _move_layer(self, upd: ExpertLocationUpdater, layer: int, target: Placement, summary: UpdateSummary) -> None:
        def on_failure(dead: List[int]):
            for d in dead:
                (self.liveness or context.get().liveness).mark_dead(d, "updater PeerFailure")
            mgr = _OurManager.instance()
            if mgr is not None:
                mgr.mark_failed([d for d in dead if mgr.is_alive(d)], reason="updater PeerFailure")
            self.live = self.live.copy()
            self.live[dead] = False
            summary.failed_ranks.extend(dead)
            return self.live, self._checked_target(upd.target, layer)

        upd.begin(target, on_failure)
        while not upd.done:
            rep = upd.step()
            if rep is None:
                break
            summary.copies_remote += rep.copies_remote
            summary.copies_local += rep.copies_local
            summary.restored += rep.restored
            summary.bytes_moved += rep.bytes_moved
            summary.replans += rep.replans


def _transport_kind(opts: options.PluginOptions) -> str:
    """``--elastic-transfer-backend``, with ``auto`` following ``--elastic-ep-backend``."""
    if opts.elastic_transfer_backend != "auto":
        return opts.elastic_transfer_backend
    try:
        from sglang.srt.runtime_context import get_exec

        backend = get_exec().moe.elastic_ep_backend
    except context.NOT_PUBLISHED:  # no runtime context published (a tool, a test): no elastic backend to follow
        backend = None
    return backend if backend in ("nixl", "mooncake") else "torch"


def _default_transport(rank: int, device: torch.device):
    """Our transport on SGLang's global TCPStore (kind from the flags)."""
    from sglang.srt.distributed.utils import get_global_tcp_store

    from ..transport import make_transport

    store = get_global_tcp_store()
    if store is None:
        raise RuntimeError("sglang_elastic's expert-weight transport needs SGLang's global TCPStore "
                           "(set by init_distributed_environment)")
    ctx = context.get()
    return make_transport(_transport_kind(ctx.options), rank, store, device=device, liveness=ctx.liveness)


class ElasticExpertLocationUpdater:
    """Drop-in for ``sglang.srt.eplb.expert_location_updater.ExpertLocationUpdater`` (same constructor
    and ``update`` contract), backed by :class:`LayerwiseBridge`."""

    # Tests (and tools) may swap in another transport factory: (rank, device) -> Transport.
    transport_factory: TransportFactory = staticmethod(_default_transport)

    def __init__(self) -> None:
        self._bridge: Optional[LayerwiseBridge] = None

    def update(self, routed_experts_weights_of_layer: Dict[int, List[torch.Tensor]], new_expert_location_metadata,
               update_layer_ids: List[int], nnodes: int, rank: int, use_flat_topology: bool = False
               ) -> Dict[int, List[int]]:
        """Apply ``new_expert_location_metadata`` to ``update_layer_ids``; returns the logical experts per
        layer this rank must reload from disk (upstream's contract). Commits SGLang's metadata."""
        from sglang.srt.eplb.expert_location import get_global_expert_location_metadata

        old = get_global_expert_location_metadata()
        if old is None:
            raise RuntimeError("no expert location metadata in force")
        if not update_layer_ids:
            return {}
        ctx = context.get()
        opts = ctx.options
        if self._bridge is None or self._bridge.rank != rank:
            self._bridge = LayerwiseBridge(rank, type(self).transport_factory, backup=opts.elastic_backup_store,
                                           timeout_s=opts.elastic_transfer_timeout, liveness=ctx.liveness)
        R = old.ep_size
        rpn = R // nnodes if nnodes > 1 and not use_flat_topology and R % nnodes == 0 else None
        missing, applied, summary = self._bridge.update(
            routed_experts_weights_of_layer, old.physical_to_logical_map_cpu,
            new_expert_location_metadata.physical_to_logical_map_cpu, list(update_layer_ids),
            old.num_logical_experts, rpn)
        for layer, placement in applied.items():
            _patch_metadata_row(new_expert_location_metadata, layer, placement, rank)
        old.update(new_expert_location_metadata, update_layer_ids=update_layer_ids)
        bump_placement_version()  # rewrites the routing hook's device tables now (graph replays run no Python)
        _record(ctx, summary, reporter=rank == min(np.flatnonzero(self._bridge.live).tolist(), default=rank))
        ctx.flush_degraded_tokens()  # between forward passes, on the scheduler thread: the one host sync for it
        log.info("[sglang_elastic] updater rank %d: %s", rank, summary.line())
        return missing


def _record(ctx: "context.PluginContext", summary: UpdateSummary, reporter: bool) -> None:
    """This rank's share of an update in the metrics: bytes and restorations are summed over ranks,
    each rank observes its own pause; the reporter (lowest live rank) closes a failover."""
    since, now = ctx.failover_since, time.monotonic()
    if since is not None:
        ctx.failover_since = None

    def update(m) -> None:
        m.add_bytes_moved(summary.bytes_moved)
        m.add_orphans_restored(summary.restored)
        m.observe_rebalance_pause(summary.seconds)
        if since is not None and reporter:
            m.observe_failover(now - since)

    ctx.record(update)


def _patch_metadata_row(meta, layer: int, placement: Placement, rank: int) -> None:
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
