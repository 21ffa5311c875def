"""Torch references of the kernels (pure torch, any device): the single routing rule and the combine sum.

The routing rule, written once (the Triton kernel in :mod:`.routing` computes the same bits):

* **replica choice**: token ``t`` (global id ``token_offset + t``) sends its pair for logical expert
  ``e`` to live replica number ``(token_offset + t + e) mod n_live(e)`` of ``e``, replicas taken in
  ``log2phy`` order, so replicas share an expert's tokens evenly and every process picks the same
  slot for the same token;
* **live mask**: slot ``p`` lives on rank ``p // S``; a replica counts when ``live_mask[rank] != 0``;
* **degraded policy** ``renormalize``: a pair whose expert has no live replica is dropped (slot
  ``-1``) and the token's remaining weights are rescaled to their original sum (rows that lost
  nothing keep their exact weights);
* **load record**: ``load[e] += 1`` per pair with ``e >= 0`` (the router's demand).

This module imports only torch: :mod:`sglang_elastic.dispatch` builds on it, never the reverse.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

__all__ = ["pick_replica", "map_mask_record_reference", "renormalize", "route_renormalize_reference",
           "RenormRouted", "after_combine_reference", "weighted_sum", "live_replica_counts"]


def live_replica_counts(log2phy: torch.Tensor, live_mask: torch.Tensor, slots_per_rank: int) -> torch.Tensor:
    """Number of replicas of each expert on live ranks: ``log2phy [..., E, X]`` -> int64 ``[..., E]``."""
    valid = log2phy >= 0
    alive = live_mask.to(log2phy.device)[torch.where(valid, log2phy, 0) // slots_per_rank] != 0
    return (valid & alive).sum(-1)


def pick_replica(experts: torch.Tensor, log2phy: torch.Tensor, live_mask: torch.Tensor, slots_per_rank: int,
                 token_ids: torch.Tensor) -> torch.Tensor:
    """Physical slot of each (token, expert) pair, ``-1`` where ``experts < 0`` or no replica is live.

    Parameters:
        experts: int64 ``[T, K]`` logical experts (``-1`` = unused pair).
        log2phy: int64 ``[E, X]`` slots of each expert, ``-1`` padded.
        live_mask: ``[R]`` nonzero = alive.
        token_ids: int64 ``[T]`` global token ids.
    Returns:
        int64 ``[T, K]``.
    """
    e = experts.clamp(min=0)
    cand = log2phy[e]                                                   # [T, K, X]
    valid = cand >= 0
    live = valid & (live_mask[torch.where(valid, cand, 0) // slots_per_rank] != 0)
    n_live = live.sum(-1)                                               # [T, K]
    j = (token_ids[:, None] + e) % n_live.clamp(min=1)
    nth = live.cumsum(-1) - 1
    hit = live & (nth == j[..., None])
    idx = hit.to(torch.int64).argmax(-1, keepdim=True)
    phys = cand.gather(-1, idx).squeeze(-1)
    return torch.where((experts >= 0) & (n_live > 0), phys, torch.full_like(phys, -1))


def map_mask_record_reference(ids: torch.Tensor, log2phy: torch.Tensor, live_mask: torch.Tensor,
                              slots_per_rank: int, token_offset: int = 0,
                              load: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Map + mask + record: physical slot of each pair (``-1``: unused or no live replica), int64 ``[T, K]``;
    ``load [E]`` gets ``+1`` per id ``>= 0`` in place (no host sync)."""
    ids = ids.to(torch.int64)
    if load is not None:  # masked add: boolean indexing would sync with the host
        load.index_add_(0, ids.clamp(min=0).flatten(), (ids >= 0).flatten().to(load.dtype))
    tok = torch.arange(ids.shape[0], device=ids.device, dtype=torch.int64) + int(token_offset)
    return pick_replica(ids, log2phy, live_mask.to(ids.device), slots_per_rank, tok)


def renormalize(weights: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """Zero the weights of pairs not ``kept`` and rescale each row to its original sum (float32 ``[T, K]``)."""
    w = weights.float()
    total = w.sum(-1, keepdim=True)
    kept_w = torch.where(kept, w, torch.zeros_like(w))
    kept_sum = kept_w.sum(-1, keepdim=True)
    scale = torch.where(kept_sum != 0, total / torch.where(kept_sum != 0, kept_sum, torch.ones_like(kept_sum)),
                        torch.zeros_like(kept_sum))
    # Rows that lost nothing keep their exact weights (no rounding from the rescale).
    lost = (~kept & (w != 0)).any(-1, keepdim=True)
    return torch.where(lost, kept_w * scale, kept_w)


class RenormRouted(NamedTuple):
    """What the fused routing step returns (all ``[T, K]`` unless said)."""

    phys: torch.Tensor       # int64 slot, -1 dropped
    logical: torch.Tensor    # int64 expert served, -1 dropped
    weights: torch.Tensor    # float32 after ``renormalize``
    affected: torch.Tensor   # bool [T]: a pair dropped
    stats: torch.Tensor      # int64 [3]: affected tokens, rerouted pairs (0 here), dropped pairs


def route_renormalize_reference(ids: torch.Tensor, weights: torch.Tensor, log2phy: torch.Tensor,
                                live_mask: torch.Tensor, slots_per_rank: int, token_offset: int = 0,
                                load: Optional[torch.Tensor] = None) -> RenormRouted:
    """The whole rule with policy ``renormalize``: map + mask + record, then the weights and counts."""
    ids = ids.to(torch.int64)
    phys = map_mask_record_reference(ids, log2phy, live_mask, slots_per_rank, token_offset, load)
    kept = phys >= 0
    dropped = (ids >= 0) & ~kept
    affected = dropped.any(1)
    stats = torch.stack([affected.sum(), torch.zeros_like(affected.sum()), dropped.sum()]).to(torch.int64)
    return RenormRouted(phys, torch.where(kept, ids, torch.full_like(ids, -1)), renormalize(weights, kept),
                        affected, stats)


def after_combine_reference(out: torch.Tensor, phys: torch.Tensor, weights: torch.Tensor, affected: torch.Tensor,
                            flags: torch.Tensor, flag_is_mask: bool, num_ranks: int, slots_per_rank: int,
                            cum: torch.Tensor,
                            connected: Optional[torch.Tensor] = None, active: Optional[torch.Tensor] = None,
                            dropped_id: Optional[int] = None) -> None:
    """After an EP combine, in place: tokens that lost pairs are rescaled to their full weight sum.

    A pair is lost when its rank is flagged gone (``flags[r] != 0`` with ``flag_is_mask``, else
    ``flags[r] == 0``); with ``dropped_id``, pairs whose slot equals it were dropped by routing
    upstream (no live replica) and are renormalised here too. ``cum`` (int64 ``[4]``: affected,
    rerouted, dropped, lost) counts them; with ``connected``/``active``, ``active[r] = 0`` for masked
    connected ranks.

    Parameters:
        out: ``[T, H]`` combined rows; phys int ``[T, K]``; weights float ``[T, K]`` (as combined);
        affected: bool ``[T]`` tokens already counted; flags int ``[>= R]``.
    """
    NR = int(num_ranks)
    fl = flags[:NR]
    if connected is not None and active is not None:
        gone_rank = (fl != 0) & (connected[:NR] != 0)
        active.mul_((~gone_rank).to(active.dtype))
    phys = phys.to(torch.int64)
    sent = phys >= 0
    fr = fl[phys.clamp(min=0) // slots_per_rank]
    lost = sent & ((fr != 0) if flag_is_mask else (fr == 0))
    w = weights.float()
    zero = torch.zeros_like(w)
    routed_out = (phys == dropped_id) & (w != 0) if dropped_id is not None else torch.zeros_like(sent)
    n_lost = lost.sum(1)
    need = (n_lost > 0) | routed_out.any(1)
    total = torch.where(sent | routed_out, w, zero).sum(1)
    keep = torch.where(sent & ~lost, w, zero).sum(1)
    scale = torch.where(keep != 0, total / torch.where(keep != 0, keep, torch.ones_like(keep)), torch.zeros_like(keep))
    scaled = (out.float() * scale[:, None]).to(out.dtype)
    out.copy_(torch.where(need[:, None], scaled, out))
    nl = n_lost.sum()
    cum[3] += nl
    cum[2] += nl + routed_out.sum()
    cum[0] += (need & ~affected).sum()


def weighted_sum(pair_out: torch.Tensor, weights: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """``sum_k weights[:, k] * pair_out[:, k]`` accumulated in float32, k in order, cast to ``out_dtype``.

    Parameters:
        pair_out: ``[T, K, H]`` each pair's expert output (zeros for dropped pairs).
        weights: ``[T, K]`` combine weights.
    Returns:
        ``[T, H]`` in ``out_dtype``.
    """
    T, K, H = pair_out.shape
    acc = torch.zeros(T, H, dtype=torch.float32, device=pair_out.device)
    w = weights.float()
    for k in range(K):  # K is the top-k (<= 16): a fixed order makes the sum reproducible
        acc += w[:, k, None] * pair_out[:, k].float()
    return acc.to(out_dtype)
