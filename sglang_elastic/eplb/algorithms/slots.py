"""``SlotState``: an assignment of replicas to live ranks' slots with the indexes that swaps need."""
from __future__ import annotations

from typing import Optional

import numpy as np

__all__ = ["SlotState", "drop_duplicates"]


class SlotState:
    """Assignment of replicas to live ranks' slots for all layers, with the indexes swaps need.

    ``x[l, r, s]`` is the expert in slot ``s`` of live rank ``r`` (``-1`` = empty). ``present[l, r, e+1]``
    says whether rank ``r`` holds ``e``; ``node_cnt[l, e+1, m]`` counts replicas of ``e`` on node ``m``.
    Both are kept in step with ``x`` so constraint checks are gathers, not searches.
    """

    def __init__(self, x: np.ndarray, per_replica: np.ndarray, node_of: Optional[np.ndarray]):
        self.x = x
        self.L, self.n, self.S = x.shape
        self.E = per_replica.shape[1]
        self.per = per_replica
        self.per32 = per_replica.astype(np.float32)
        self.node_of = node_of
        self.rows = np.arange(self.L)
        L, n, E1 = self.L, self.n, self.E + 1
        li, ri = np.indices((L, n))
        self.present = np.zeros((L, n, E1), dtype=np.int8)
        self.present[li[..., None], ri[..., None], x + 1] = 1
        self.present[..., 0] = 0
        if node_of is not None:
            self.M = int(node_of.max()) + 1
            flat = ((li[..., None] * E1 + x + 1) * self.M + node_of[ri][..., None]).ravel()
            self.node_cnt = np.bincount(flat, minlength=L * E1 * self.M).reshape(L, E1, self.M)
            self.node_cnt[:, 0] = 0

    def loads(self) -> np.ndarray:
        """float64 ``[L, n]`` tokens per live rank."""
        return np.where(self.x >= 0, self.per[self.rows[:, None, None], self.x], 0.0).sum(-1)

    def place(self, l: np.ndarray, r: np.ndarray, s: np.ndarray, e: np.ndarray) -> None:
        """Put expert ``e`` into empty slots ``(l, r, s)``."""
        self.x[l, r, s] = e
        self.present[l, r, e + 1] = 1
        if self.node_of is not None:
            np.add.at(self.node_cnt, (l, e + 1, self.node_of[r]), 1)

    def remove(self, l: np.ndarray, r: np.ndarray, s: np.ndarray) -> None:
        """Empty slots ``(l, r, s)``."""
        e = self.x[l, r, s]
        self.x[l, r, s] = -1
        # A rank may hold a second copy (a conflict not yet fixed): presence is what is left.
        self.present[l, r, e + 1] = (self.x[l, r] == e[:, None]).any(1)
        if self.node_of is not None:
            np.add.at(self.node_cnt, (l, e + 1, self.node_of[r]), -1)

    def swap(self, l: np.ndarray, r1: np.ndarray, s1: np.ndarray, r2: np.ndarray, s2: np.ndarray) -> None:
        """Exchange the experts of slots ``(l, r1, s1)`` and ``(l, r2, s2)``."""
        # remove + remove + place + place, fused (the refinement calls this once per step); r1 != r2.
        x, present = self.x, self.present
        e1, e2 = x[l, r1, s1], x[l, r2, s2]
        x[l, r1, s1] = -1
        x[l, r2, s2] = -1
        # A rank may hold a second copy (a conflict not yet fixed): presence is what is left.
        present[l, r1, e1 + 1] = (x[l, r1] == e1[:, None]).any(1)
        present[l, r2, e2 + 1] = (x[l, r2] == e2[:, None]).any(1)
        x[l, r1, s1] = e2
        x[l, r2, s2] = e1
        present[l, r1, e2 + 1] = 1
        present[l, r2, e1 + 1] = 1
        if self.node_of is not None:
            m1, m2 = self.node_of[r1], self.node_of[r2]
            np.add.at(self.node_cnt, (np.concatenate([l, l, l, l]), np.concatenate([e1, e2, e2, e1]) + 1,
                                      np.concatenate([m1, m2, m1, m2])),
                      np.repeat(np.array([-1, -1, 1, 1], dtype=self.node_cnt.dtype), l.size))

    def duplicates(self) -> np.ndarray:
        """bool ``[L, n, S]``: slots holding a later copy of an expert already on the same rank."""
        x = self.x
        srt = np.sort(x, axis=-1)  # cheap way to find the few ranks that have a repeat at all
        has = ((srt[..., 1:] == srt[..., :-1]) & (srt[..., 1:] >= 0)).any(-1)
        dup = np.zeros(x.shape, dtype=bool)
        if has.any():
            l, r = np.nonzero(has)
            xs = x[l, r]  # [K, S]
            same = (xs[:, :, None] == xs[:, None, :]) & np.triu(np.ones((self.S, self.S), dtype=bool), 1)
            dup[l, r] = same.any(1) & (xs >= 0)
        return dup

    def spread_loss_at(self, l: np.ndarray, e: np.ndarray, from_node: np.ndarray, to_node: np.ndarray) -> np.ndarray:
        """bool: moving a replica of ``e`` from ``from_node`` to ``to_node`` lowers how many nodes hold ``e``."""
        return (from_node != to_node) & (self.node_cnt[l, e + 1, from_node] == 1) & (
            self.node_cnt[l, e + 1, to_node] > 0)



def drop_duplicates(x: np.ndarray) -> np.ndarray:
    """Keep one copy where a rank holds the same expert twice (possible in foreign placements)."""
    srt = np.sort(x, axis=-1)
    if not ((srt[..., 1:] == srt[..., :-1]) & (srt[..., 1:] >= 0)).any():
        return x
    idx = np.argsort(x, axis=-1, kind="stable")
    s = np.take_along_axis(x, idx, -1)
    dup = np.concatenate([np.zeros(s.shape[:-1] + (1,), bool), (s[..., 1:] == s[..., :-1]) & (s[..., 1:] >= 0)], -1)
    mask = np.zeros_like(dup)
    np.put_along_axis(mask, idx, dup, -1)
    return np.where(mask, -1, x)

