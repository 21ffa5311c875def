"""Agreement on the live EP ranks and an epoch, through a store and a socket that no rank hosts.

* :mod:`.view` — the published record (:class:`MembershipView`), its store keys, errors;
* :mod:`.server` — :class:`MembershipServer`, the one decider (run by the orchestrator/launcher);
* :mod:`.client` — :class:`MembershipClient`, a rank's side, which also feeds the process's
  :class:`~sglang_elastic.transport.Liveness`;
* :mod:`.watch` — the per-rank TCP connection whose end tells the server a process died;
* :mod:`.agreement` — :class:`StoreVote` and :func:`store_wait`: agreements and waits between ranks
  through a store, each ending at once when a rank it waits for is known dead.

See ``docs/elastic-state.md``.
"""
from .agreement import StoreVote, store_wait
from .client import MembershipClient
from .server import MembershipServer
from .view import DEFAULT_NAMESPACE, MembershipChange, MembershipError, MembershipTimeout, MembershipView

__all__ = [
    "DEFAULT_NAMESPACE",
    "MembershipChange",
    "MembershipClient",
    "MembershipError",
    "MembershipServer",
    "MembershipTimeout",
    "MembershipView",
    "StoreVote",
    "store_wait",
]
