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
from ..location.background import BackgroundUpdater, SharedThreads
from ..location.repair import lost_experts, lost_on_rank, repair_target
from ..location.updater import ChunkReport, ExpertLocationUpdater, staging_name
from ..state import ElasticEPStateManager as _OurManager
from . import context
from . import eplb as _eplb
from .state import bump_placement_version
from .updater_io import default_store as _default_store
from .updater_io import default_transport as _default_transport
from .updater_io import patch_metadata_row as _patch_metadata_row

__all__ = ["LayerwiseBridge", "ElasticExpertLocationUpdater", "UpdateSummary"]

log = logging.getLogger(__name__)

TransportFactory = Callable[[int, torch.device], object]


@dataclass
class UpdateSummary(ChunkReport):
    """What one :meth:`LayerwiseBridge.update` did, summed over its chunks (logged as one line):
    the chunks' figures plus the experts left for SGLang to reload from disk and the wall time."""

    missing: Dict[int, List[int]] = field(default_factory=dict)
    seconds: float = 0.0

    def add(self, rep: ChunkReport) -> None:
        """Add one chunk's figures."""
        self.copies_remote += rep.copies_remote
        self.copies_local += rep.copies_local
        self.restored += rep.restored
        self.bytes_moved += rep.bytes_moved
        self.replans += rep.replans

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
        background: per-layer :class:`~sglang_elastic.location.background.BackgroundUpdater` s sharing
            one transport thread, mark poller and store connection pair; ``update(..., background=True)``
            starts a layer's transfer and :meth:`tick` (once per forward pass) commits it.
        store: the store for the background updaters' ready marks (SGLang's TCPStore).
    """

    def __init__(self, rank: int, make_transport: TransportFactory, *, backup: bool = True,
                 timeout_s: float = 30.0, vote=None, liveness=None, background: bool = False,
                 store=None) -> None:
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
        self.background, self._store = bool(background), store
        self._threads: Optional[SharedThreads] = None
        self._builds = 0
        self.moving: List[int] = []  # layers whose transfer runs beside serving (begun, not committed)

    # ------------------------------------------------------------------ entry point
    def update(self, weights_of_layer: Dict[int, List[torch.Tensor]], old_p2l: torch.Tensor, new_p2l: torch.Tensor,
               layer_ids: Sequence[int], num_logical: int, ranks_per_node: Optional[int] = None,
               background: bool = False) -> Tuple[Dict[int, List[int]], Dict[int, Placement], UpdateSummary]:
        """Move this rank's weights of ``layer_ids`` from ``old_p2l`` to ``new_p2l`` (SGLang maps, ``[L, P]``).

        Collective over the live ranks. Returns ``(missing, applied, summary)``: logical experts per
        layer this rank must reload from disk, and the placements applied where they differ from
        ``new_p2l`` (a peer died mid-update, or the target used a dead rank).

        ``background`` (a background bridge, called once per forward pass on every rank alike): a
        layer with nothing to reload from disk only starts moving (it joins :attr:`moving`; its
        weights and ``applied`` come at the :meth:`tick` that commits it); a layer with experts only
        disk can restore moves and commits now (SGLang reloads them right after this call).
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
            if background and self.background and not lost:
                upd.begin(target, self._on_failure(upd, l, summary))  # the transfer runs on the shared thread
                if l not in self.moving:
                    self.moving.append(l)
                continue
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

    def tick(self) -> List[Tuple[int, Placement, ChunkReport]]:
        """One forward-pass boundary of the layers :attr:`moving` (every rank calls it at the same
        passes): each layer's updater commits its chunk when every live rank's transfer ended before
        the previous boundary (weights swapped in from staging, staging freed after). Returns
        ``(layer, placement now in force, report)`` per layer committed here, for the caller to
        install SGLang's metadata of exactly those layers (the routing table changes only then)."""
        out = []
        for l in list(self.moving):
            upd = self.updaters[l]
            rep = upd.step()
            if upd.done:
                self.moving.remove(l)
                out.append((l, upd.placement, rep or ChunkReport(layers=[l])))
        return out

    def _abandon(self) -> None:
        """Drop the layers still moving and close the old background updaters (a rebuild: nothing of
        them was committed, so SGLang's metadata and the weights still agree on the old placement)."""
        if self.moving:
            log.warning("[sglang_elastic] layers %s were moving when the updater was rebuilt: kept as they were",
                        self.moving)
        self.moving = []
        for upd in self.updaters.values():
            if isinstance(upd, BackgroundUpdater):
                upd.close()

    def _new_updater(self, l: int, weights, current: Placement, live: np.ndarray, ranks_per_node):
        kw = dict(layers_per_chunk=1, ranks_per_node=ranks_per_node, backup=self.backup, timeout_s=self.timeout_s,
                  vote=self.vote, liveness=self.liveness)
        if not self.background:
            upd = ExpertLocationUpdater(self.rank, self.transport, weights, current, live, **kw)
            self._share_staging(upd, weights)
            return upd
        if self._threads is None:
            if self._store is None:
                raise RuntimeError("the background bridge needs a store for ready marks")
            self._threads = SharedThreads(self._store, f"sgle-sglang-{self.rank}")
        # Keys unique per build: a rebuilt layer's marks never meet the previous build's. The synchronous
        # staging stays allocated, one buffer shared by all layers as in synchronous mode (the fault path
        # moves layers synchronously; a peer must never see that staging shrink).
        upd = BackgroundUpdater(self.rank, self.transport, weights, current, live, shared=self._threads, depth=1,
                                prefix=f"sgle/sglang/b{self._builds}/L{l}", keep_sync_staging=True, **kw)
        self._share_staging(upd, weights)
        return upd

    def _build(self, live: np.ndarray, weights_of_layer, old_p2l: torch.Tensor, ranks_per_node) -> None:
        """New per-layer updaters from SGLang's metadata, and a full backup refill (collective)."""
        device = next(iter(weights_of_layer.values()))[0].device
        self._abandon()
        if self.transport is None:
            self.transport = self._make_transport(self.rank, device)
        self.transport.set_peers(np.flatnonzero(live).tolist())
        R = live.shape[0]
        self.live, self._rpn = live.copy(), ranks_per_node
        self.updaters = {}
        self._refill = set()
        self._builds += 1
        for l in sorted(weights_of_layer):
            current = Placement.from_sglang(old_p2l[l:l + 1], R, self._E, live)
            weights = {_weight_name(l, i): t.unsqueeze(0) for i, t in enumerate(weights_of_layer[l])}
            self.updaters[l] = self._new_updater(l, weights, current, live, ranks_per_node)
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

    def _on_failure(self, upd: ExpertLocationUpdater, layer: int, summary: UpdateSummary):
        """The failure hook of ``layer``'s update: the state and Liveness learn the deaths, the target
        is repaired over the survivors."""
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

        return on_failure

    def _move_layer(self, upd: ExpertLocationUpdater, layer: int, target: Placement, summary: UpdateSummary) -> None:
        """Move and commit ``layer`` now (the synchronous path)."""
        on_failure = self._on_failure(upd, layer, summary)
        if isinstance(upd, BackgroundUpdater):
            self.moving = [l for l in self.moving if l != layer]
            for rep in upd.update_now(target, on_failure):
                summary.add(rep)
            return
        upd.begin(target, on_failure)
        while not upd.done:
            rep = upd.step()
            if rep is None:
                break
            summary.add(rep)


class ElasticExpertLocationUpdater:
    """Drop-in for ``sglang.srt.eplb.expert_location_updater.ExpertLocationUpdater`` (same constructor
    and ``update`` contract), backed by :class:`LayerwiseBridge`.

    Background mode (``--elastic-eplb-background``, default on), for calls SGLang's
    ``EPLBManager.on_forward_pass_end`` makes (periodic EPLB, one chunk per forward pass): the call
    first commits the layers whose transfers every rank finished (their weights and SGLang's
    metadata rows, hence the routing tables, change together), then starts this chunk's transfer
    and returns; :meth:`on_forward_pass_end` (the plugin's AROUND hook on that method) commits at
    later passes what is still moving after SGLang's last call. Other callers (the fault path,
    drains, post-scale rebalances) move and commit inside the call.
    """

    # Tests (and tools) may swap in another transport factory: (rank, device) -> Transport.
    transport_factory: TransportFactory = staticmethod(_default_transport)
    store_factory: Callable[[], object] = staticmethod(_default_store)

    def __init__(self) -> None:
        self._bridge: Optional[LayerwiseBridge] = None
        self._targets: Dict[int, object] = {}  # layer moving -> the SGLang metadata its commit installs
        self._ticked = False                   # this forward pass's boundary was taken inside update()
        self._rank = 0
        context.get().eplb_updaters.add(self)

    def on_forward_pass_end(self) -> None:
        """After SGLang's ``EPLBManager.on_forward_pass_end``: this pass's boundary, unless an
        ``update()`` in it took it already (one boundary per forward pass on every rank)."""
        if self._ticked:
            self._ticked = False
        elif self._bridge is not None and self._bridge.moving:
            self._commit_ready()

    def _commit_ready(self) -> None:
        """Take this forward pass's boundary: install SGLang's metadata of each layer committed."""
        from sglang.srt.eplb.expert_location import get_global_expert_location_metadata

        done = self._bridge.tick()
        if not done:
            return
        old = get_global_expert_location_metadata()
        summary = UpdateSummary(layers=[l for l, _, _ in done])
        for layer, placement, rep in done:
            new_meta = self._targets.pop(layer)
            wanted = new_meta.physical_to_logical_map_cpu[layer]
            if not torch.equal(placement.phy2log[0], wanted):
                _patch_metadata_row(new_meta, layer, placement, self._rank)
            old.update(new_meta, update_layer_ids=[layer])
            summary.add(rep)
        bump_placement_version()  # the routing tables follow the committed rows, now
        ctx = context.get()
        _record(ctx, summary, reporter=self._rank == min(np.flatnonzero(self._bridge.live).tolist(), default=self._rank))
        log.info("[sglang_elastic] updater rank %d committed in background: %s", self._rank, summary.line())

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
            bg = opts.elastic_eplb_background
            self._bridge = LayerwiseBridge(rank, type(self).transport_factory, backup=opts.elastic_backup_store,
                                           timeout_s=opts.elastic_transfer_timeout, liveness=ctx.liveness,
                                           background=bg, store=type(self).store_factory() if bg else None)
        self._rank = rank
        # In the background only from EPLBManager's forward-pass loop; a post-scale rebalance
        # (flat topology) must install every chunk before NIXL resumes (SGLang barriers after each).
        background = self._bridge.background and ctx.in_forward_pass_end and not use_flat_topology
        if background and not self._ticked:
            self._ticked = True
            self._commit_ready()  # this pass's boundary: what finished moving commits first
        R = old.ep_size
        rpn = R // nnodes if nnodes > 1 and not use_flat_topology and R % nnodes == 0 else None
        missing, applied, summary = self._bridge.update(
            routed_experts_weights_of_layer, old.physical_to_logical_map_cpu,
            new_expert_location_metadata.physical_to_logical_map_cpu, list(update_layer_ids),
            old.num_logical_experts, rpn, background=background)
        moving = set(self._bridge.moving)
        self._targets = {l: m for l, m in self._targets.items() if l in moving and l not in update_layer_ids}
        self._targets.update({l: new_expert_location_metadata for l in update_layer_ids if l in moving})
        now = [l for l in update_layer_ids if l not in moving]
        for layer, placement in applied.items():
            _patch_metadata_row(new_expert_location_metadata, layer, placement, rank)
        if now:
            old.update(new_expert_location_metadata, update_layer_ids=now)
        bump_placement_version()  # rewrites the routing hook's device tables now (graph replays run no Python)
        _record(ctx, summary, reporter=rank == min(np.flatnonzero(self._bridge.live).tolist(), default=rank))
        ctx.flush_degraded_tokens()  # between forward passes, on the scheduler thread: the one host sync for it
        log.info("[sglang_elastic] updater rank %d: %s", rank, summary.line())
        return missing


def around_forward_pass_end(original, manager, *args, **kwargs):
    """AROUND hook of SGLang's ``EPLBManager.on_forward_pass_end`` (once per forward pass on every
    rank): SGLang's own step (which may call ``update()``), then our updaters' boundary for the
    layers still moving (see :class:`ElasticExpertLocationUpdater`)."""
    ctx = context.get()
    ctx.in_forward_pass_end = True
    try:
        result = original(manager, *args, **kwargs)
    finally:
        ctx.in_forward_pass_end = False
    for upd in list(ctx.eplb_updaters):
        upd.on_forward_pass_end()
    return result


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
