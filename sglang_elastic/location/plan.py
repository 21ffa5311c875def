"""Transfer planning: which rank sends which expert to which slot when a placement changes (pure).

For every (layer, slot) whose expert changes on a rank that is live in the new placement, the slot
needs the new expert's weights. The source is chosen among **live** ranks that hold the expert in
the old placement:

1. the destination rank itself (a local copy from another of its slots) — free;
2. else a live rank on the same node as the destination (with ``ranks_per_node``);
3. else any live holder.

Within the chosen class, requests for one expert are spread round-robin over its holders so no
single source serves them all. An expert with no live holder is an **orphan**: it must come from
the backup store. An expert that has a live replica is never an orphan, whatever happened to the
rank it was "assigned" to — the bug in upstream SGLang, where the chosen source could be dead.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional, Sequence, Union

import numpy as np
import torch

from ..eplb.placement import Placement, as_live_mask

__all__ = ["TransferPlan", "plan_transfers"]

Tensorish = Union[torch.Tensor, np.ndarray, Placement]


@dataclass(frozen=True)
class TransferPlan:
    """What an update has to move.

    Attributes:
        transfers: int64 ``[N, 5]`` rows ``(layer, src_rank, dst_rank, logical_expert, dst_slot)``;
            ``dst_slot`` is the global physical slot index. ``src_rank == dst_rank`` is a local copy.
        orphans: int64 ``[M, 4]`` rows ``(layer, dst_rank, logical_expert, dst_slot)`` whose expert no
            live rank holds: restore them from the backup store.
        src_slots: int64 ``[N]``, the physical slot on ``src_rank`` the weights are read from.
    """

    transfers: torch.Tensor
    orphans: torch.Tensor
    src_slots: torch.Tensor

    def layers(self) -> list:
        """Sorted layer ids that have anything to move or restore."""
        ids = torch.cat([self.transfers[:, 0], self.orphans[:, 0]])
        return sorted(set(ids.tolist()))

    def for_layers(self, layer_ids: Sequence[int]) -> "TransferPlan":
        """The part of the plan touching ``layer_ids``."""
        ids = torch.as_tensor(list(layer_ids), dtype=torch.int64)
        t = torch.isin(self.transfers[:, 0], ids)
        o = torch.isin(self.orphans[:, 0], ids)
        return TransferPlan(self.transfers[t], self.orphans[o], self.src_slots[t])

    def remote(self) -> torch.Tensor:
        """Rows of ``transfers`` that cross ranks."""
        return self.transfers[self.transfers[:, 1] != self.transfers[:, 2]]

    def num_remote(self) -> int:
        """Expert copies that cross ranks (the bytes that travel are this times bytes per expert)."""
        return int((self.transfers[:, 1] != self.transfers[:, 2]).sum())

    def __iter__(self) -> Iterator[torch.Tensor]:
        return iter(self.transfers)


def _as_phy2log(x: Tensorish) -> np.ndarray:
    if isinstance(x, Placement):
        return x.phy2log.numpy()
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy().astype(np.int64)
    return np.asarray(x, dtype=np.int64)


def plan_transfers(
    old_phy2log: Tensorish,
    new_phy2log: Tensorish,
    live_ranks: Union[torch.Tensor, np.ndarray, Sequence],
    slots_per_rank: int,
    ranks_per_node: Optional[int] = None,
) -> TransferPlan:
    """Plan the copies that turn ``old_phy2log`` into ``new_phy2log`` using live sources only.

    Args:
        old_phy2log: ``[L, P]`` placement whose weights are where they are now (``-1``: empty/dead).
        new_phy2log: ``[L, P]`` target placement; slots of ranks dead in ``live_ranks`` are ignored.
        live_ranks: bool/int mask ``[R]`` of ranks alive *now* (sources and destinations).
        slots_per_rank: ``S``; ``P = R * S``.
        ranks_per_node: prefer same-node sources when given.

    Raises:
        ValueError: shapes differ, ``P`` is not ``R * S``, or the new placement routes to a dead rank.
    """
    old, new = _as_phy2log(old_phy2log), _as_phy2log(new_phy2log)
    if old.shape != new.shape or old.ndim != 2:
        raise ValueError(f"old and new placements must both be [layers, slots]; got {old.shape} and {new.shape}")
    L, P = new.shape
    if slots_per_rank <= 0 or P % slots_per_rank:
        raise ValueError(f"{P} physical slots are not a whole number of ranks of {slots_per_rank} slots")
    R, S = P // slots_per_rank, slots_per_rank
    live = as_live_mask(live_ranks, R)
    rank_of_slot = np.repeat(np.arange(R), S)
    dead_routed = (new >= 0) & ~live[rank_of_slot][None]
    if dead_routed.any():
        l, p = np.argwhere(dead_routed)[0]
        raise ValueError(f"new placement routes expert {new[l, p]} to slot {p} of dead rank {p // S} (layer {l})")
    if ranks_per_node is not None and (ranks_per_node <= 0 or R % ranks_per_node):
        raise ValueError(f"ranks_per_node ({ranks_per_node}) must divide the number of ranks ({R})")
    E1 = int(max(old.max(), new.max())) + 2

    # Requests: slots on live ranks whose expert changes.
    need = (new >= 0) & (new != old) & live[rank_of_slot][None]
    rl, rp = np.nonzero(need)
    re, rd = new[rl, rp], rank_of_slot[rp]
    empty = np.zeros((0,), dtype=np.int64)
    if rl.size == 0:
        return TransferPlan(torch.zeros((0, 5), dtype=torch.int64), torch.zeros((0, 4), dtype=torch.int64),
                            torch.from_numpy(empty))

    # Holders: (layer, expert) -> live slots in the old placement, as CSR over a sorted key.
    hold = (old >= 0) & live[rank_of_slot][None]
    hl, hp = np.nonzero(hold)
    hkey = hl * E1 + old[hl, hp]
    order = np.lexsort((hp, hkey))
    hkey, hp = hkey[order], hp[order]
    rkey = rl * E1 + re
    start = np.searchsorted(hkey, rkey, side="left")
    count = np.searchsorted(hkey, rkey, side="right") - start
    orphan = count == 0

    src_slot = np.full(rl.size, -1, dtype=np.int64)
    has = np.flatnonzero(~orphan)
    if has.size:
        # Candidate holders of each request, padded: [T, X].
        X = int(count[has].max())
        idx = start[has, None] + np.arange(X)[None]
        valid = np.arange(X)[None] < count[has, None]
        cand = np.where(valid, hp[np.minimum(idx, hp.size - 1)], -1)
        cand_rank = np.where(valid, rank_of_slot[np.maximum(cand, 0)], -1)
        dst = rd[has, None]
        # Class 0: local; 1: same node; 2: elsewhere.
        cls = np.where(cand_rank == dst, 0, 2)
        if ranks_per_node is not None:
            cls = np.where((cls == 2) & (cand_rank // ranks_per_node == dst // ranks_per_node), 1, cls)
        cls = np.where(valid, cls, 3)
        best = cls.min(1, keepdims=True)
        in_best = cls == best
        n_best = in_best.sum(1)
        # Round-robin over the best class: the k-th request for (layer, expert, class) takes holder k mod n.
        grp = (rkey[has] * 4 + best[:, 0]).astype(np.int64)
        go = np.argsort(grp, kind="stable")
        g_sorted = grp[go]
        first = np.searchsorted(g_sorted, g_sorted, side="left")
        ordinal = np.empty_like(go)
        ordinal[go] = np.arange(go.size) - first
        pick = ordinal % n_best
        # Index of the pick-th True in each row of in_best.
        pos = np.cumsum(in_best, 1) - 1
        col = np.argmax(in_best & (pos == pick[:, None]), 1)
        src_slot[has] = cand[np.arange(has.size), col]

    t = ~orphan
    transfers = np.stack([rl[t], rank_of_slot[src_slot[t]], rd[t], re[t], rp[t]], 1)
    orphans = np.stack([rl[orphan], rd[orphan], re[orphan], rp[orphan]], 1)
    return TransferPlan(torch.from_numpy(transfers.astype(np.int64)).reshape(-1, 5),
                        torch.from_numpy(orphans.astype(np.int64)).reshape(-1, 4),
                        torch.from_numpy(src_slot[t]))
