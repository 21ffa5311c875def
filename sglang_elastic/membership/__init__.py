"""Agreement on the live EP ranks and an epoch, through a store and a socket that no rank hosts.

* :mod:`.view` — the published record (:class:`MembershipView`), its store keys, errors;
* :mod:`.server` — :class:`MembershipServer`, the one decider (run by the orchestrator/launcher);
* :mod:`.client` — :class:`MembershipClient`, a rank's side, which also feeds the process's
  :class:`~sglang_elastic.transport.Liveness`;
* :mod:`.watch` — the per-rank TCP connection whose end tells the server a process died;
* :mod:`.agreement` — :class:`StoreVote`: agreement between ranks through a store, ending at once
  when a voter is known dead (a plain key wait: :func:`sglang_elastic.transport.store_wait`).

See ``docs/elastic-state.md``.
"""
from .agreement import StoreVote
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
]
