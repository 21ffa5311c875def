"""Process-wide elastic-EP state: which EP ranks are alive, an epoch, and change listeners.

Mirrors the surface SGLang 0.5.23 calls on ``sglang.srt.elastic_ep.elastic_ep.ElasticEPStateManager``
(``instance()``, ``init(server_args)``, ``healthy_rank_state()``, the state's ``active_ranks`` /
``last_active_ranks`` / ``active_ranks_cpu`` tensors, ``snapshot_active_to_last()``,
``is_active_equal_last()``, ``sync_active_to_cpu()``, ``reset()`` and the scale-phase
classmethods), and adds what upstream lacks:

* an integer ``epoch`` bumped on every change of the live set, kept in host memory so the forward
  path asks :meth:`ElasticEPState.changed_since` without any GPU-to-CPU synchronisation;
* :meth:`ElasticEPState.mark_failed` / :meth:`ElasticEPState.mark_joined` (idempotent, validated);
* :meth:`ElasticEPState.apply_membership`, the hook :mod:`sglang_elastic.membership` uses so every
  rank's state holds the agreed live set and the agreed epoch;
* listeners called with an :class:`ElasticEPEvent` after each change, in epoch order.

``active_ranks`` is never replaced, only written in place: kernels (dispatchers, routing masks)
keep a reference to it and see every change. See ``docs/elastic-state.md``.

Modules: :mod:`.ep_state` (:class:`ElasticEPState`, :class:`ElasticEPEvent`) and :mod:`.manager`
(:class:`ElasticEPStateManager`).
"""
from .ep_state import ElasticEPEvent, ElasticEPState, Listener
from .manager import ElasticEPStateManager

__all__ = ["ElasticEPEvent", "ElasticEPState", "ElasticEPStateManager", "Listener"]
