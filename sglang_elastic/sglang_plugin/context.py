"""The plugin's one per-process context: everything its hooks share, in one typed object.

SGLang calls our hooks as free functions and classes it constructs itself, so whatever they share
must be reachable without arguments; it lives here, in one object, instead of module globals spread
over the plugin:

* ``options``: the plugin's flags, parsed once from the environment (:func:`options.current`, the
  one reader of ``SGLANG_ELASTIC_*``) the first time something needs them;
* ``last_load``: the ``[layers, E]`` load of the last rebalance (written by the EPLB drop-in, read by
  the updater bridge when it repairs a target over the survivors of a mid-update death);
* ``placement_version``: bumped (:meth:`PluginContext.bump_placement_version`, the one place) when
  SGLang's expert-location metadata changes in place; the bump rewrites the routing hook's device
  tables at once, since CUDA-graph replays run no Python that could notice later;
* ``routing``: the routing hook's device tables (:class:`.routing_hook.SGLangRouting`), built once
  per process by :func:`.routing_hook.routing`;
* ``dispatchers``: this process's dispatcher adapters (weakly held), whose device-side degraded
  counters :meth:`PluginContext.flush_degraded_tokens` reads between forward passes;
* ``liveness``: the process's :class:`~sglang_elastic.transport.Liveness` (deaths the state learns
  of are recorded there; waits consult it);
* ``scale_listeners``: objects told about SGLang's ``on_scale`` (weakly held);
* ``metrics``: the ``sglang_elastic_*`` Prometheus series (created on first use, after SGLang has
  set ``PROMETHEUS_MULTIPROC_DIR``);
* ``registered`` / ``hooks_queued``: what :func:`sglang_elastic.sglang_plugin.register` did;
* ``scheduler_drain``: this scheduler's side of a drain (``drain.SchedulerDrain``);
* ``eplb_warm_up``: the thread readying the EPLB kernels (:func:`.eplb.start_warm_up`, once).
"""
from __future__ import annotations

import logging
import threading
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional

import torch

from ..transport.liveness import Liveness
from . import options as _options

if TYPE_CHECKING:
    from ..metrics import ElasticMetrics
    from .routing_hook import SGLangRouting

__all__ = ["PluginContext", "get", "reset", "NOT_PUBLISHED"]

log = logging.getLogger(__name__)

#: What reading SGLang's runtime context raises where nothing was published (tools, tests, a process
#: SGLang did not set up): ``ValueError``/``RuntimeError``/``AttributeError`` from
#: ``sglang.srt.runtime_context``, ``ImportError`` where SGLang's modules cannot load. Catch these,
#: not ``Exception``, around such reads: anything else is a bug that must surface.
NOT_PUBLISHED = (ImportError, AttributeError, ValueError, RuntimeError)


@dataclass
class PluginContext:
    """State the plugin's hooks share in this process (see the module docstring)."""

    registered: List[str] = field(default_factory=list)
    hooks_queued: bool = False
    last_load: Optional[torch.Tensor] = None
    placement_version: int = 0
    liveness: Liveness = field(default_factory=Liveness)
    scale_listeners: "weakref.WeakSet" = field(default_factory=weakref.WeakSet)
    failover_since: Optional[float] = None  # time.monotonic() of the death the next update repairs
    scheduler_drain: Any = None  # this scheduler's drain.SchedulerDrain, made on the first drain step
    routing: Optional["SGLangRouting"] = None  # the routing hook's device tables (routing_hook.routing())
    dispatchers: "weakref.WeakSet" = field(default_factory=weakref.WeakSet)  # dispatcher adapters
    eplb_updaters: "weakref.WeakSet" = field(default_factory=weakref.WeakSet)  # ElasticExpertLocationUpdater s
    in_forward_pass_end: bool = False  # inside SGLang's EPLBManager.on_forward_pass_end (its periodic EPLB)
    eplb_warm_up: Optional[threading.Thread] = None  # eplb.start_warm_up's thread, once per process
    eplb_warm_up_lock: Any = field(default_factory=threading.Lock, repr=False)
    _options: Optional[_options.PluginOptions] = None
    _metrics: Optional["ElasticMetrics"] = None

    @property
    def options(self) -> _options.PluginOptions:
        """The plugin's options, parsed from the environment on first use (``ValueError`` on a bad value)."""
        if self._options is None:
            self._options = _options.current()
        return self._options

    def reload_options(self) -> None:
        """Parse the options again on next use (the launcher just exported the flags)."""
        self._options = None

    @property
    def metrics(self) -> "ElasticMetrics":
        """This process's ``sglang_elastic_*`` series (SGLang's ``/metrics`` shows them with ``--enable-metrics``)."""
        if self._metrics is None:
            from ..metrics import for_this_process

            self._metrics = for_this_process()
        return self._metrics

    def record(self, update: Callable[["ElasticMetrics"], Any]) -> None:
        """Apply ``update(metrics)``; a metric must never stop serving, so a value it refuses
        (``ValueError``: not finite) or a missing prometheus_client (``ImportError``) is logged and dropped."""
        try:
            update(self.metrics)
        except (ValueError, ImportError) as exc:
            log.debug("sglang_elastic: metric not recorded: %s", exc)

    def bump_placement_version(self) -> None:
        """Record that SGLang's expert-location metadata changed in place, and rewrite the routing hook's
        device tables now (the next step, CUDA-graph replay included, routes on the new placement)."""
        self.placement_version += 1
        if self.routing is not None:
            from . import routing_hook

            routing_hook.on_placement_change(self)

    def flush_degraded_tokens(self) -> int:
        """Move the dispatcher adapters' degraded-token counts (kept on the device) into
        ``sglang_elastic_degraded_tokens_total``; returns the tokens added.

        Reads device counters: a host sync. Call it between forward passes (the updater does, once
        per update chunk), never per pass, and only from the thread that runs the forward passes (a
        sync elsewhere could hit a CUDA graph being captured). Counts are summed over a layer's
        adapters (two with two-batch overlap) and the most any one MoE layer saw is added: a token
        degraded in several layers counts once there, so the series is a lower bound of distinct
        degraded tokens (summed over ranks, each rank counting its own tokens).
        """
        per_layer: Dict[Any, int] = {}
        for d in list(self.dispatchers):
            key = d.layer_id if d.layer_id is not None else id(d)
            per_layer[key] = per_layer.get(key, 0) + d.take_degraded_tokens()
        n = max(per_layer.values(), default=0)
        if n:
            self.record(lambda m: m.add_degraded_tokens(n))
        return n

    def add_scale_listener(self, obj: Any) -> None:
        """Have ``obj.on_scale(from_ep_size, to_ep_size)`` called when SGLang admits ranks (weakly held)."""
        self.scale_listeners.add(obj)


# The one module-level name of the plugin's state: SGLang gives its hooks no place to carry it.
_context: Optional[PluginContext] = None
_lock = threading.Lock()


def get() -> PluginContext:
    """This process's context (created on first call)."""
    global _context
    if _context is None:
        with _lock:
            if _context is None:
                _context = PluginContext()
    return _context


def reset() -> PluginContext:
    """A fresh context (tests; a process that re-initialises the plugin). Returns it."""
    global _context
    with _lock:
        _context = PluginContext()
    return _context
