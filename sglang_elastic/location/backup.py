"""Expert backup store: one host-memory copy of every (layer, logical expert), kept on a rank that
does not serve that expert (on another node when there is one), so that an expert whose every
replica dies can be restored from a peer instead of from disk.

The assignment of backups to ranks is pure and deterministic (every rank computes the same one);
the bytes live in one registered host tensor per weight name on each rank, ``[rows, ...]``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

import numpy as np
import torch

from ..eplb.placement import Placement, as_live_mask

__all__ = ["BackupLayout", "assign_backups", "backup_tensor_name"]


def backup_tensor_name(weight_name: str) -> str:
    """Name under which a rank registers its backup rows of ``weight_name`` with the transport."""
    return f"backup/{weight_name}"


@dataclass(frozen=True)
class BackupLayout:
    """Where the backup of each (layer, expert) lives.

    Attributes:
        holder: int64 ``[L, E]`` rank holding the backup (``-1``: none, e.g. no live rank qualifies).
        row: int64 ``[L, E]`` row in the holder's backup tensor.
        rows_per_rank: capacity each rank allocates (the same on every rank, so layouts can change
            without reallocating).
        uncovered: (layer, expert) pairs left without a backup because every live rank's rows were
            full (``assign_backups(..., degrade=True)``); 0 when every expert has one.
    """

    holder: torch.Tensor
    row: torch.Tensor
    rows_per_rank: int
    uncovered: int = 0

    def bytes_per_rank(self, bytes_per_expert: int) -> int:
        """Host memory each rank spends on backups."""
        return self.rows_per_rank * int(bytes_per_expert)

    def refills(self, prev: "BackupLayout") -> torch.Tensor:
        """Bool ``[L, E]``: the backups this layout needs copied, relative to ``prev``: every assigned
        pair whose (holder, row) changed. A pair kept on its holder but given another row counts: that
        row holds another pair's bytes (or none), not this one's."""
        return (self.holder >= 0) & ((self.holder != prev.holder) | (self.row != prev.row))

    def rows_of(self, rank: int) -> torch.Tensor:
        """``[k, 2]`` (layer, expert) pairs whose backup ``rank`` holds."""
        return (self.holder == rank).nonzero()


def assign_backups(
    placement: Placement,
    live_ranks: Optional[Union[torch.Tensor, np.ndarray, Sequence]] = None,
    ranks_per_node: Optional[int] = None,
    previous: Optional[BackupLayout] = None,
    rows_per_rank: Optional[int] = None,
    degrade: bool = False,
) -> BackupLayout:
    """Choose a backup holder for every (layer, expert).

    Preference, per (layer, expert): keep the previous holder if it is live, does not serve the expert
    now and is not on the only node (with ``ranks_per_node``) whose live ranks serve it; else a live
    rank that holds no replica of the expert, on a node holding none, with the fewest backups so far.
    So whenever the rows suffice, losing any one node (or rank) leaves every expert a live replica or
    a live backup. ``rows_per_rank`` defaults to ``ceil(L * E / (live - k)) + E`` with
    ``k = max(1, live // 8)``: room to re-home the backups of ``k`` dead ranks without reallocating.

    When the rows run out (more ranks died than the spare room covers), a :class:`ValueError` says
    so; with ``degrade=True`` (what a serving rank asks for: backups are insurance, never a reason to
    stop serving) the most exposed experts are covered first -- those with a single live replica,
    then two, ...; those with none come last, as no live replica can fill them -- and the rest are
    left without a backup (``holder == -1``), counted in :attr:`BackupLayout.uncovered`.
    """
    L, E, R = placement.num_layers, placement.num_logical_experts, placement.num_ranks
    live = as_live_mask(live_ranks, R) if live_ranks is not None else placement.live_ranks.numpy()
    n_live = int(live.sum())
    if n_live == 0:
        raise ValueError("no live rank to hold expert backups")
    spare = min(max(1, n_live // 8), n_live - 1)
    cap = rows_per_rank if rows_per_rank is not None else -(-L * E // (n_live - spare)) + E
    x = placement.by_rank().numpy()
    holds = np.zeros((L, R, E + 1), dtype=bool)  # rank r serves expert e in layer l
    li, ri = np.indices((L, R))
    holds[li[..., None], ri[..., None], x + 1] = True
    holds = holds[..., 1:]
    node = np.arange(R) // ranks_per_node if ranks_per_node else np.arange(R)
    M = int(node.max()) + 1
    node_holds = np.zeros((L, M, E), dtype=bool)
    np.logical_or.at(node_holds, (li, node[ri]), holds)

    holder = np.full((L, E), -1, dtype=np.int64)
    row = np.full((L, E), -1, dtype=np.int64)
    used = np.zeros(R, dtype=np.int64)
    taken = np.zeros((R, cap), dtype=bool)
    # An expert whose every replica is on one node (counting live ranks only) must keep its backup
    # off that node: a whole-node loss (one power supply, one switch) would take both.
    live_node_holds = np.zeros((L, M, E), dtype=bool)
    np.logical_or.at(live_node_holds, (li, node[ri]), holds & live[None, :, None])
    one_node = live_node_holds.sum(1) == 1                                   # [L, E]
    if previous is not None:
        ph, pr = previous.holder.numpy(), previous.row.numpy()
        phc = np.maximum(ph, 0)
        lidx, eidx = np.arange(L)[:, None], np.arange(E)[None, :]
        serves_now = holds[lidx, phc, eidx]
        node_serves = live_node_holds[lidx, node[phc], eidx] & one_node
        # Keep a backup where it is unless its holder died, now serves the expert itself, or sits on
        # the only node that serves it (then one failure -- of a rank or of a node -- takes both).
        keep = (ph >= 0) & live[phc] & (pr < cap) & ~serves_now & ~node_serves
        holder[keep], row[keep] = ph[keep], pr[keep]
        np.add.at(used, ph[keep], 1)
        taken[ph[keep], pr[keep]] = True
    todo = np.argwhere(holder < 0)
    # Rows of pairs to re-home that may come back to their holder: other pairs take them last, so a
    # pair back on its holder finds its row (and its bytes) free.
    soft = np.zeros((R, cap), dtype=bool)
    if previous is not None:
        back = (ph >= 0) & live[phc] & (pr >= 0) & (pr < cap) & (holder < 0)
        soft[ph[back], pr[back]] = True
    if degrade and len(todo) > int(np.maximum(cap - used[live], 0).sum()):
        replicas = holds[:, live, :].sum(1)  # [L, E] live replicas per expert
        exposed = replicas[todo[:, 0], todo[:, 1]]
        todo = todo[np.argsort(np.where(exposed > 0, exposed, np.iinfo(np.int64).max), kind="stable")]
    uncovered = 0
    # Cost per candidate rank: dead >> serves it >> on the only node serving it >> another node serving
    # it >> load (penalties are multiples of cap + 1, so load never outweighs a node). Rows are few
    # thousand at most (L * E), and each step is a vector op over ranks.
    unit = float(cap + 1)
    for l, e in todo:
        cost = used.astype(np.float64) + np.where(holds[l, :, e], 16 * unit, 0.0) + np.where(
            node_holds[l, node, e], unit, 0.0) + np.where(live_node_holds[l, node, e] & one_node[l, e], 4 * unit, 0.0)
        cost[~live | (used >= cap)] = np.inf
        r = int(cost.argmin())
        if not np.isfinite(cost[r]):
            if degrade:
                uncovered += 1
                continue
            raise ValueError(
                f"backup store full: {cap} rows per rank cannot hold a backup of every expert on {n_live} live ranks"
            )
        # Back on its previous holder (not kept above, e.g. it serves the expert now and no other
        # rank has room): its previous row, if free, still holds its bytes, so nothing is copied.
        if previous is not None and r == ph[l, e] and 0 <= pr[l, e] < cap and not taken[r, pr[l, e]]:
            free = int(pr[l, e])
        else:
            rows = np.flatnonzero(~taken[r] & ~soft[r])
            free = int(rows[0]) if len(rows) else int(np.flatnonzero(~taken[r])[0])
        holder[l, e], row[l, e] = r, free
        taken[r, free] = True
        used[r] += 1
    return BackupLayout(torch.from_numpy(holder), torch.from_numpy(row), cap, uncovered)
