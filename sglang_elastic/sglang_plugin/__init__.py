"""SGLang plugin: SGLang's own flags run on sglang_elastic.

Registered under SGLang's entry-point group ``sglang.srt.plugins`` (name ``sglang_elastic``), so
with this package installed SGLang's ``load_plugins()`` calls :func:`register` in every process
(launcher, schedulers, DP controller, detokenizer) before anything else runs. ``register`` queues
hooks on SGLang's ``HookRegistry``; SGLang applies them right after, and a REPLACE of a class or
function also rebinds every module that imported it by name.

What is replaced or hooked (see ``docs/sglang.md``):

=======================================================================================  ==========================
``sglang.srt.eplb.eplb_algorithms.elasticity_aware.rebalance_experts``                   REPLACE: our algorithm
``sglang.srt.eplb.expert_location_updater.ExpertLocationUpdater``                        REPLACE: our updater
``sglang.srt.eplb.eplb_manager.EPLBManager.on_forward_pass_end``                          AROUND: background commits
``sglang.srt.elastic_ep.elastic_ep.ElasticEPStateManager``                               REPLACE: our state
``sglang.srt.layers.moe.token_dispatcher.nixl.NixlEPDispatcher``                         REPLACE: our dispatcher
``sglang.srt.layers.moe.token_dispatcher.mooncake.MooncakeEPDispatcher``                 REPLACE: our dispatcher
``sglang.srt.layers.moe.fused_moe_triton.layer.FusedMoE.__init__``                       AFTER: adapters' layer id
``sglang.srt.eplb.expert_location_dispatch.topk_ids_logical_to_physical``                REPLACE: the routing rule
``sglang.srt.eplb.expert_location_dispatch.ExpertLocationDispatchInfo.init_new``         AFTER: info's layer id
``sglang.srt.eplb.expert_location.ExpertLocationMetadata.update``                        AFTER: routing tables
``sglang.srt.server_args.ServerArgs.add_cli_args``                                       AFTER: our flags
``sglang.srt.server_args.ServerArgs.from_cli_args``                                      AFTER: flags -> env
``sglang.srt.entrypoints.http_server._setup_and_run_http_server``                        BEFORE: drain routes
``sglang.srt.managers.scheduler.Scheduler.__init__``                                     AFTER: drain RPC step
``sglang.srt.managers.scheduler.Scheduler.__init__``                                     AFTER: EPLB kernels warm-up
=======================================================================================  ==========================

The three routing hooks (:mod:`.routing_hook`) run our routing rule where SGLang's top-k maps logical
experts to physical slots: one launch per MoE layer per step, tables on the device rewritten in place
after every placement change. The ``FusedMoE.__init__`` hook gives each dispatcher adapter its layer
id, which groups the adapters' degraded-token counts per layer
(:meth:`.context.PluginContext.flush_degraded_tokens`). The two drain hooks add ``POST
/elastic_ep/drain`` and ``GET /elastic_ep/status`` (HTTP process) and the drain's step as an RPC of
every scheduler (:mod:`.drain_sglang`).

Version gate: only :data:`SUPPORTED_SGLANG_VERSIONS` get hooks; any other version logs one warning
and nothing is applied. ``SGLANG_PLUGINS`` filtering is SGLang's own (it never calls us when our
name is not listed). This package is the only part of sglang_elastic that imports sglang, lazily.
"""
from __future__ import annotations

import logging
from typing import Callable, List, Optional, Tuple

__all__ = ["register", "SUPPORTED_SGLANG_VERSIONS", "PLUGIN_NAME", "registered_targets"]

log = logging.getLogger(__name__)

PLUGIN_NAME = "sglang_elastic"
SUPPORTED_SGLANG_VERSIONS: Tuple[str, ...] = ("0.5.23",)


def installed_sglang_version() -> Optional[str]:
    """The installed SGLang distribution's version, or None when it is not installed."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("sglang")
    except PackageNotFoundError:
        return None


def registered_targets() -> List[str]:
    """Targets this process queued hooks on (empty before :func:`register` or when the gate refused)."""
    from . import context

    return list(context.get().registered)


def _hooks() -> List[Tuple[str, Callable[[], object], str]]:
    """(target, loader of the hook object, hook type name). Loaders import lazily, each on its own, so
    a hook whose module cannot load here (say, SGLang's dispatchers without torchvision) skips alone;
    a loader returning None means "not in this process"."""

    def algorithm():
        from .eplb import rebalance_experts

        return rebalance_experts

    def updater():
        from .updater import ElasticExpertLocationUpdater

        return ElasticExpertLocationUpdater

    def state():
        from .state import SGLangElasticEPStateManager

        return SGLangElasticEPStateManager

    def nixl():
        from .dispatcher import ElasticNixlEPDispatcher

        return ElasticNixlEPDispatcher

    def mooncake():
        from .dispatcher import ElasticMooncakeEPDispatcher

        return ElasticMooncakeEPDispatcher

    def pass_end():
        from .updater import around_forward_pass_end

        return around_forward_pass_end

    def layer_id():
        from .dispatcher import set_layer_id_after_init

        return set_layer_id_after_init

    def topk_map():
        from .routing_hook import topk_ids_logical_to_physical

        return topk_ids_logical_to_physical

    def topk_layer():
        from .routing_hook import tag_layer_after_init_new

        return tag_layer_after_init_new

    def topk_refresh():
        from .routing_hook import refresh_after_update

        return refresh_after_update

    def cli():
        from .options import after_add_cli_args

        return after_add_cli_args

    def env():
        from .options import after_from_cli_args

        return after_from_cli_args

    def drain_routes():
        import multiprocessing

        if multiprocessing.parent_process() is not None:
            return None  # SGLang's HTTP server runs in the launcher only: no need to import it elsewhere
        from .drain_sglang import before_http_server

        return before_http_server

    def drain_steps():
        from .drain_sglang import after_scheduler_init

        return after_scheduler_init

    def warm():
        from .eplb import warm_up_after_scheduler_init

        return warm_up_after_scheduler_init

    return [
        ("sglang.srt.eplb.eplb_algorithms.elasticity_aware.rebalance_experts", algorithm, "REPLACE"),
        ("sglang.srt.eplb.expert_location_updater.ExpertLocationUpdater", updater, "REPLACE"),
        ("sglang.srt.eplb.eplb_manager.EPLBManager.on_forward_pass_end", pass_end, "AROUND"),
        ("sglang.srt.elastic_ep.elastic_ep.ElasticEPStateManager", state, "REPLACE"),
        ("sglang.srt.layers.moe.token_dispatcher.nixl.NixlEPDispatcher", nixl, "REPLACE"),
        ("sglang.srt.layers.moe.token_dispatcher.mooncake.MooncakeEPDispatcher", mooncake, "REPLACE"),
        ("sglang.srt.layers.moe.fused_moe_triton.layer.FusedMoE.__init__", layer_id, "AFTER"),
        ("sglang.srt.eplb.expert_location_dispatch.topk_ids_logical_to_physical", topk_map, "REPLACE"),
        ("sglang.srt.eplb.expert_location_dispatch.ExpertLocationDispatchInfo.init_new", topk_layer, "AFTER"),
        ("sglang.srt.eplb.expert_location.ExpertLocationMetadata.update", topk_refresh, "AFTER"),
        ("sglang.srt.server_args.ServerArgs.add_cli_args", cli, "AFTER"),
        ("sglang.srt.server_args.ServerArgs.from_cli_args", env, "AFTER"),
        ("sglang.srt.entrypoints.http_server._setup_and_run_http_server", drain_routes, "BEFORE"),
        ("sglang.srt.managers.scheduler.Scheduler.__init__", drain_steps, "AFTER"),
        ("sglang.srt.managers.scheduler.Scheduler.__init__", warm, "AFTER"),
    ]


def register() -> None:
    """SGLang's plugin entry point (zero arguments): queue our hooks when the SGLang version is supported.

    Idempotent per process. On an unsupported version: one warning, nothing queued.
    """
    from . import context

    ctx = context.get()
    if ctx.hooks_queued:
        return
    ctx.hooks_queued = True
    version = installed_sglang_version()
    if version not in SUPPORTED_SGLANG_VERSIONS:
        log.warning("sglang_elastic: SGLang %s is not a supported version (supported: %s); the plugin applies "
                    "nothing and SGLang runs its own implementation", version, ", ".join(SUPPORTED_SGLANG_VERSIONS))
        return
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    for target, load, kind in _hooks():
        try:
            hook = load()
        except Exception as exc:  # any import-time failure (e.g. SGLang's dispatcher modules
            # need torchvision) is safe to swallow: that target alone keeps SGLang's implementation, logged
            log.warning("sglang_elastic: not hooking %s: %s: %s", target, type(exc).__name__, exc)
            continue
        if hook is None:
            continue
        HookRegistry.register(target, hook, HookType[kind])
        ctx.registered.append(target)
    log.info("sglang_elastic: %d hooks queued on %d SGLang targets", len(ctx.registered), len(set(ctx.registered)))
