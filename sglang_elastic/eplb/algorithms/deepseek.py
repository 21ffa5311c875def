"""DeepSeek's EPLB greedy (https://github.com/deepseek-ai/EPLB), written again in numpy.

Same behaviour as the published ``eplb.py`` (and SGLang's copy of it), so placements can be compared
with upstream slot for slot, but vectorised over layers: every loop below walks items or replicas,
and each step is one array operation over all layers at once. The published code loops over layers
in Python, which is what makes it slow at 58+ layers.

Three greedy steps make up the hierarchical policy:

1. :func:`balanced_packing` of expert groups onto nodes (keeps a group's experts on one node, so
   group-limited routing stays within a node);
2. :func:`replicate_experts` within each node (extra replicas go to the hottest experts);
3. :func:`balanced_packing` of the node's physical experts onto its GPUs.

The global policy is the same with one group and one node. DeepSeek's algorithm is not
movement-aware (``current`` is ignored) and may place two replicas of an expert on one rank.
"""
from __future__ import annotations

from typing import Optional, Tuple

import numpy as np
import torch

from .registry import register_algorithm

__all__ = ["balanced_packing", "replicate_experts", "rebalance_experts_hierarchical", "rebalance_experts"]


def _inverse(perm: np.ndarray) -> np.ndarray:
    """Row-wise inverse of a batch of permutations ``[X, n]``."""
    inv = np.empty_like(perm)
    np.put_along_axis(inv, perm, np.broadcast_to(np.arange(perm.shape[1], dtype=perm.dtype), perm.shape), axis=1)
    return inv


def balanced_packing(weight: np.ndarray, num_packs: int) -> Tuple[np.ndarray, np.ndarray]:
    """Pack the ``n`` items of each row into ``num_packs`` packs of exactly ``n / num_packs`` items each.

    Longest-processing-time greedy: items in descending weight order (ties: lower item index first),
    each to the currently lightest pack that still has room (ties: lower pack index).

    Args:
        weight: ``[X, n]`` item weights, one packing problem per row.
        num_packs: must divide ``n``.

    Returns:
        ``(pack_index, rank_in_pack)``, both int64 ``[X, n]``: each item's pack and its position in it.
    """
    X, n = weight.shape
    if n % num_packs:
        raise ValueError(f"cannot pack {n} items into {num_packs} packs of equal size")
    per_pack = n // num_packs
    if per_pack == 1:
        # One item per pack: every assignment is equally balanced. Upstream keeps items in place
        # (item i -> pack i) rather than sorting, and so do we, to produce the same placements.
        return (
            np.broadcast_to(np.arange(n, dtype=np.int64), (X, n)).copy(),
            np.zeros((X, n), dtype=np.int64),
        )
    # Stable sort of the negated weights: descending, equal weights keep their index order.
    order = np.argsort(-weight, axis=1, kind="stable")
    # Item-major copies ([n, X]) so that each step reads one contiguous row.
    sorted_w = np.ascontiguousarray(np.take_along_axis(weight, order, axis=1).T)
    # Work on flat views with precomputed row offsets: 1-D fancy indexing is much cheaper than 2-D.
    load = np.zeros(X * num_packs, dtype=np.float64)  # pack loads; +inf once a pack is full
    fill = np.zeros(X * num_packs, dtype=np.int64)
    pack_base = np.arange(X, dtype=np.int64) * num_packs
    item_flat = np.ascontiguousarray((order + (np.arange(X, dtype=np.int64) * n)[:, None]).T)
    pack_index = np.empty(X * n, dtype=np.int64)
    rank_in_pack = np.empty(X * n, dtype=np.int64)
    for k in range(n):  # k-th heaviest item of every layer at once
        # Lightest pack with room; argmin takes the first minimum, i.e. the lowest pack index.
        pack = load.reshape(X, num_packs).argmin(axis=1)
        slot = pack_base + pack
        item = item_flat[k]
        pack_index[item] = pack
        rank_in_pack[item] = fill[slot]
        # Loads add up item by item in the same order as upstream, so float sums match exactly.
        load[slot] += sorted_w[k]
        fill[slot] += 1
        # A full pack leaves the running (upstream skips it); inf keeps argmin off it.
        load[slot[fill[slot] == per_pack]] = np.inf
    pack_index = pack_index.reshape(X, n)
    rank_in_pack = rank_in_pack.reshape(X, n)
    return pack_index, rank_in_pack


def replicate_experts(weight: np.ndarray, num_phy: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Turn ``num_log`` logical experts into ``num_phy`` physical ones, minimising the hottest replica.

    Each expert first gets one replica (physical ``i`` = logical ``i``); every further replica goes to
    the expert whose load per replica, ``weight / count``, is largest (ties: lower expert index).

    Args:
        weight: ``[X, num_log]`` load per logical expert.
        num_phy: physical experts wanted, ``>= num_log``.

    Returns:
        ``(phy2log, phyrank, logcnt)``: int64 ``[X, num_phy]`` logical expert of each physical one,
        int64 ``[X, num_phy]`` its replica index (0 for the original), int64 ``[X, num_log]`` replica counts.
    """
    X, num_log = weight.shape
    if num_phy < num_log:
        raise ValueError(f"cannot place {num_log} logical experts on {num_phy} physical experts")
    phy2log = np.empty((X, num_phy), dtype=np.int64)
    phy2log[:, :num_log] = np.arange(num_log)
    phyrank = np.zeros((X, num_phy), dtype=np.int64)
    # Flat arrays with row offsets, as in balanced_packing: 1-D fancy indexing is the cheap kind.
    w_flat = weight.astype(np.float64).ravel()
    logcnt = np.ones(X * num_log, dtype=np.int64)
    # Load per replica, kept up to date one entry per layer and step instead of re-dividing the
    # whole array; each entry is still exactly weight / count, so comparisons match upstream's.
    per_replica = w_flat.copy()
    base = np.arange(X, dtype=np.int64) * num_log
    for i in range(num_log, num_phy):  # i-th physical expert of every layer at once
        hot = per_replica.reshape(X, num_log).argmax(axis=1)  # first maximum: lowest expert index wins ties
        at = base + hot
        phy2log[:, i] = hot
        phyrank[:, i] = logcnt[at]
        logcnt[at] += 1
        per_replica[at] = w_flat[at] / logcnt[at]
    logcnt = logcnt.reshape(X, num_log)
    return phy2log, phyrank, logcnt


def rebalance_experts_hierarchical(
    weight: np.ndarray, num_physical: int, num_groups: int, num_nodes: int, num_gpus: int
) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """DeepSeek's hierarchical policy: groups to nodes, replicas within nodes, replicas to GPUs.

    Args:
        weight: float ``[L, E]`` load per logical expert.
        num_physical: physical experts per layer (a multiple of ``num_gpus``, at least ``E``).
        num_groups: expert groups (divides ``E``; a multiple of ``num_nodes``).
        num_nodes: nodes (divides ``num_gpus``).
        num_gpus: GPUs (ranks).

    Returns:
        ``(phy2log, phyrank, logcnt)`` int64: ``[L, num_physical]`` logical expert per slot (GPU-major),
        ``[L, num_physical]`` replica index per slot, ``[L, E]`` replicas per logical expert.
    """
    weight = np.asarray(weight, dtype=np.float64)
    L, E = weight.shape
    if num_groups <= 0 or E % num_groups:
        raise ValueError(f"num_groups ({num_groups}) must divide the number of experts ({E})")
    if num_nodes <= 0 or num_groups % num_nodes:
        raise ValueError(f"num_groups ({num_groups}) must be a multiple of num_nodes ({num_nodes})")
    if num_gpus <= 0 or num_gpus % num_nodes:
        raise ValueError(f"num_gpus ({num_gpus}) must be a multiple of num_nodes ({num_nodes})")
    if num_physical % num_gpus or num_physical < E:
        raise ValueError(f"num_physical ({num_physical}) must be a multiple of num_gpus ({num_gpus}) and >= {E}")
    group_size = E // num_groups
    groups_per_node = num_groups // num_nodes
    gpus_per_node = num_gpus // num_nodes
    slots_per_gpu = num_physical // num_gpus
    log_per_node = E // num_nodes
    phy_per_node = num_physical // num_nodes

    # Step 1: whole groups onto nodes, balancing the groups' summed load.
    group_load = weight.reshape(L, num_groups, group_size).sum(axis=-1)
    group_node, group_rank = balanced_packing(group_load, num_nodes)
    # Renumber logical experts node-major ("mlog"): node, then the group's position on the node,
    # then the expert's position in its group. Node n then owns mlog ids [n*E/N, (n+1)*E/N).
    log2mlog = (
        ((group_node * groups_per_node + group_rank) * group_size)[:, :, None] + np.arange(group_size)
    ).reshape(L, E)
    mlog2log = _inverse(log2mlog)

    # Step 2: each (layer, node) is an independent replication problem over its own experts.
    mlog_load = np.take_along_axis(weight, mlog2log, axis=1).reshape(L * num_nodes, log_per_node)
    phy2mlog, phyrank, mlogcnt = replicate_experts(mlog_load, phy_per_node)

    # Step 3: the node's physical experts (load split evenly over replicas) onto its GPUs.
    phy_load = np.take_along_axis(mlog_load / mlogcnt, phy2mlog, axis=1)
    gpu, rank_on_gpu = balanced_packing(phy_load, gpus_per_node)
    pphy2phy = _inverse(gpu * slots_per_gpu + rank_on_gpu)  # slot on the node -> physical expert

    # Back to global numbering: slot -> node-local mlog -> global mlog -> logical expert.
    pphy2mlog = np.take_along_axis(phy2mlog, pphy2phy, axis=1).reshape(L, num_nodes, phy_per_node)
    pphy2mlog = (pphy2mlog + (np.arange(num_nodes) * log_per_node)[:, None]).reshape(L, num_physical)
    phy2log = np.take_along_axis(mlog2log, pphy2mlog, axis=1)
    pphyrank = np.take_along_axis(phyrank, pphy2phy, axis=1).reshape(L, num_physical)
    logcnt = np.take_along_axis(mlogcnt.reshape(L, E), log2mlog, axis=1)
    return phy2log, pphyrank, logcnt


def rebalance_experts(
    weight: torch.Tensor, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Torch front end with upstream's ``rebalance_experts_hierarchical`` signature and results.

    ``weight`` ``[L, E]`` (tensor or array) is computed on in float64. ``num_groups=1, num_nodes=1``
    gives the global policy. Returns int64 tensors ``(phy2log [L, num_replicas],
    phyrank [L, num_replicas], logcnt [L, E])``.
    """
    w = weight.detach().cpu().double().numpy() if isinstance(weight, torch.Tensor) else np.asarray(weight, np.float64)
    out = rebalance_experts_hierarchical(w, num_replicas, num_groups, num_nodes, num_gpus)
    return tuple(torch.from_numpy(np.ascontiguousarray(a)) for a in out)  # type: ignore[return-value]


@register_algorithm("deepseek", allows_duplicates=True)
def deepseek(
    weight: np.ndarray,
    num_ranks: int,
    slots_per_rank: int,
    live: np.ndarray,
    ranks_per_node: Optional[int],
    current: Optional[np.ndarray],
    *,
    num_groups: Optional[int] = None,
    **unknown,
) -> np.ndarray:
    """DeepSeek's EPLB as a registered algorithm (option ``num_groups``: expert groups, or ``None``).

    Hierarchical when ``num_groups`` and ``ranks_per_node`` are given, every rank is live and the
    groups split evenly over nodes; otherwise global over the live ranks only, whose rows are then
    laid into the live ranks' slots (dead ranks' slots hold -1), as SGLang's elastic fallback does.
    ``current`` is ignored: this algorithm does not try to limit expert movement.
    """
    if unknown:
        raise TypeError(f"deepseek EPLB got unknown option(s) {sorted(unknown)}; its only option is num_groups")
    L, E = weight.shape
    if num_groups is not None:
        if not isinstance(num_groups, (int, np.integer)) or isinstance(num_groups, bool) or num_groups <= 0:
            raise ValueError(f"num_groups must be a positive integer or None, got {num_groups!r}")
        if E % num_groups:
            raise ValueError(f"num_groups ({num_groups}) must divide the number of logical experts ({E})")
    live = np.asarray(live, dtype=bool)
    if num_groups is not None and ranks_per_node is not None and live.all():
        num_nodes = num_ranks // ranks_per_node
        if num_groups % num_nodes == 0:
            return rebalance_experts_hierarchical(
                weight, num_ranks * slots_per_rank, int(num_groups), num_nodes, num_ranks
            )[0]
    # Global policy over the live ranks: plan as if only they existed, then scatter rank rows back.
    n_live = int(live.sum())
    phy2log = rebalance_experts_hierarchical(weight, n_live * slots_per_rank, 1, 1, n_live)[0]
    out = np.full((L, num_ranks, slots_per_rank), -1, dtype=np.int64)
    out[:, live, :] = phy2log.reshape(L, n_live, slots_per_rank)
    return out.reshape(L, num_ranks * slots_per_rank)
