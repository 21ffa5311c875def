"""Repairing a requested placement against the live set, and finding the experts only disk can restore.

Pure planning (no I/O, no SGLang): the SGLang adapter (:mod:`sglang_elastic.sglang_plugin.updater`)
calls these for every layer of an update.

* :func:`repair_target`: a requested placement that puts experts on dead ranks, or leaves an expert
  with no live replica, becomes the movement-aware EPLB's repair of it over the live ranks (its
  live part kept where it can be).
* :func:`lost_experts`: experts the target needs that have neither a live replica nor a live
  backup. Our updater cannot restore them, so the committed placement is rewritten as if they
  already sat in their target slots (no copy is planned into them; SGLang reloads them from disk).
  Whatever those slots held stops being a source, which can lose more experts: iterate to a fixed
  point.
* :func:`lost_on_rank`: the lost experts one rank's target slots hold (what that rank reloads).
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import numpy as np
import torch

from ..eplb.algorithms import rebalance
from ..eplb.placement import Placement, PlacementError

__all__ = ["repair_target", "lost_experts", "lost_on_rank"]


def repair_target(target: Placement, live: np.ndarray, load: Optional[torch.Tensor] = None,
                  ranks_per_node: Optional[int] = None) -> Tuple[Placement, bool]:
    """``target`` when every expert has a replica on a live rank, else its movement-aware repair.

    Parameters:
        target: one-layer placement ``phy2log [1, R * S]`` as requested.
        live: bool ``[R]`` live ranks.
        load: ``[1, E]`` (or ``[E]``) expert load to balance the repair with; ``None``: uniform.
        ranks_per_node: keep replicas spread over nodes of this many ranks (``None``: flat).

    Returns:
        ``(placement, repaired)``: the placement to apply (dead ranks' slots ``-1`` when repaired)
        and whether it differs from ``target`` because of a repair.
    """
    try:
        return target.validate(live, allow_duplicates=True), False
    except PlacementError:
        pass
    R, S, E = target.num_ranks, target.slots_per_rank, target.num_logical_experts
    w = torch.ones(1, E, dtype=torch.float64) if load is None else load.reshape(1, E).to(torch.float64)
    cur = target.phy2log.clone()
    cur.view(-1, R, S)[:, torch.from_numpy(~np.asarray(live, dtype=bool))] = -1
    return rebalance(w, R, S, live_ranks=live, current=cur, ranks_per_node=ranks_per_node), True


def lost_experts(committed: torch.Tensor, target: torch.Tensor, live: np.ndarray,
                 backup_holder: Optional[torch.Tensor], num_logical: int) -> Tuple[List[int], torch.Tensor]:
    """Experts of ``target`` with no live replica in ``committed`` and no live backup.

    Parameters:
        committed: int64 ``[P]`` expert each physical slot holds now (``-1``: empty).
        target: int64 ``[P]`` expert each slot should hold.
        live: bool ``[R]`` live ranks (``P`` is a multiple of ``R``).
        backup_holder: int64 ``[E]`` rank holding each expert's host backup (``-1``: none), or
            ``None`` when there is no backup store.
        num_logical: number of logical experts ``E``.

    Returns:
        ``(lost, committed')``: the lost experts, sorted, and ``committed`` with every live slot
        whose target is a lost expert set to that expert (a copy of ``committed``; equal when
        nothing is lost).
    """
    live_t = torch.from_numpy(np.asarray(live, dtype=bool))
    S = committed.shape[0] // live_t.shape[0]
    live_slot = live_t.repeat_interleave(S)
    if backup_holder is None:
        backed = torch.zeros(num_logical, dtype=torch.bool)
    else:
        h = backup_holder.reshape(-1).to(torch.int64)
        backed = (h >= 0) & live_t[h.clamp(min=0)]
    needed = torch.zeros(num_logical, dtype=torch.bool)
    needed[target[target >= 0]] = True
    cur = committed.clone()
    lost = torch.zeros(num_logical, dtype=torch.bool)
    while True:  # at most one round per expert; usually one or two
        have = torch.zeros(num_logical, dtype=torch.bool)
        have[cur[live_slot & (cur >= 0)]] = True
        more = needed & ~have & ~backed & ~lost
        if not bool(more.any()):
            return lost.nonzero().flatten().tolist(), cur
        lost |= more
        hit = live_slot & (target >= 0) & more[target.clamp(min=0)]
        cur[hit] = target[hit]


def lost_on_rank(target: torch.Tensor, lost: List[int], rank: int, slots_per_rank: int) -> List[int]:
    """The lost experts among ``rank``'s target slots, sorted (``target``: int64 ``[P]``)."""
    if not lost:
        return []
    mine = target[rank * slots_per_rank:(rank + 1) * slots_per_rank]
    return sorted(set(lost) & set(mine.tolist()))
