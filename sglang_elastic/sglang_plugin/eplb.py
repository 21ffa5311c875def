"""Our elasticity-aware EPLB behind SGLang's ``elasticity_aware.rebalance_experts``.

SGLang's ``eplb_algorithms.rebalance_experts`` calls ``elasticity_aware.rebalance_experts`` (through
the module attribute, so a REPLACE of that function reaches every caller: ``init_by_eplb``, the
periodic ``EPLBManager.rebalance``, the fault rebalance and the post-scale rebalance). It passes the
upstream manager's ``active_ranks`` but not the placement in force; we add both from our side:

* live ranks: our :class:`~sglang_elastic.state.ElasticEPStateManager` host mirror when it is
  initialised (the bridge makes it SGLang's manager too), else the mask SGLang passed;
* current placement: SGLang's global ``ExpertLocationMetadata`` when its shape matches, with the
  slots of dead ranks emptied (their weights are gone).

The first call in a process would compile the algorithm's numba kernels (3-7 s, GIL held) or load
them from numba's disk cache (~0.3 s): on a failover, the scheduler would stall that long, and its
heartbeats with it. :func:`warm_up_after_scheduler_init` (an AFTER hook on ``Scheduler.__init__``)
does that in a background thread as soon as a scheduler that may call us exists.
"""
from __future__ import annotations

import logging
import threading
from typing import Any, Optional, Tuple

import numpy as np
import torch

from ..eplb import warm_up_in_background
from ..eplb.algorithms import rebalance
from ..eplb.metrics import balancedness
from ..eplb.placement import Placement
from ..state import ElasticEPStateManager as _OurManager
from . import context

__all__ = ["rebalance_experts", "live_mask", "current_placement", "last_load", "uses_our_eplb",
           "start_warm_up", "warm_up_after_scheduler_init"]

log = logging.getLogger(__name__)


def uses_our_eplb() -> bool:
    """Whether this process's published SGLang config may call our EPLB: ``--eplb-algorithm
    elasticity_aware[_hierarchical]``, or an ``--elastic-ep-backend`` (SGLang then requires that
    algorithm or ``auto``, which it turns into it). False where no config is published."""
    try:
        from sglang.srt.runtime_context import get_exec

        moe = get_exec().moe
    except context.NOT_PUBLISHED:
        return False
    return str(moe.eplb_algorithm).startswith("elasticity_aware") or moe.elastic_ep_backend is not None


def start_warm_up() -> threading.Thread:
    """Compile or load the EPLB kernels (:func:`sglang_elastic.eplb.warm_up`) in a daemon thread,
    once per process (kept on the plugin context); returns that thread (the same one on later calls)."""
    ctx = context.get()
    with ctx.eplb_warm_up_lock:
        if ctx.eplb_warm_up is None:
            ctx.eplb_warm_up = warm_up_in_background("sglang-elastic-eplb-warm-up")
        return ctx.eplb_warm_up


def warm_up_after_scheduler_init(result: Any, scheduler: Any, *args: Any, **kwargs: Any) -> None:
    """AFTER hook on ``Scheduler.__init__``: where this scheduler may call our EPLB
    (:func:`uses_our_eplb`), get its kernels ready in the background (:func:`start_warm_up`), so that
    neither the first failover nor the first periodic rebalance waits for a compile."""
    if uses_our_eplb():
        start_warm_up()


def last_load() -> Optional[torch.Tensor]:
    """``[layers, E]`` load given to the last :func:`rebalance_experts` call in this process, or None
    (kept on the plugin context: the updater bridge re-plans with it when a peer dies mid-update)."""
    return context.get().last_load


def live_mask(num_ranks: int, passed: Optional[torch.Tensor] = None) -> np.ndarray:
    """bool ``[num_ranks]``: live EP ranks, from our state manager when initialised, else ``passed``.

    Our state's capacity may exceed ``num_ranks`` (``--max-ep-size``): ranks past the serving size
    are not part of this placement. Raises ``ValueError`` if neither source covers ``num_ranks``.
    """
    inst = _OurManager.instance()
    src = inst.active_ranks_cpu if inst is not None else passed
    if src is None:
        return np.ones(num_ranks, dtype=bool)
    mask = src.detach().cpu().numpy().astype(bool).reshape(-1)
    if mask.shape[0] < num_ranks:
        raise ValueError(f"the live-rank mask covers {mask.shape[0]} ranks, the placement needs {num_ranks}")
    return mask[:num_ranks].copy()


def current_placement(num_layers: int, num_physical: int, num_ranks: int, num_logical: int,
                      live: np.ndarray) -> Optional[torch.Tensor]:
    """The placement in force as ``phy2log [L, P]`` with dead ranks' slots ``-1``, or None when SGLang
    has none of this shape (first placement, or the slot count changed by a scale)."""
    try:
        from sglang.srt.eplb.expert_location import get_global_expert_location_metadata

        meta = get_global_expert_location_metadata()
    except context.NOT_PUBLISHED:  # no runtime context published in this process
        return None
    if meta is None:
        return None
    p2l = meta.physical_to_logical_map_cpu
    if tuple(p2l.shape) != (num_layers, num_physical) or int(p2l.max()) >= num_logical:
        return None
    return Placement.from_sglang(p2l, num_ranks, num_logical, live).phy2log


def rebalance_experts(
    weight: torch.Tensor,
    num_replicas: int,
    num_groups: Optional[int],
    num_nodes: int,
    num_gpus: int,
    enable_hierarchical: bool,
    active_ranks: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Drop-in for SGLang 0.5.23's ``elasticity_aware.rebalance_experts`` (same arguments and triple).

    ``enable_hierarchical`` spreads replicas over ``num_nodes`` nodes (kept when ranks are dead).
    ``num_groups`` is accepted for signature compatibility. Options come from the plugin's flags.
    """
    ctx = context.get()
    opts = ctx.options
    if num_replicas % num_gpus:
        raise ValueError(f"num_replicas ({num_replicas}) must be a multiple of num_gpus ({num_gpus})")
    w = weight.detach().to("cpu", torch.float64)
    L, E = w.shape
    live = live_mask(num_gpus, active_ranks)
    rpn = num_gpus // num_nodes if enable_hierarchical and num_nodes > 1 else None
    cur = current_placement(L, num_replicas, num_gpus, E, live) if opts.eplb_movement_aware else None
    extra = {k: v for k, v in (("min_balance", opts.eplb_min_balance),
                               ("balance_tolerance", opts.eplb_balance_tolerance),
                               ("balance_reference", opts.eplb_balance_reference),
                               ("max_swaps", opts.eplb_max_swaps)) if v is not None}
    placement = rebalance(w, num_gpus, num_replicas // num_gpus, live_ranks=live, ranks_per_node=rpn,
                          current=cur, algorithm="elasticity_aware", **extra)
    ctx.last_load = w.clone()
    _log_result(placement, w, live, cur)
    return placement.to_sglang()


def _log_result(placement: Placement, w: torch.Tensor, live: np.ndarray, cur: Optional[torch.Tensor]) -> None:
    """One INFO line per rebalance: balancedness, live ranks, and slots whose expert changed (live ranks)."""
    bal = balancedness(w, placement)
    moved = "n/a"
    if cur is not None:
        new = placement.phy2log
        changed = (new != cur) & (new >= 0) & (cur >= 0)
        moved = f"{int(changed.sum())}/{int((new >= 0).sum())}"
    context.get().record(lambda m: m.set_balancedness(bal))
    log.info("[sglang_elastic] EPLB elasticity_aware: balancedness=%.4f live_ranks=%d/%d changed_slots=%s",
             bal, int(live.sum()), live.shape[0], moved)
