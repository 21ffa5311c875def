"""Shared helpers for the dispatcher tests: deterministic experts, placements with replicas, and a
single-process reference of one MoE layer (same routing decisions, same combine order)."""
from __future__ import annotations

import multiprocessing as mp
import socket
from typing import Optional, Sequence

import numpy as np
import torch

from sglang_elastic.dispatch import layout
from sglang_elastic.dispatch.routing import RoutingTable, route
from sglang_elastic.eplb import Placement


_CTXS: dict = {}


def forkserver_context(preload: Sequence[str]):
    """A forkserver context with ``preload`` imported once (spawning each rank costs seconds on 2 cores)."""
    key = tuple(preload)
    if key not in _CTXS:
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(list(preload))
        _CTXS[key] = ctx
    return _CTXS[key]


def stop_forkserver() -> None:
    """Stop the forkserver (at the end of a test module), if one was started."""
    if _CTXS:
        from multiprocessing import forkserver

        stop = getattr(forkserver._forkserver, "_stop", None)
        if stop is not None:
            stop()
        _CTXS.clear()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def expert_coeffs(layer: int, expert: torch.Tensor, dtype: torch.dtype):
    """Per-expert (a, b) of the elementwise expert ``y = x * a + b`` (exact in every dtype)."""
    e = expert.to(torch.float32)
    a = 1.0 + 0.125 * ((e + 3 * layer) % 7)
    b = 0.25 * ((e * 5 + layer) % 11) - 1.0
    return a.to(dtype), b.to(dtype)


def run_local_experts(hidden: torch.Tensor, placement: Placement, layer: int, rank: int,
                      scale: Optional[torch.Tensor] = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """What rank ``rank`` computes on its dispatched rows ``[S, N, H]`` (fp8 rows are dequantised first)."""
    S = placement.slots_per_rank
    logical = placement.phy2log[layer, rank * S:(rank + 1) * S].clamp(min=0)
    if scale is not None:
        hidden = layout.dequantize_fp8(hidden, scale, dtype)
    a, b = expert_coeffs(layer, logical, hidden.dtype)
    return hidden * a[:, None, None] + b[:, None, None]


def reference_layer(x: torch.Tensor, topk_ids, topk_weights, placement: Placement, layer: int, live_mask,
                    token_offset: int, policy: str = "renormalize", router_logits=None, fp8: bool = False):
    """One MoE layer in one process with the dispatcher's routing; returns (out [T, H], routed)."""
    table = RoutingTable.from_placement(placement)
    routed = route(topk_ids, topk_weights, table, layer, live_mask, token_offset=token_offset, policy=policy,
                   router_logits=router_logits)
    T, K = topk_ids.shape
    if fp8:
        q, s = layout.quantize_fp8(x)
        xin = layout.dequantize_fp8(q, s, x.dtype)
    else:
        xin = x
    a, b = expert_coeffs(layer, routed.logical.clamp(min=0), x.dtype)          # [T, K]
    pair = xin[:, None, :] * a[..., None] + b[..., None]
    pair = torch.where((routed.phys >= 0)[..., None], pair, torch.zeros_like(pair))
    return layout.weighted_sum(pair, routed.weights, x.dtype), routed


def replicated_placement(num_layers: int, num_experts: int, num_ranks: int, slots_per_rank: int,
                         seed: int) -> Placement:
    """A placement where every expert has a replica on two different ranks (needs R*S >= 2E)."""
    assert num_ranks * slots_per_rank >= 2 * num_experts and num_ranks >= 2
    rng = np.random.default_rng(seed)
    P = num_ranks * slots_per_rank
    phy2log = np.empty((num_layers, P), dtype=np.int64)
    for l in range(num_layers):
        slots = [[] for _ in range(num_ranks)]
        perm = rng.permutation(num_experts)
        for i, e in enumerate(perm):
            r1 = i % num_ranks
            r2 = (r1 + 1 + int(rng.integers(num_ranks - 1))) % num_ranks
            slots[r1].append(int(e))
            slots[r2].append(int(e))
        fill = iter(rng.integers(num_experts, size=P))
        for r in range(num_ranks):
            while len(slots[r]) > slots_per_rank:  # move overflow to a rank without that expert
                e = slots[r].pop()
                dst = next(q for q in range(num_ranks) if len(slots[q]) < slots_per_rank and e not in slots[q])
                slots[dst].append(e)
        for r in range(num_ranks):
            while len(slots[r]) < slots_per_rank:
                slots[r].append(int(next(fill)))
            phy2log[l, r * slots_per_rank:(r + 1) * slots_per_rank] = rng.permutation(slots[r])
    return Placement(torch.from_numpy(phy2log), num_ranks, num_experts)


def random_inputs(seed: int, T: int, H: int, E: int, K: int, dtype: torch.dtype):
    """Tokens, distinct top-k ids (some -1), softmax-ish weights and router logits."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randint(-64, 64, (T, H), generator=g).to(torch.float32) / 8).to(dtype)
    logits = torch.randn(T, E, generator=g)
    ids = logits.topk(K, dim=1).indices
    if T:
        ids[0, -1] = -1
    w = torch.rand(T, K, generator=g) + 0.1
    return x, ids, w, logits
