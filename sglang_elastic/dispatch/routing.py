"""Routing: logical top-k experts -> physical slots on live ranks, with an explicit degraded policy.

The rule itself (replica choice, live mask, load record, the ``renormalize`` policy) is written once
in :mod:`sglang_elastic.kernels` (one Triton kernel and its torch reference, :mod:`.kernels.reference`);
the host dispatchers (:func:`route`), the GPU dispatchers (:mod:`.gpu_path`) and the SGLang hook
(``sglang_plugin/routing_hook.py``) all call it. This module adds the table type and the
``reroute`` policy on top. Nothing here synchronises with the
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
from ._kernels import kernels

__all__ = ["POLICIES", "RoutingTable", "Routed", "route", "live_replica_counts", "renormalize",
           "map_mask_record_reference"]

POLICIES = ("renormalize", "reroute")

# The rule's torch reference, re-exported under the names callers and tests use.
live_replica_counts = kernels.reference.live_replica_counts
renormalize = kernels.reference.renormalize
map_mask_record_reference = kernels.reference.map_mask_record_reference
_pick_replica = kernels.reference.pick_replica


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
    phys = kernels.map_mask_record(ids, log2phy, live_mask.to(ids.device), S, int(token_offset), load)
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
