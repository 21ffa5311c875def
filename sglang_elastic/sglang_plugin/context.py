"""The plugin's one per-process context: everything its hooks share, in one typed object.

SGLang calls our hooks as free functions and classes it constructs itself, so whatever they share
must be reachable without arguments; it lives here, in one object, instead of module globals spread
over the plugin:

* ``options``: the plugin's flags, parsed once from the environment (:func:`options.current`, the
  one reader of ``SGLANG_ELASTIC_*``) the first time something needs them;
* ``last_load``: the ``[layers, E]`` load of the last rebalance (written by the EPLB drop-in, read by
  the updater bridge when it repairs a target over the survivors of a mid-update death);
* ``placement_version``: bumped when SGLang's expert-location metadata changes in place, so the
  dispatcher adapters rebuild their replica tables;
* ``liveness``: the process's :class:`~sglang_elastic.transport.Liveness` (deaths the state learns
  of are recorded there; waits consult it);
* ``scale_listeners``: objects told about SGLang's ``on_scale`` (weakly held);
* ``metrics``: the ``sglang_elastic_*`` Prometheus series (created on first use, after SGLang has
  set ``PROMETHEUS_MULTIPROC_DIR``);
* ``registered`` / ``hooks_queued``: what :func:`sglang_elastic.sglang_plugin.register` did;
* ``scheduler_drain``: this scheduler's side of a drain (``drain.SchedulerDrain``).
"""
from __future__ import annotations

import logging
import threading
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, List, Optional

import torch

from ..transport.liveness import Liveness
from . import options as _options

if TYPE_CHECKING:
    from ..metrics import ElasticMetrics

__all__ = ["PluginContext", "get", "reset"]

log = logging.getLogger(__name__)


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
        """Record that SGLang's expert-location metadata changed in place."""
        self.placement_version += 1

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
