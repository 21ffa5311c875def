"""Where peers find each other: incarnations and published metadata in the store, written once
for every endpoint (the transports, the host token exchanges).

Store layout under a namespace ``ns`` (e.g. ``transport/nixl``, ``dispatch/nixl``):

* ``ns/<rank>/inc``: counter; each new endpoint object of ``rank`` takes the next value as its
  incarnation, so a restarted rank is told apart from its dead predecessor;
* ``ns/<rank>/<inc>/meta``: pickled metadata of that incarnation (what a peer needs to reach it);
* ``ns/<rank>/cur``: the incarnation that published last (the current process of ``rank``).
"""
from __future__ import annotations

import pickle
from typing import Optional

from .liveness import Liveness
from .store import store_wait

__all__ = ["PeerDirectory"]


class PeerDirectory:
    """This endpoint's entry in the store, and its view of the peers' entries.

    Args:
        store: a ``torch.distributed.Store`` served outside the ranks.
        ns: the namespace shared by the endpoints that talk to each other.
        rank: this rank; constructing takes its next incarnation.
        liveness: waits for a peer's entry end at once when the peer is known dead there.
    """

    def __init__(self, store, ns: str, rank: int, liveness: Optional[Liveness] = None) -> None:
        self.store, self.ns, self.rank, self.liveness = store, ns, int(rank), liveness
        self.incarnation = int(store.add(f"{ns}/{self.rank}/inc", 1))

    def meta_key(self, rank: int, inc: int) -> str:
        return f"{self.ns}/{rank}/{inc}/meta"

    def publish(self, meta: dict) -> None:
        """Publish (again) this incarnation's metadata and make it the rank's current one."""
        self.store.set(self.meta_key(self.rank, self.incarnation), pickle.dumps(meta))
        self.store.set(f"{self.ns}/{self.rank}/cur", str(self.incarnation))

    def _wait(self, key: str, rank: int, deadline: Optional[float], what: str) -> bool:
        if deadline is None:
            return self.store.check([key])
        return store_wait(self.store, key, deadline, liveness=self.liveness, ranks=(rank,), what=what)

    def current(self, rank: int, deadline: Optional[float] = None) -> Optional[int]:
        """``rank``'s current incarnation; waits until ``deadline`` (monotonic) for it to publish
        (``None``: look once). None when it has none (yet). Raises PeerFailure when ``rank`` is
        known dead while waiting."""
        key = f"{self.ns}/{rank}/cur"
        if not self._wait(key, rank, deadline, f"waiting for rank {rank} to appear under {self.ns}"):
            return None
        return int(self.store.get(key))

    def meta(self, rank: int, inc: int, deadline: Optional[float] = None) -> Optional[dict]:
        """The metadata incarnation ``inc`` of ``rank`` published (waiting as :meth:`current` does)."""
        key = self.meta_key(rank, inc)
        if not self._wait(key, rank, deadline, f"waiting for rank {rank}'s metadata under {self.ns}"):
            return None
        return pickle.loads(self.store.get(key))
