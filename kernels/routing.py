"""Triton kernel for the routing hot step: logical -> physical slot, live mask, load record, in one pass.

Reference: :func:`sglang_elastic.dispatch.routing._pick_replica` (plus the ``load`` accumulation of
:func:`~sglang_elastic.dispatch.routing.route`). The output is bit-identical to it: every step is
integer arithmetic, and the replica rule is evaluated the same way (the ``j``-th live replica in
``log2phy`` order, ``j = (token_offset + t + e) mod n_live``, floor modulo as in torch).

The degraded policies (renormalise / reroute) are not here: they run in torch on the (rare) pairs
this step marks ``-1``.

Importing this module imports Triton; :mod:`sglang_elastic.kernels` imports it lazily.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

__all__ = ["map_mask_record"]

_BLOCK = 256  # pairs per program: X_PAD columns each, so the [BLOCK, X_PAD] tile stays in registers


@triton.jit(do_not_specialize=["token_offset"])
def _map_mask_record_kernel(ids_ptr, l2p_ptr, live_ptr, phys_ptr, load_ptr, n_pairs, K, E, X, R, S, token_offset,
                            HAS_LOAD: tl.constexpr, X_PAD: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    in_range = offs < n_pairs
    ids = tl.load(ids_ptr + offs, mask=in_range, other=-1).to(tl.int64)
    # torch would raise on ids >= E; reading past log2phy instead would be silent, so such pairs
    # are treated as unroutable (-1, not counted).
    known = in_range & (ids >= 0) & (ids < E)
    e = tl.where(known, ids, 0)

    xs = tl.arange(0, X_PAD)
    cand = tl.load(l2p_ptr + e[:, None] * X + xs[None, :], mask=known[:, None] & (xs[None, :] < X), other=-1)
    valid = cand >= 0
    rank = tl.where(valid, cand, 0) // S
    alive = tl.load(live_ptr + rank, mask=valid & (rank < R), other=0) != 0
    live = (valid & alive).to(tl.int32)
    n_live = tl.sum(live, axis=1)

    # Floor modulo (torch's %), whatever the sign of token_offset: Triton's % truncates.
    m = tl.maximum(n_live, 1).to(tl.int64)
    j = ((offs // K) + token_offset + e) % m
    j = tl.where(j < 0, j + m, j)
    nth = (tl.cumsum(live, axis=1) - 1).to(tl.int64)
    hit = (live != 0) & (nth == j[:, None])
    # Exactly one column hits when n_live > 0, so the sum picks that slot.
    phys = tl.sum(tl.where(hit, cand, 0), axis=1)
    phys = tl.where(known & (n_live > 0), phys, -1)
    tl.store(phys_ptr + offs, phys, mask=in_range)

    if HAS_LOAD:
        # Integer atomics commute, so the counts are exact and deterministic.
        tl.atomic_add(load_ptr + e, 1, mask=known)


def map_mask_record(topk_ids: torch.Tensor, log2phy_layer: torch.Tensor, live_mask: torch.Tensor,
                    slots_per_rank: int, token_offset: int = 0, load: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Physical slot of each (token, expert) pair on a live rank, recording the router's demand.

    Args:
        topk_ids: int ``[T, K]`` logical experts, ``-1`` = unused pair.
        log2phy_layer: int64 ``[E, X]`` physical slots of each expert, ``-1`` padded.
        live_mask: ``[R]`` (bool or int), nonzero = rank alive; slot ``p`` is on rank ``p // slots_per_rank``.
        slots_per_rank: ``S``.
        token_offset: global id of token 0, for the replica choice.
        load: optional ``[E]`` accumulator (int64 usually); each id ``>= 0`` adds 1 in place.

    Returns:
        int64 ``[T, K]``: the slot, ``-1`` for unused pairs and experts with no live replica.
    """
    if topk_ids.dim() != 2 or log2phy_layer.dim() != 2:
        raise ValueError(f"expected topk_ids [T, K] and log2phy [E, X], got {tuple(topk_ids.shape)} "
                         f"and {tuple(log2phy_layer.shape)}")
    T, K = topk_ids.shape
    E, X = log2phy_layer.shape
    ids = topk_ids.contiguous()
    l2p = log2phy_layer.to(torch.int64).contiguous()
    live = live_mask.contiguous()
    if live.dtype == torch.bool:
        live = live.view(torch.uint8)  # same bytes; avoids i1 pointer handling differences
    phys = torch.empty(T, K, dtype=torch.int64, device=ids.device)
    n_pairs = T * K
    if n_pairs == 0:
        return phys
    if load is not None and not load.is_contiguous():
        raise ValueError("load must be contiguous (it is updated in place)")
    grid = (triton.cdiv(n_pairs, _BLOCK),)
    _map_mask_record_kernel[grid](
        ids, l2p, live, phys, load if load is not None else phys, n_pairs, K, E, X, live.numel(),
        int(slots_per_rank), int(token_offset),
        HAS_LOAD=load is not None, X_PAD=triton.next_power_of_2(max(X, 1)), BLOCK=_BLOCK, num_warps=4)
    return phys
