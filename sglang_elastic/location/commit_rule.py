"""Pure pieces of zero-stall rebalancing (:mod:`.background`): the commit rule and backup-row choices.

The commit rule: every live rank posts ``ready@b`` once its transport thread finished a chunk (``b`` the
step boundary it posted at), or a peer writes ``dead@b`` in place of a dead rank's post. Each step
exchanges tokens with every rank, so a mark written at boundary ``b`` is visible to every rank from
boundary ``b + 1`` on; reading only marks with ``b <= t - 1`` at boundary ``t``, every rank takes the
same decision at the same boundary.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

from ..eplb.placement import Placement
from ..transport.base import Copy
from .backup import BackupLayout, backup_tensor_name

__all__ = ["decide", "spare_rows", "backup_copies", "direct_to_empty", "keep_slots", "vacate", "in_order"]

_DEAD = "dead@"


def decide(posts: Dict[int, Optional[str]], boundary: int) -> Tuple[bool, List[int]]:
    """The commit rule on the posts of every live rank (pure).

    Parameters:
        posts: rank -> ``"ready@b"`` or ``"dead@b"`` (``b`` the boundary it was written at); a rank
            missing from it has not posted.
        boundary: this boundary ``t``.

    Returns:
        ``(decided, dead)``: ``decided`` iff every post exists and was written at ``b <= t - 1``
        (then every rank reads the same posts); ``dead`` the ranks with a verdict.
    """
    if any(v is None for v in posts.values()):
        return False, []
    marks = {r: v.split("@", 1) for r, v in posts.items()}
    if any(int(b) > boundary - 1 for _, b in marks.values()):
        return False, []
    return True, sorted(r for r, (kind, _) in marks.items() if kind + "@" == _DEAD)


def spare_rows(prev: BackupLayout, holder: torch.Tensor, row: torch.Tensor, moved: torch.Tensor, cap: int) -> None:
    """Move the new backups of ``moved`` pairs off rows that hold a previous backup (in place), onto
    rows free in both layouts where there are any: a re-homing cut short by a death then leaves every
    previous backup intact. Deterministic (the same on every rank)."""
    old = {(int(h), int(r)) for h, r in zip(prev.holder[prev.holder >= 0].tolist(), prev.row[prev.holder >= 0].tolist())}
    clash = [(l, e) for l, e in moved.nonzero().tolist() if (int(holder[l, e]), int(row[l, e])) in old]
    if not clash:
        return
    used = old | {(int(h), int(r)) for h, r in zip(holder[holder >= 0].tolist(), row[holder >= 0].tolist())}
    free: Dict[int, List[int]] = {}
    for l, e in clash:
        h = int(holder[l, e])
        if h not in free:
            free[h] = [r for r in range(cap - 1, -1, -1) if (h, r) not in used]
        if free[h]:
            row[l, e] = free[h].pop()


def in_order(first: List[Copy], then: List[Copy]) -> List[List[Copy]]:
    """The executes that run ``first`` and then ``then`` with the meaning of that order (pure).

    One execute runs its copies in no defined order (the transports post them together). So where a
    copy of ``then`` writes a row a copy of ``first`` reads (a re-homed backup given the row an
    orphan of the chunk is restored from, when the store has no free row), or reads a row ``first``
    writes, they run as two executes; otherwise as one (one vote).

    Returns:
        ``[first + then]`` (one execute, even of no copy: its vote is the chunk's agreement), or
        ``[first, then]`` when they touch a row in common.
    """
    if not first or not then:
        return [first + then]
    reads = {(c.src, c.src_name, c.src_row) for c in first}
    writes = {(c.dst, c.dst_name, c.dst_row) for c in first}
    if any((c.dst, c.dst_name, c.dst_row) in reads or (c.src, c.src_name, c.src_row) in writes for c in then):
        return [first, then]
    return [first + then]


def backup_copies(placement: Placement, live: np.ndarray, holder: torch.Tensor, row: torch.Tensor,
                   names: List[str], pairs: List[List[int]], stable: Optional[torch.Tensor] = None
                   ) -> Tuple[List[Copy], List[Tuple[int, int]]]:
    """Copies filling the backups of ``pairs`` ``(layer, expert)`` from live replicas of ``placement``
    (in ``stable`` ``[L, P]`` slots only, when given: rows no concurrent commit rewrites), rotating
    the source so sources spread, and the pairs with no such replica."""
    S = placement.slots_per_rank
    l2p = placement.log2phy
    copies, lost = [], []
    for l, e in pairs:
        slots = [s for s in l2p[l, e].tolist() if s >= 0 and live[s // S] and (stable is None or bool(stable[l, s]))]
        if not slots:
            lost.append((l, e))
            continue
        src = slots[(l + e) % len(slots)]
        for name in names:
            copies.append(Copy(src // S, int(holder[l, e]), name, l * S + src % S, backup_tensor_name(name),
                               int(row[l, e])))
    return copies, lost


def direct_to_empty(copies: List[Copy], rows: Tuple[List[torch.Tensor], List[torch.Tensor]], chunk: List[int],
                    empty: torch.Tensor, rank: int, S: int, stage: Dict[str, str], stage_rows: Dict[str, torch.Tensor]
                    ) -> Tuple[List[Copy], Tuple[List[torch.Tensor], List[torch.Tensor]]]:
    """A chunk's copies into slots that hold no expert now write the weights directly (pure).

    No token is routed to an empty slot (where routing follows this placement: the caller's promise)
    and none is a copy's source, so its row can be written while serving goes on; the commit (which
    only stamps the placement for it) then copies nothing for it.
    A joining rank's experts thus cost its step boundaries no copy at all. The same on every rank
    (``empty`` comes from the committed placement of the chunk's layers, which no other chunk changes).

    Parameters:
        copies: the chunk's copies; those into staging name ``stage[w]`` row ``li * S + p`` go to
            row ``chunk[li] * S + p`` of weight ``w`` when ``empty[li, dst * S + p]``.
        rows: ``(weight rows, staging rows)`` of this rank's commit, weight by weight (views).
        empty: bool ``[len(chunk), R * S]``, the chunk's slots that hold no expert now.
        stage: weight name -> its staging buffer's registered name; ``stage_rows``: that buffer.

    Returns:
        ``(copies, rows)`` with the redirected copies, and the commit rows of this rank that no
        longer need copying dropped (rows written otherwise, e.g. reloaded, stay).
    """
    names = {v: k for k, v in stage.items()}
    out, direct = [], set()
    for c in copies:
        w = names.get(c.dst_name)
        li, p = divmod(c.dst_row, S)
        if w is not None and bool(empty[li, c.dst * S + p]):
            c = Copy(c.src, c.dst, c.src_name, c.src_row, w, chunk[li] * S + p)
            if c.dst == rank:
                direct.add((w, li * S + p))
        out.append(c)
    if not direct:
        return out, rows
    keep: Tuple[List[torch.Tensor], List[torch.Tensor]] = ([], [])
    per = len(rows[0]) // max(len(stage), 1)
    for i, (dst, src) in enumerate(zip(*rows)):
        w = list(stage)[i // per]
        buf = stage_rows[w]
        row = (src.data_ptr() - buf.data_ptr()) // (buf[0].numel() * buf.element_size())
        if (w, row) not in direct:
            keep[0].append(dst)
            keep[1].append(src)
    return out, keep


def vacate(current: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The slots of a chunk's layers to take out of routing when the chunk starts moving (pure).

    A slot the chunk overwrites (``current >= 0``, ``target >= 0``, different experts) whose expert
    keeps another routed replica in the layer can stop serving while the chunk moves: its new expert
    is then written in place (:func:`direct_to_empty`) and the chunk's commit copies nothing for it.
    Every expert keeps at least one routed replica: where all of an expert's replicas are overwritten,
    the first (lowest slot) stays routed until the commit. Idempotent: applied to its own result it
    empties nothing more. A slot ``target`` leaves empty (a drained rank) is not written: not emptied.

    Parameters:
        current: ``[n, P]`` the chunk's layers of the placement in force (``-1`` empty).
        target: ``[n, P]`` the same layers of the target.

    Returns:
        bool ``[n, P]``: the slots to empty now.
    """
    n, P = current.shape
    E = int(max(int(current.max()), int(target.max()), 0)) + 1
    idx = current.clamp(min=0).long()
    over = (current >= 0) & (target >= 0) & (current != target)
    stays = (current >= 0) & ~over
    kept = torch.zeros(n, E, dtype=torch.long).scatter_add_(1, idx, stays.long()).gather(1, idx) > 0
    # Order of each overwritten slot among its expert's overwritten slots (1 = the first).
    onehot = torch.nn.functional.one_hot(idx, E) * over.unsqueeze(-1).long()     # [n, P, E]
    order = onehot.cumsum(1).gather(2, idx.unsqueeze(-1)).squeeze(-1)
    return over & (kept | (order > 1))


def keep_slots(current: Placement, target: Placement) -> Placement:
    """``target`` with each rank's slots reordered, layer by layer, so that an expert the rank holds
    now stays in its slot (pure, deterministic: every rank computes the same).

    Each rank keeps the same experts (balance, replica counts and routing are unchanged); only moves
    within a rank go, which a commit would otherwise copy at the step boundary (in the default
    rehearsal's rebalance 8 of a rank's 12 committed slots were such moves).

    Parameters:
        current: the committed placement ``[L, R * S]``; target: the placement to move to (same shape).

    Returns:
        A placement equal to ``target`` up to a permutation of each (layer, rank)'s ``S`` slots.
    """
    L, R, S = target.num_layers, target.num_ranks, target.slots_per_rank
    cur = current.phy2log.reshape(L, R, S).tolist()
    new = target.phy2log.reshape(L, R, S).tolist()
    out = [_keep(o, n) for lo, ln in zip(cur, new) for o, n in zip(lo, ln)]
    phy = torch.tensor(out, dtype=target.phy2log.dtype, device=target.phy2log.device).reshape(L, R * S)
    return Placement(phy, R, target.num_logical_experts)


def _keep(old: List[int], new: List[int]) -> List[int]:
    """One rank's ``new`` slots (a list of experts), reordered so that experts in ``old`` keep their slot."""
    rest = list(new)
    res: List[Optional[int]] = []
    for e in old:
        if e in rest:
            rest.remove(e)
            res.append(e)
        else:
            res.append(None)
    rest.reverse()
    return [e if e is not None else rest.pop() for e in res]
