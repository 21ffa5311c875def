"""Routing: logical top-k experts -> physical slots on live ranks, with an explicit degraded policy.

The torch functions here are the reference; :mod:`sglang_elastic.kernels` has Triton versions of the
hot step (map + mask + record) that must agree with them exactly. Nothing here synchronises with the
host unless asked to validate inputs: the live mask is read on the device each call, so a flip of
``ElasticEPState.active_ranks`` (updated in place) takes effect on the next call.

Replica choice: token ``t`` (global id ``token_offset + t``) sends its pair for logical expert ``e``
to live replica number ``(t_global + e) mod n_live(e)`` of ``e`` (replicas in ``log2phy`` order), so
replicas share an expert's tokens evenly and every process picks the same slot for the same token.

Degraded policy, for a pair whose expert has no live replica:

* ``"renormalize"`` (default): drop the pair and rescale the token's remaining weights so they keep
  their original sum;
* ``"reroute"``: send the pair to the best-scoring expert (by ``router_logits``) that is not already
  among the token's experts and has a live replica, keeping the pair's weight; pairs that find no
  such expert are dropped and the token renormalised.

Affected tokens (any pair dropped or rerouted) are counted, never silently lost.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..eplb.placement import Placement

__all__ = ["POLICIES", "RoutingTable", "Routed", "route", "live_replica_counts", "renormalize",
           "map_mask_record_reference"]

POLICIES = ("renormalize", "reroute")


@dataclass(frozen=True)
class RoutingTable:
    """Per-layer lookup of an expert's physical slots, on the device the router runs on.

    Attributes:
        log2phy: int64 ``[L, E, X]``, the physical slots of each logical expert, ``-1`` padded.
        num_ranks: EP size ``R``.
        slots_per_rank: ``S``; slot ``p`` lives on rank ``p // S`` as local expert ``p % S``.
    """

    log2phy: torch.Tensor
    num_ranks: int
    slots_per_rank: int

    @classmethod
    def from_placement(cls, placement: Placement, device: "torch.device | str" = "cpu") -> "RoutingTable":
        """Build the table of ``placement`` (slots of dead ranks are already absent from it)."""
        return cls(placement.log2phy.to(device=device, dtype=torch.int64).contiguous(),
                   placement.num_ranks, placement.slots_per_rank)

    @property
    def num_layers(self) -> int:
        return int(self.log2phy.shape[0])

    @property
    def num_experts(self) -> int:
        return int(self.log2phy.shape[1])


@dataclass
class Routed:
    """The result of :func:`route` for one layer (all tensors on the router's device).

    Attributes:
        phys: int64 ``[T, K]`` physical slot of each pair, ``-1`` where the pair is dropped.
        logical: int64 ``[T, K]`` the logical expert each pair is served by (after rerouting), ``-1``
            where dropped.
        weights: float32 ``[T, K]`` combine weights after the policy (dropped pairs are 0).
        affected: bool ``[T]``, tokens with a pair dropped or rerouted.
        stats: int64 ``[3]``: affected tokens, rerouted pairs, dropped pairs.
    """

    phys: torch.Tensor
    logical: torch.Tensor
    weights: torch.Tensor
    affected: torch.Tensor
    stats: torch.Tensor


def live_replica_counts(log2phy: torch.Tensor, live_mask: torch.Tensor, slots_per_rank: int) -> torch.Tensor:
    """Number of replicas of each expert on live ranks: ``log2phy [..., E, X]`` -> int64 ``[..., E]``."""
    valid = log2phy >= 0
    alive = live_mask.to(log2phy.device)[torch.where(valid, log2phy, 0) // slots_per_rank] != 0
    return (valid & alive).sum(-1)


def _pick_replica(experts: torch.Tensor, log2phy: torch.Tensor, live_mask: torch.Tensor, slots_per_rank: int,
                  token_ids: torch.Tensor) -> torch.Tensor:
    """Physical slot for each (token, expert) pair, ``-1`` where ``experts < 0`` or no replica is live."""
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
    """Torch reference of the map + mask + record step: physical slot of each pair (``-1``: unused or
    no live replica); ``load [E]`` gets ``+1`` per id ``>= 0`` in place (no host sync)."""
    ids = ids.to(torch.int64)
    if load is not None:  # masked add: boolean indexing would sync with the host
        load.index_add_(0, ids.clamp(min=0).flatten(), (ids >= 0).flatten().to(load.dtype))
    tok = torch.arange(ids.shape[0], device=ids.device, dtype=torch.int64) + int(token_offset)
    return _pick_replica(ids, log2phy, live_mask, slots_per_rank, tok)


def _map_mask_record(ids, log2phy, live_mask, slots_per_rank: int, token_offset: int, load):
    try:
        from .. import kernels
    except ImportError:  # a source checkout used without `pip install`: kernels/ is not a subpackage
        return map_mask_record_reference(ids, log2phy, live_mask, slots_per_rank, token_offset, load)
    return kernels.map_mask_record(ids, log2phy, live_mask, slots_per_rank, token_offset, load)


def renormalize(weights: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """Zero the weights of pairs not ``kept`` and rescale each row to its original sum (float32)."""
    w = weights.float()
    total = w.sum(-1, keepdim=True)
    kept_w = torch.where(kept, w, torch.zeros_like(w))
    kept_sum = kept_w.sum(-1, keepdim=True)
    scale = torch.where(kept_sum != 0, total / torch.where(kept_sum != 0, kept_sum, torch.ones_like(kept_sum)),
                        torch.zeros_like(kept_sum))
    # Rows that lost nothing keep their exact weights (no rounding from the rescale).
    lost = (~kept & (w != 0)).any(-1, keepdim=True)
    return torch.where(lost, kept_w * scale, kept_w)


def route(topk_ids: torch.Tensor, topk_weights: torch.Tensor, table: RoutingTable, layer: int,
          live_mask: torch.Tensor, *, token_offset: int = 0, policy: str = "renormalize",
          router_logits: Optional[torch.Tensor] = None, load: Optional[torch.Tensor] = None) -> Routed:
    """Map one layer's logical top-k choices to physical slots on live ranks (torch reference).

    Args:
        topk_ids: int ``[T, K]`` logical experts; ``-1`` marks an unused pair (never counted).
        topk_weights: float ``[T, K]``.
        table: the placement in force; ``layer`` indexes it.
        live_mask: int/bool ``[R]`` on the same device, nonzero = alive (read, never copied to host).
        token_offset: global id of token 0 (e.g. ``rank * max_tokens_per_rank``), for replica choice.
        policy: ``"renormalize"`` or ``"reroute"`` (needs ``router_logits [T, E]``).
        load: optional int64 ``[E]`` accumulator; the router's demand (``topk_ids``) is added to it.
    """
    if policy not in POLICIES:
        raise ValueError(f"unknown degraded-token policy {policy!r}; choose one of {', '.join(POLICIES)}")
    if policy == "reroute" and router_logits is None:
        raise ValueError("policy 'reroute' needs router_logits [tokens, experts]")
    log2phy = table.log2phy[layer]
    S = table.slots_per_rank
    ids = topk_ids.to(torch.int64)
    T = ids.shape[0]
    tok = torch.arange(T, device=ids.device, dtype=torch.int64) + int(token_offset)
    # Map + mask + record in one pass: the Triton kernel where Triton runs (CUDA), else this module's
    # torch reference (the kernel is tested to give identical results).
    phys = _map_mask_record(ids, log2phy, live_mask.to(ids.device), S, int(token_offset), load)
    missing = (ids >= 0) & (phys < 0)
    logical = torch.where(phys >= 0, ids, torch.full_like(ids, -1))
    rerouted = torch.zeros_like(missing)
    if policy == "reroute":
        scores = router_logits.float().clone()
        no_live = live_replica_counts(log2phy, live_mask, S) == 0
        scores.masked_fill_(no_live[None, :], float("-inf"))  # no host sync (unlike bool indexing)
        chosen = torch.zeros_like(scores, dtype=torch.int32)
        chosen.scatter_add_(1, ids.clamp(min=0), (ids >= 0).to(torch.int32))
        scores.masked_fill_(chosen > 0, float("-inf"))
        K = ids.shape[1]
        alt_val, alt = scores.topk(min(K, scores.shape[1]), dim=1)
        nth = (missing.cumsum(1) - 1).clamp(min=0, max=alt.shape[1] - 1)
        new_e = alt.gather(1, nth)
        ok = missing & torch.isfinite(alt_val.gather(1, nth))
        new_phys = _pick_replica(torch.where(ok, new_e, torch.full_like(new_e, -1)), log2phy, live_mask, S, tok)
        phys = torch.where(ok, new_phys, phys)
        logical = torch.where(ok, new_e, logical)
        rerouted = ok
    kept = phys >= 0
    weights = renormalize(topk_weights, kept)
    dropped = (ids >= 0) & ~kept
    affected = (missing | dropped).any(1)
    stats = torch.stack([affected.sum(), rerouted.sum(), dropped.sum()]).to(torch.int64)
    return Routed(phys, logical, weights, affected, stats)
