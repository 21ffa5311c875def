"""Layerwise, chunked application of a new expert placement over a transport (``docs/location.md``).

One :meth:`ExpertLocationUpdater.step` moves the weights of ``layers_per_chunk`` layers and commits
them, so SGLang's ``EPLBManager`` (or the rehearsal) runs forward passes between chunks. Per chunk:
plan from *live* sources (orphans from the backup store, or from the checkpoint with ``reload``),
copy everything into staging (:meth:`~ExpertLocationUpdater._stage`), agree that every copy landed
(the vote), then write the staged rows and stamp the layers (:meth:`~ExpertLocationUpdater._commit_staged`).
The background updater (:mod:`.background`) runs the same two halves apart. A peer's death ends
every wait at once (the process's :class:`~sglang_elastic.transport.Liveness`): nothing of the chunk
is committed anywhere, ``on_failure`` gives the new live set and target, and the chunk is planned
again. Plans are deterministic, so every rank agrees on the copies without talking about them.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..eplb.placement import Placement, as_live_mask
from ..membership.agreement import StoreVote  # re-exported: the vote lived here before
from ..transport.base import Copy, PeerFailure, Transport
from ..transport.liveness import Liveness
from .backup import BackupLayout, assign_backups, backup_tensor_name
from .commit_rule import backup_copies
from .plan import plan_transfers

__all__ = ["ExpertLocationUpdater", "UpdateFailure", "ChunkReport", "StoreVote", "staging_name"]

log = logging.getLogger(__name__)


def staging_name(weight_name: str) -> str:
    """Name of the staging buffer registered for ``weight_name``."""
    return f"staging/{weight_name}"


#: Times :meth:`ExpertLocationUpdater._execute` retries copies that failed with every rank alive.
TRANSIENT_RETRIES = 2


class _Transient(RuntimeError):
    """A copy failed but every rank is alive: retry the chunk."""


class UpdateFailure(RuntimeError):
    """The update cannot proceed (e.g. an expert lost every replica and its backup)."""


@dataclass
class ChunkReport:
    """What one :meth:`ExpertLocationUpdater.step` did."""

    layers: List[int]
    copies_remote: int = 0
    copies_local: int = 0
    restored: int = 0
    bytes_moved: int = 0
    replans: int = 0
    failed_ranks: List[int] = field(default_factory=list)


FailureHook = Callable[[List[int]], Tuple[np.ndarray, Placement]]
"""``on_failure(dead_ranks) -> (live_mask, new_target)``: called after a PeerFailure."""

ReloadFn = Callable[[int, int], Dict[str, torch.Tensor]]
"""``reload(layer, expert) -> {weight_name: tensor}``: one expert's weights from the checkpoint."""


@dataclass
class Staged:
    """One chunk planned into a staging buffer: the copies that fill it, and what its commit writes."""

    layers: List[int]
    new: torch.Tensor                                         # target phy2log rows of the chunk
    copies: List[Copy]
    rows: Tuple[List[torch.Tensor], List[torch.Tensor]]      # (weight rows, staging rows) of this rank, views
    report: ChunkReport
    future: Optional[Placement] = None                        # the placement once it commits (background)


class ExpertLocationUpdater:
    """Moves this rank's expert weights from ``current`` to ``target`` a chunk of layers at a time.

    Args:
        rank: this rank's global id.
        transport: a :class:`Transport` shared by all ranks taking part.
        weights: this rank's expert weights by name, each ``[layers, slots_per_rank, ...]``.
        current: the placement the weights match now.
        live_ranks: mask of live ranks now.
        layers_per_chunk: layers moved and committed per :meth:`step` (``>= 1``).
        ranks_per_node: prefer same-node sources, spread backups over nodes.
        backup: keep a backup store (host memory) for orphan restores.
        backup_rows: rows each rank allocates for backups (default: enough for every expert plus the
            re-homing room of :func:`~sglang_elastic.location.backup.assign_backups`); fewer rows
            cover the most exposed experts and count the rest in :attr:`stats`.
        canary: after each chunk, check every slot's checksum against the expected expert's.
        checksum: ``(layer, expert) -> float`` reference checksums for the canary (required with it).
        timeout_s: per-chunk transfer timeout before a silent peer counts as failed.
        vote: agreement hook ``vote(key, live_ranks, suspected) -> (dead, all_ok)`` (e.g.
            :class:`~sglang_elastic.membership.StoreVote`); required when ranks can fail, so that all
            survivors abandon the same chunk. A vote with a ``liveness`` attribute set to ``None`` is
            lent this updater's.
        generation: membership generation this updater starts in (see :meth:`set_live`).
        liveness: the process's :class:`~sglang_elastic.transport.Liveness` (default: a private one).
        reload: ``reload(layer, expert) -> {weight_name: tensor}`` reads one expert from the checkpoint;
            used for an expert with no live replica and no live backup (two nodes lost at once, rows
            ran short), on the rank whose slot receives it. Without it such an update raises
            :class:`UpdateFailure`.

    Attributes:
        stats: ``backups_uncovered`` (experts without a backup now, because the backup rows ran
            out), ``backup_shortfalls`` (re-homings that could not cover every expert),
            ``experts_reloaded`` ((layer, expert) pairs restored from the checkpoint, counted on
            every rank), ``backup_copies_failed`` (backup fills or re-homings whose copies kept
            failing with every rank alive: served on without those backups).
    """

    def __init__(
        self,
        rank: int,
        transport: Transport,
        weights: Dict[str, torch.Tensor],
        current: Placement,
        live_ranks: Optional[Sequence] = None,
        *,
        layers_per_chunk: int = 1,
        ranks_per_node: Optional[int] = None,
        backup: bool = True,
        backup_rows: Optional[int] = None,
        canary: bool = False,
        checksum: Optional[Callable[[int, int], float]] = None,
        timeout_s: float = 10.0,
        vote: Optional[Callable[[str, List[int], List[int]], Tuple[List[int], bool]]] = None,
        generation: int = 0,
        liveness: Optional[Liveness] = None,
        reload: Optional[ReloadFn] = None,
    ) -> None:
        if not isinstance(layers_per_chunk, int) or isinstance(layers_per_chunk, bool) or layers_per_chunk < 1:
            raise ValueError(f"layers_per_chunk must be an integer >= 1, got {layers_per_chunk!r}")
        if not weights:
            raise ValueError("weights must name at least one expert weight tensor")
        L, S = current.num_layers, current.slots_per_rank
        for name, t in weights.items():
            if t.dim() < 2 or t.shape[0] != L or t.shape[1] != S:
                raise ValueError(f"weights[{name!r}] has shape {tuple(t.shape)}, expected [{L}, {S}, ...]")
        if backup_rows is not None and (not isinstance(backup_rows, int) or isinstance(backup_rows, bool)
                                        or backup_rows < 1):
            raise ValueError(f"backup_rows must be an integer >= 1, got {backup_rows!r}")
        if canary and checksum is None:
            raise ValueError("canary mode needs a checksum(layer, expert) reference")
        self.rank = rank
        self.transport = transport
        self.weights = weights
        self.placement = current
        self.live = as_live_mask(live_ranks, current.num_ranks) if live_ranks is not None else current.live_ranks.numpy()
        if not self.live[rank]:
            raise ValueError(f"rank {rank} is not live in the given mask")
        self.layers_per_chunk = layers_per_chunk
        self.ranks_per_node = ranks_per_node
        self.canary = canary
        self.checksum = checksum
        self.timeout_s = timeout_s
        self.liveness = liveness if liveness is not None else Liveness()
        if vote is not None and getattr(vote, "liveness", False) is None:
            vote.liveness = self.liveness
        self.vote = vote
        self.generation = generation
        self.reload = reload
        self.stats: Dict[str, int] = {"backups_uncovered": 0, "backup_shortfalls": 0, "experts_reloaded": 0,
                                      "backup_copies_failed": 0}
        self._seq = 0
        self.target: Optional[Placement] = None
        self._pending: List[int] = []
        self._on_failure: Optional[FailureHook] = None
        rows = L * S
        self._staging: Dict[str, torch.Tensor] = {}
        for name, t in weights.items():
            transport.register(name, t.view(rows, -1))
            stage = torch.empty((layers_per_chunk * S,) + tuple(t.shape[2:]), dtype=t.dtype, device=t.device)
            self._staging[name] = stage
            transport.register(staging_name(name), stage.view(stage.shape[0], -1))
        self.backup_layout: Optional[BackupLayout] = None
        self._backup: Dict[str, torch.Tensor] = {}
        if backup:
            self.backup_layout = assign_backups(current, self.live, ranks_per_node, rows_per_rank=backup_rows,
                                                degrade=True)
            self._count_uncovered(self.backup_layout)
            cap = self.backup_layout.rows_per_rank
            for name, t in weights.items():
                buf = torch.empty((cap,) + tuple(t.shape[2:]), dtype=t.dtype, device="cpu")
                self._backup[name] = buf
                transport.register(backup_tensor_name(name), buf.view(cap, -1))

    # ----------------------------------------------------------------- sizes
    @property
    def bytes_per_expert(self) -> int:
        """Bytes of one expert across all weight tensors."""
        return sum(t[0, 0].numel() * t.element_size() for t in self.weights.values())

    def backup_bytes(self) -> int:
        """Host memory this rank spends on the backup store."""
        return sum(b.numel() * b.element_size() for b in self._backup.values())

    @property
    def degraded(self) -> bool:
        """True while some expert has no backup because the backup rows ran out."""
        return self.stats["backups_uncovered"] > 0

    # ---------------------------------------------------------------- backup
    def fill_backup(self, layers: Optional[Sequence[int]] = None) -> int:
        """(Re)fill backups of ``layers`` (default all) from live replicas; collective. Returns rows filled.

        Called at start-up (and by a joiner); afterwards backups follow commits and failures through
        re-homing. A backup with no live replica to copy from keeps what it has (it may be the only
        copy). A peer's death raises :class:`PeerFailure` naming it (agreed by the vote); the backups
        being filled are then unassigned, so the next :meth:`set_live` assigns and fills them again.
        """
        if self.backup_layout is None:
            return 0
        lids = range(self.placement.num_layers) if layers is None else layers
        pairs = [(l, e) for l in lids for e in torch.nonzero(self.backup_layout.holder[l] >= 0).flatten().tolist()]
        copies, lost = self._backup_copies(pairs)
        try:
            self._execute(copies)
        except (PeerFailure, _Transient) as exc:
            holder, keep = self.backup_layout.holder, set(lost)
            for l, e in pairs:
                if (l, e) not in keep:  # half-written or never written: not a valid copy
                    holder[l, e] = -1
            if isinstance(exc, PeerFailure):
                raise
            self._backups_failed(exc)  # every rank alive, copies kept failing: serve without them
            return 0
        return len(copies) // max(len(self.weights), 1)

    def _backups_failed(self, exc: BaseException) -> None:
        """Backup copies kept failing with every rank alive (e.g. an overloaded host past the copy
        timeout): the vote gave every rank this outcome, the pairs are unassigned on all of them,
        and serving goes on without those backups (a degraded mode, counted; the next re-homing
        assigns and fills them again). Insurance must never take serving down."""
        self.stats["backup_copies_failed"] += 1
        log.warning("rank %d: backup copies failed with every rank alive, going on without them: %s", self.rank, exc)

    def _backup_copies(self, pairs: Sequence[Tuple[int, int]]) -> Tuple[List[Copy], List[Tuple[int, int]]]:
        """Copies filling the backups of ``(layer, expert)`` pairs from live replicas of the committed
        placement (one replica per pair, rotating so sources spread), and the pairs with no live replica."""
        layout = self.backup_layout
        return backup_copies(self.placement, self.live, layout.holder, layout.row, list(self.weights),
                             [list(p) for p in pairs])

    # ---------------------------------------------------------------- update
    def begin(self, target: Placement, on_failure: Optional[FailureHook] = None) -> List[int]:
        """Start moving to ``target``; returns the layers that will change, in chunk order."""
        if target.phy2log.shape != self.placement.phy2log.shape:
            raise ValueError(
                f"target placement has shape {tuple(target.phy2log.shape)}, current {tuple(self.placement.phy2log.shape)}"
            )
        # Upstream placements may hold an expert twice on a rank: wasteful, but valid to apply. A live
        # rank the target leaves empty is being drained (planned scale-down): it serves as a source
        # until the update completes, then leaves.
        serving = self.live & target.live_ranks.numpy()
        target.validate(serving, allow_duplicates=True)
        self.target = target
        self._on_failure = on_failure
        changed = (target.phy2log != self.placement.phy2log).any(1)
        self._pending = torch.nonzero(changed).flatten().tolist()
        return list(self._pending)

    @property
    def done(self) -> bool:
        """True when no layer is left to move."""
        return not self._pending

    def step(self) -> Optional[ChunkReport]:
        """Move and commit the next chunk of layers; ``None`` when the update is complete."""
        if not self._pending:
            return None
        chunk = self._pending[: self.layers_per_chunk]
        report = ChunkReport(layers=list(chunk))
        retries = 0
        while True:
            try:
                self._move_chunk(chunk, report)
                break
            except _Transient as exc:
                retries += 1
                if retries > 3:
                    raise UpdateFailure(f"chunk {chunk} kept failing with every rank alive: {exc}") from exc
                self.transport.set_peers(np.flatnonzero(self.live).tolist(), rebuild=True)  # every rank: the vote said so
            except PeerFailure as exc:
                dead = sorted(set(exc.ranks))
                while True:
                    report.failed_ranks.extend(r for r in dead if r not in report.failed_ranks)
                    report.replans += 1
                    try:
                        self._handle_failure(dead)
                        break
                    except PeerFailure as again:  # another death while re-homing after the first
                        dead = sorted(set(dead) | set(again.ranks))
                # The target may have changed: recompute which layers of the chunk still need work.
                chunk = [l for l in chunk if not torch.equal(self.target.phy2log[l], self.placement.phy2log[l])]
        self._pending = [l for l in self._pending if not torch.equal(self.target.phy2log[l], self.placement.phy2log[l])]
        return report

    def run(self) -> Iterator[ChunkReport]:
        """Generator: one chunk per ``next()``, for SGLang's EPLBManager-style interleaving."""
        while True:
            rep = self.step()
            if rep is None:
                return
            yield rep

    def update(self, target: Placement, on_failure: Optional[FailureHook] = None) -> List[ChunkReport]:
        """Apply ``target`` completely (all chunks back to back)."""
        self.begin(target, on_failure)
        return list(self.run())

    # -------------------------------------------------------------- internals
    def set_live(self, live_ranks: Sequence, generation: Optional[int] = None) -> None:
        """Adopt a new live set (collective over the new live ranks).

        Tells the transport, drops dead ranks' slots from the committed placement (their weights are
        gone), and re-homes backups the dead ranks held, filling them from live replicas.
        ``generation`` (e.g. the membership epoch) restarts the vote numbering so that a rank that
        just joined, with a fresh updater built with the same ``generation``, agrees on it.
        """
        live = as_live_mask(live_ranks, self.placement.num_ranks)
        if not live[self.rank]:
            raise UpdateFailure(f"rank {self.rank} was declared dead")
        if generation is not None:
            self.generation, self._seq = generation, 0
        self.live = live
        self.transport.set_peers(np.flatnonzero(live).tolist(), rebuild=True)  # after a failure some groups broke
        phy = self.placement.phy2log.clone()
        phy.view(phy.shape[0], self.placement.num_ranks, -1)[:, torch.from_numpy(~live)] = -1
        self.placement = Placement(phy, self.placement.num_ranks, self.placement.num_logical_experts)
        if self.backup_layout is not None:
            try:
                self._rehome()
            except _Transient as exc:  # the moved backups were unassigned on every rank alike
                self._backups_failed(exc)
        if self.target is not None:
            changed = (self.target.phy2log != self.placement.phy2log).any(1)
            self._pending = torch.nonzero(changed).flatten().tolist()

    def _handle_failure(self, dead: List[int]) -> None:
        if self._on_failure is None:
            raise UpdateFailure(f"rank(s) {dead} failed during the update and no on_failure hook was given")
        live, target = self._on_failure(dead)
        target.validate(as_live_mask(live, self.placement.num_ranks), allow_duplicates=True)
        self.target = target
        self.set_live(live)

    def _refill_rehomed(self, prev: BackupLayout) -> None:
        """Fill backups whose holder or row changed from live replicas (collective). A backup with no
        live replica to copy from is lost: its holder becomes ``-1`` so a restore fails loudly."""
        layout = self.backup_layout
        moved = layout.refills(prev).nonzero().tolist()
        copies, lost = self._backup_copies(moved)
        holder = layout.holder.clone()
        for l, e in lost:
            holder[l, e] = -1
        self.backup_layout = BackupLayout(holder, layout.row, layout.rows_per_rank, layout.uncovered)
        try:
            self._execute(copies)
        except (PeerFailure, _Transient):
            # Every rank abandons this refill (the vote agreed): none of the moved backups holds a
            # valid copy, so unassign them all; the next re-homing assigns and fills them again.
            for l, e in moved:
                holder[l, e] = -1
            raise

    def _rehome(self) -> None:
        """Re-home backups for the committed placement and live set: off dead ranks and off the ranks
        that now serve their expert (collective). Never raises for lack of rows: degrades."""
        prev = self.backup_layout
        layout = assign_backups(self.placement, self.live, self.ranks_per_node, previous=prev,
                                rows_per_rank=prev.rows_per_rank, degrade=True)
        self._count_uncovered(layout)
        self.backup_layout = layout
        self._refill_rehomed(prev)

    def _count_uncovered(self, layout: BackupLayout) -> None:
        """Record (and warn once per change) how many experts the backup rows could not cover."""
        if layout.uncovered:
            if layout.uncovered != self.stats["backups_uncovered"]:
                log.warning("rank %d: backup store full (%d rows per rank, %d live ranks): %d experts have no "
                            "backup; the most exposed (fewest live replicas) are covered, serving goes on",
                            self.rank, layout.rows_per_rank, int(self.live.sum()), layout.uncovered)
            self.stats["backup_shortfalls"] += 1
        self.stats["backups_uncovered"] = layout.uncovered

    def _rehome_after_commit(self) -> None:
        """Keep every backup off the ranks that now serve its expert (collective)."""
        self._rehome()

    def _execute(self, copies: List[Copy]) -> None:
        """Run ``copies``; with a vote, every live rank learns the same outcome. A failure with every
        rank alive (e.g. a transport group closed by an earlier timeout) is retried on rebuilt peers
        by every rank together (the vote gave all of them the same verdict), a few times."""
        for attempt in range(TRANSIENT_RETRIES + 1):
            failed: List[int] = []
            involved = {c.src for c in copies} | {c.dst for c in copies}
            known = sorted(r for r in involved if self.liveness.is_dead(r))
            if known:  # a copy from or to a rank known dead cannot succeed: skip straight to the vote
                failed = known
            else:
                try:
                    self.transport.execute(copies, self.timeout_s)
                except PeerFailure as exc:
                    failed = list(exc.ranks)
                except (ValueError, RuntimeError) as exc:
                    if self.vote is None:
                        raise
                    # A failure of this rank's own (e.g. a peer's metadata read before that peer
                    # registered the buffers of this update, or a group found broken here): the
                    # peers must learn it from the vote, not wait out its timeout for a post that
                    # never comes. Naming itself, this rank makes the chunk fail for everyone
                    # alike, and every rank retries it together on renewed connections.
                    log.warning("rank %d: copies failed here: %s", self.rank, exc)
                    failed = [self.rank]
            if self.vote is None:
                if failed:
                    raise PeerFailure(failed[0], ranks=failed)
                return
            self._seq += 1
            live = np.flatnonzero(self.live).tolist()
            dead, all_ok = self.vote(f"{self.generation}/{self._seq}", live, failed)
            log.info("rank %d: vote %s/%d over %s (failed here %s): dead %s ok %s", self.rank, self.generation,
                     self._seq, live, failed, dead, all_ok)
            if dead:
                raise PeerFailure(dead[0], ranks=dead)
            if all_ok:
                return
            if attempt < TRANSIENT_RETRIES:
                self.transport.set_peers(live, rebuild=True)  # collective: every rank got the same verdict
        raise _Transient(f"copies failed on a live rank (suspected {failed or 'elsewhere'})")

    def _stage(self, chunk: List[int], stage: Dict[str, torch.Tensor], stage_name: Callable[[str], str]) -> Staged:
        """Plan ``chunk`` from live sources into staging ``stage`` (registered as ``stage_name(w)``):
        the copies to run (transfers, then orphans from their backups), orphans with no live replica
        and no live backup read from the checkpoint (``reload``) into this rank's staging rows now,
        and the index rows its commit writes. Pure of collectives: the same on every rank."""
        S = self.placement.slots_per_rank
        new = self.target.phy2log[chunk].clone()
        plan = plan_transfers(self.placement.phy2log[chunk], new, self.live, S, self.ranks_per_node)
        # Staging rows: each (chunk-local layer, destination slot) gets row li * S + local slot.
        copies: List[Copy] = []
        for (li, src, dst, e, p), ss in zip(plan.transfers.tolist(), plan.src_slots.tolist()):
            for name in self.weights:
                copies.append(Copy(src, dst, name, chunk[li] * S + ss % S, stage_name(name), li * S + p % S))
        restored = reloaded = 0
        layout = self.backup_layout
        for li, dst, e, p in plan.orphans.tolist():
            l = chunk[li]
            holder = -1 if layout is None else int(layout.holder[l, e])
            if holder >= 0 and self.live[holder]:
                for name in self.weights:
                    copies.append(Copy(holder, dst, backup_tensor_name(name), int(layout.row[l, e]),
                                       stage_name(name), li * S + p % S))
                restored += 1
                continue
            if self.reload is None:
                raise UpdateFailure(f"expert {e} of layer {l} lost every replica and its backup (holder rank "
                                    f"{holder}); reload it from the checkpoint")
            if dst == self.rank:  # the checkpoint is local to every rank: no peer takes part
                for name, t in self.reload(l, e).items():
                    stage[name][li * S + p % S].copy_(t)
            reloaded += 1
        self.stats["experts_reloaded"] += reloaded
        mine = [(li, p % S) for li, _, dst, _, p in plan.transfers.tolist() if dst == self.rank]
        mine += [(li, p % S) for li, dst, _, p in plan.orphans.tolist() if dst == self.rank]
        # Row views for the commit, made here so that it pays one fused copy (_foreach_copy_) and
        # nothing else: no index tensors, no temporaries, one release of the interpreter lock.
        rows: Tuple[List[torch.Tensor], List[torch.Tensor]] = ([], [])
        for name, w in self.weights.items():
            flat = w.view((-1,) + tuple(w.shape[2:]))
            rows[0].extend(flat[chunk[li] * S + p] for li, p in mine)
            rows[1].extend(stage[name][li * S + p] for li, p in mine)
        rep = ChunkReport(layers=list(chunk), restored=restored + reloaded)
        rep.copies_local = int((plan.transfers[:, 1] == plan.transfers[:, 2]).sum())
        rep.copies_remote = plan.num_remote()
        rep.bytes_moved = (rep.copies_remote + restored) * self.bytes_per_expert
        return Staged(list(chunk), new, copies, rows, rep)

    def _commit_staged(self, staged: Staged) -> None:
        """Write this rank's staged rows into the weights (one ``index_copy_`` per weight) and stamp the
        chunk's layers in the placement."""
        if staged.rows[0]:
            torch._foreach_copy_(staged.rows[0], staged.rows[1])
        if staged.future is not None:  # made on the transport thread (BackgroundUpdater)
            self.placement = staged.future
            return
        phy = self.placement.phy2log.clone()
        phy[staged.layers] = staged.new
        self.placement = Placement(phy, self.placement.num_ranks, self.placement.num_logical_experts)

    def _move_chunk(self, chunk: List[int], report: ChunkReport) -> None:
        staged = self._stage(chunk, self._staging, staging_name)
        self._execute(staged.copies)
        # All copies of the chunk arrived (execute is collective): write staged rows, then commit.
        self._commit_staged(staged)
        if self.backup_layout is not None:
            self._rehome_after_commit()
        for f in ("copies_local", "copies_remote", "restored", "bytes_moved"):
            setattr(report, f, getattr(report, f) + getattr(staged.report, f))
        if self.canary:
            self._check(chunk)

    def _check(self, layers: List[int]) -> None:
        S = self.placement.slots_per_rank
        for l in layers:
            for s in range(S):
                e = int(self.placement.phy2log[l, self.rank * S + s])
                if e < 0:
                    continue
                got = float(sum(float(w[l, s].double().sum()) for w in self.weights.values()))
                want = self.checksum(l, e)
                if not np.isclose(got, want, rtol=1e-6, atol=1e-6):
                    raise UpdateFailure(
                        f"canary: rank {self.rank} layer {l} slot {s} should hold expert {e} "
                        f"(checksum {want}) but has {got}"
                    )
