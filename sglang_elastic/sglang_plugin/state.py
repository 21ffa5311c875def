"""One live-rank truth: SGLang's ``ElasticEPStateManager`` name, our manager underneath.

The plugin REPLACEs ``sglang.srt.elastic_ep.elastic_ep.ElasticEPStateManager`` with
:class:`SGLangElasticEPStateManager`, a subclass of ours whose singleton *is* ours
(``sglang_elastic.state.ElasticEPStateManager._instance``): SGLang's model runner, EPLB manager,
expert-location updater and dispatchers, our algorithm bridge, our updater bridge and our
dispatchers all read and write the same :class:`~sglang_elastic.state.ElasticEPState` object.

Only ``init`` needs SGLang's runtime (upstream semantics: capacity ``--max-ep-size`` or the world
size, joiner state for ``--elastic-ep-join-mode``); everything else is our manager's
upstream-compatible surface. Upstream code that writes ``active_ranks`` in place and then calls
``sync_active_to_cpu()`` (the joiner path does) is adopted by our state as failed/joined events with
an epoch bump, so our listeners hear about it.
"""
from __future__ import annotations

import logging
import time
from typing import Any, Optional, Union

import torch

from ..state import ElasticEPEvent, ElasticEPState
from ..state import ElasticEPStateManager as _OurManager
from . import context

__all__ = ["SGLangElasticEPStateManager", "add_scale_listener", "placement_version", "bump_placement_version"]

log = logging.getLogger(__name__)


def placement_version() -> int:
    """Counter of in-place changes to SGLang's expert-location metadata made through the plugin (each
    bump rewrites the routing hook's device tables at once)."""
    return context.get().placement_version


def bump_placement_version() -> None:
    """Record that SGLang's expert-location metadata changed in place (see
    :meth:`.context.PluginContext.bump_placement_version`: the routing tables follow at once)."""
    context.get().bump_placement_version()


def add_scale_listener(obj: Any) -> None:
    """Have ``obj.on_scale(from_ep_size, to_ep_size)`` called when SGLang admits ranks (weakly held)."""
    context.get().add_scale_listener(obj)


def _notify_scale(from_ep_size: int, to_ep_size: int) -> None:
    for obj in list(context.get().scale_listeners):
        try:
            obj.on_scale(from_ep_size, to_ep_size)
        except Exception:  # one listener's failure must not keep the others (or the scale) from proceeding
            log.exception("sglang_elastic: on_scale(%d, %d) failed in %r", from_ep_size, to_ep_size, obj)


def _sglang_device() -> torch.device:
    """Where SGLang keeps ``active_ranks``: cuda on CUDA builds, else cpu (upstream's rule)."""
    try:
        from sglang.srt.utils import is_cuda

        if is_cuda():
            return torch.device("cuda")
    except context.NOT_PUBLISHED:  # SGLang's platform probe failing here only means "not CUDA": fall back to torch's
        pass
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


class SGLangElasticEPStateManager(_OurManager):
    """SGLang's ``ElasticEPStateManager`` surface over our process-wide state.

    Class attributes are read through to our manager; the two that upstream code assigns
    (``_instance`` in ``init``/``reset`` and ``_on_scale``) are always written on our manager so no
    shadow copy appears on this subclass.
    """

    @classmethod
    def instance(cls) -> Optional[ElasticEPState]:
        return _OurManager._instance

    @classmethod
    def init(cls, server_args: Any = None, **kw: Any) -> Optional[ElasticEPState]:
        """Upstream ``init(server_args)`` when SGLang's runtime is published, else our keyword init."""
        if _OurManager._instance is not None:
            return _OurManager._instance
        if kw or server_args is None:
            return _OurManager.init(server_args, **kw)
        try:
            from sglang.srt.runtime_context import get_exec, get_parallel

            moe, par = get_exec().moe, get_parallel()
            backend = moe.elastic_ep_backend
        except context.NOT_PUBLISHED:  # nothing published (tests, tools): read the record itself
            return _OurManager.init(server_args)
        if backend is None:
            return None
        return cls._init_from_runtime(moe, par)

    @classmethod
    def _init_from_runtime(cls, moe: Any, par: Any) -> ElasticEPState:
        """Upstream's init: capacity, serving size, nixl scale hook, joiner state."""
        world = torch.distributed.get_world_size()
        capacity = par.max_world_size
        if capacity < world:
            raise ValueError(f"--max-ep-size ({capacity}) must be >= world_size ({world})")
        joiner = bool(getattr(moe, "is_ep_joiner", False))
        live = [torch.distributed.get_rank()] if joiner else range(world)
        state = _OurManager.init(ep_size=world, max_ep_size=capacity, device=_sglang_device(), live=live)
        state.effective_ep_size = state.original_ep_size = world
        state.ep_join_rank_offset = par.ep_join_rank_offset
        if joiner and moe.ep_join_mode == "scale":
            state.effective_ep_size = par.ep_join_rank_offset + par.tp_size
            state.original_ep_size = par.elastic_ep_initial_size or par.ep_join_rank_offset
            state.has_scaled = True
        state.add_listener(_on_event)
        _on_event(None)
        if moe.moe_a2a_backend in ("nixl", "mooncake"):
            _OurManager._on_scale = _on_scale_both
        log.info("[sglang_elastic] elastic EP state: capacity=%d world=%d live=%s (joiner=%s)",
                 capacity, world, state.live_ranks(), joiner)
        return state

    @classmethod
    def reset(cls) -> None:
        _OurManager.reset()

    @classmethod
    def healthy_rank_state(cls, ep_size: Optional[int] = None,
                           device: Optional[Union[str, torch.device]] = None) -> torch.Tensor:
        return _OurManager.healthy_rank_state(ep_size=ep_size, device=device)

    # upstream private helpers that other upstream code may call
    @staticmethod
    def _select_device() -> torch.device:
        return _sglang_device()

    @classmethod
    def _build_state(cls, *, ep_size: Optional[int] = None, device: Optional[torch.device] = None) -> ElasticEPState:
        return ElasticEPState(ep_size if ep_size is not None else torch.distributed.get_world_size(),
                              device if device is not None else _sglang_device())

    @staticmethod
    def _on_scale_nixl(from_ep_size: int, to_ep_size: int) -> None:
        _on_scale_both(from_ep_size, to_ep_size)


def reason_label(reason: str) -> str:
    """A few stable label values for ``sglang_elastic_rank_failures_total{reason}`` from free-text reasons."""
    r = reason.lower()
    for key, label in (("drain", "drained"), ("peerfailure", "peer_failure"), ("timeout", "timeout"),
                       ("membership", "membership"), ("restart", "restarted")):
        if key in r:
            return label
    return "other"


def _on_event(event: Optional[ElasticEPEvent]) -> None:
    """State listener: the context's liveness, and the metrics (``None``: just the initial view).

    Failures are counted once per cluster: by the lowest live rank's process (counters are summed
    over SGLang's processes). The failover clock starts here and stops after the next update.
    """
    ctx = context.get()
    state = _OurManager.instance()
    if state is None:
        return
    live = state.live_ranks()
    if event is not None:
        for r in event.ranks:
            if event.kind == "failed":
                ctx.liveness.mark_dead(r, event.reason or "failed")
            else:
                ctx.liveness.mark_alive(r)
        if event.kind == "failed":
            ctx.failover_since = time.monotonic()
    reporter = bool(live) and _this_rank() == min(live)

    def update(m) -> None:
        m.set_membership(len(live), state.epoch)
        if event is not None and event.kind == "failed" and reporter:
            m.rank_failed(reason_label(event.reason), len(event.ranks))

    ctx.record(update)
    _publish_view()


def _publish_view() -> None:
    """EP rank 0 publishes the cluster view for the drain routes (the HTTP process reads it)."""
    if _this_rank() != 0 or not context.get().options.run_dir:
        return
    from .drain_sglang import publish_cluster_view

    try:
        publish_cluster_view()
    except OSError as exc:  # the run folder went away: drain requests answer 503, serving goes on
        log.warning("sglang_elastic: cannot publish the elastic EP state: %s", exc)


def _this_rank() -> int:
    """This process's EP rank (0 without torch.distributed)."""
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def _on_scale_both(from_ep_size: int, to_ep_size: int) -> None:
    """SGLang admitted ranks: tell our dispatcher adapters, and upstream's NIXL buffer facade if loaded."""
    _notify_scale(from_ep_size, to_ep_size)

