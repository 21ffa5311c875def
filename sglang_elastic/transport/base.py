"""The transport contract: move rows of registered tensors between ranks, fail within a bounded time.

Every backend (``torch``, ``nixl``, ``mooncake``) implements :class:`Transport`. Ranks register the
tensors they expose (viewed as ``[rows, -1]``), agree on the live set with :meth:`Transport.set_peers`,
and run a list of :class:`Copy` collectively with :meth:`Transport.execute`. A dead or frozen peer
surfaces as :class:`PeerFailure` within ``timeout_s`` plus a small bounded slack, and a peer known
dead in the process's :class:`~sglang_elastic.transport.Liveness` at the next poll of any wait;
after it the survivors call ``set_peers`` with the new live set and carry on.

Semantics of one ``execute`` (all backends):

* every copy reads the value its source row held when the source rank entered ``execute`` (a row
  may be both a source and a destination in the same call: swaps and cycles are fine);
* when ``execute`` returns on any rank, every participant has finished: all destination rows
  everywhere hold their new bytes and all sources may be overwritten;
* on :class:`PeerFailure` the destination rows of that call hold undefined bytes on every
  participant (rows that were only sources are untouched); nothing else changed.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

__all__ = ["PeerFailure", "Copy", "Transport", "slack_s"]


class PeerFailure(RuntimeError):
    """A peer died, froze or vanished while this rank needed it.

    Attributes:
        rank: the failed peer (the first one noticed). Every participant of the failed call names
            the same rank in the common cases (one peer dies or freezes): a survivor that noticed
            tells the others.
        ranks: the failed peers, ``rank`` first; the transports report only ``rank`` (a second
            silent peer may merely be stuck behind the first), callers may add more.
    """

    def __init__(self, rank: int, message: Optional[str] = None, *, ranks: Optional[Sequence[int]] = None) -> None:
        self.rank = int(rank)
        rest = [int(r) for r in (ranks or []) if int(r) != self.rank]
        self.ranks = [self.rank] + rest
        super().__init__(message or f"peer rank {self.rank} failed")

    def __reduce__(self):  # keep rank/ranks across pickling (multiprocessing queues)
        return (_rebuild_peer_failure, (type(self), self.rank, str(self), list(self.ranks)))


def _rebuild_peer_failure(cls, rank, message, ranks):
    exc = PeerFailure.__new__(cls)
    PeerFailure.__init__(exc, rank, message, ranks=ranks)
    return exc


@dataclass(frozen=True)
class Copy:
    """One row-to-row copy: row ``src_row`` of ``src_name`` on rank ``src`` into row ``dst_row`` of
    ``dst_name`` on rank ``dst`` (global rank ids). ``src == dst`` is a local copy."""

    src: int
    dst: int
    src_name: str
    src_row: int
    dst_name: str
    dst_row: int


def slack_s(timeout_s: float) -> float:
    """The bounded extra time beyond ``timeout_s`` that :meth:`Transport.execute` may take to
    raise :class:`PeerFailure` (time for a survivor's failure notice to reach the others)."""
    return min(5.0, 0.5 + 0.1 * float(timeout_s))


class Transport(ABC):
    """Moves rows of registered tensors between ranks; see the module docstring for semantics."""

    rank: int

    @abstractmethod
    def register(self, name: str, tensor: torch.Tensor) -> None:
        """Expose a local contiguous tensor under ``name``; it is viewed as ``[rows, -1]`` with
        ``rows = tensor.shape[0]``. Every rank that takes part registers the same names with the same
        bytes per row (row counts may differ). Registering a name again replaces it. May be called
        after :meth:`set_peers`; peers learn of it before they need it."""

    def unregister(self, name: str) -> None:
        """Withdraw ``name`` (its memory may be freed after this returns). A peer that validates a
        copy list naming it waits, as for a name not registered yet, until it is registered again
        or its deadline passes. No-op for a name not registered."""
        raise NotImplementedError(f"{type(self).__name__} cannot unregister tensors")

    @abstractmethod
    def set_peers(self, ranks: Sequence[int], rebuild: bool = False) -> None:
        """Declare the ranks that are live now (this rank included). Peers that left are dropped,
        new peers and new incarnations of old ranks are connected; what survives is kept (the
        ``torch`` backend rebuilds its process group, collectively over ``ranks``, when they change).
        ``rebuild``: renew connections that may be unusable even if ``ranks`` did not change; every
        rank of ``ranks`` passes it together (a decision all of them share, such as a vote's
        outcome), since whether this rank's own connections failed is local knowledge."""

    @abstractmethod
    def execute(self, copies: Sequence[Copy], timeout_s: float) -> None:
        """Run ``copies``, collectively over the ranks appearing in them (each calls with the same
        list). Ranks not appearing return at once. Raises ``ValueError`` before any communication
        for bad input; :class:`PeerFailure` within one poll when a participant it still waits for is
        known dead in the process's :class:`~sglang_elastic.transport.Liveness` (``liveness=`` of
        :func:`~sglang_elastic.transport.make_transport`), else within
        ``timeout_s + slack_s(timeout_s)`` when a peer involved dies or freezes."""

    @abstractmethod
    def close(self) -> None:
        """Release everything (connections, registrations, process groups). Idempotent."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
