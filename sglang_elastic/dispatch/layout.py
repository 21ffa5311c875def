"""Token layouts (torch references): send order, DeepEP low-latency receive layout, weighted combine.

Sender: a token's pair for physical slot ``p`` goes to rank ``p // S`` as local expert ``p % S``.
Rows are sent grouped by destination rank, then local expert, then token (:func:`send_plan`).

Receiver (DeepEP low-latency layout, what SGLang's masked grouped GEMM consumes): expert ``e``'s
tokens fill ``recv[e, 0:masked_m[e]]`` of ``recv [S, R * M, H]`` (``M`` = max tokens per rank),
source rank 0's rows first (:func:`recv_positions`). Combine sends row ``recv[e, i]`` back to its
source in the order the source sent it, and the source sums ``weight * row`` over its top-k in
float32, k in order (:func:`weighted_sum`), so results are bit-identical to a single-process
reference that evaluates the same experts on the same rows.

The Triton kernels in :mod:`sglang_elastic.kernels` implement the same functions.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

import torch

from ._kernels import kernels

# The combine's reference sum lives with the kernels that must match it (one copy).
weighted_sum = kernels.reference.weighted_sum

__all__ = ["SendPlan", "send_plan", "recv_positions", "weighted_sum", "quantize_fp8", "dequantize_fp8",
           "FP8_BLOCK"]

FP8_BLOCK = 128
_FP8_MAX = 448.0


@dataclass
class SendPlan:
    """Which pair goes where, in wire order.

    Attributes:
        order: int64 ``[N]`` flat pair index ``t * K + k`` of each sent row, grouped by destination
            rank, then local expert, then token.
        tokens: int64 ``[N]`` the token of each sent row (``order // K``).
        counts: int64 ``[R, S]`` rows per (destination rank, local expert).
    """

    order: torch.Tensor
    tokens: torch.Tensor
    counts: torch.Tensor

    def rank_rows(self) -> torch.Tensor:
        """int64 ``[R]``: rows per destination rank."""
        return self.counts.sum(1)


def send_plan(phys: torch.Tensor, num_ranks: int, slots_per_rank: int) -> SendPlan:
    """Wire order of the pairs of ``phys [T, K]`` (physical slot, ``-1`` = not sent)."""
    T, K = phys.shape
    flat = phys.reshape(-1).to(torch.int64)
    valid = flat >= 0
    tok = torch.arange(T * K, device=phys.device, dtype=torch.int64) // K
    # Sort key (slot, token); slot = rank * S + local already orders by rank, then local expert.
    big = num_ranks * slots_per_rank
    key = torch.where(valid, flat, torch.full_like(flat, big)) * max(T, 1) + tok
    order = torch.sort(key, stable=True).indices
    n = int(valid.sum())
    order = order[:n]
    counts = torch.bincount(flat[valid], minlength=big).view(num_ranks, slots_per_rank)
    return SendPlan(order, order // K, counts)


def recv_positions(counts: torch.Tensor, max_tokens_per_rank: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Where received rows land in the flattened ``[S * R * M]`` layout.

    Args:
        counts: int64 ``[R, S]``, rows received from each source rank per local expert; the rows
            arrive concatenated by source rank, then local expert.
        max_tokens_per_rank: ``M``.

    Returns:
        ``(pos [N], masked_m [S])``: the flat row index of each received row, and rows per expert.
    """
    R, S = counts.shape
    counts = counts.to(torch.int64)
    # Offset of source s inside expert e's region: sum of earlier sources' rows for e.
    off = counts.cumsum(0) - counts                                    # [R, S]
    base = torch.arange(S, device=counts.device, dtype=torch.int64)[None, :] * (R * max_tokens_per_rank) + off
    n = counts.reshape(-1)
    total = int(n.sum())
    starts = torch.repeat_interleave(base.reshape(-1), n, output_size=total)
    first = torch.repeat_interleave(n.cumsum(0) - n, n, output_size=total)
    pos = starts + torch.arange(total, device=counts.device, dtype=torch.int64) - first
    return pos, counts.sum(0)


def quantize_fp8(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-row, per-128-column block fp8 (e4m3) quantisation: ``x [N, H]`` -> ``(q [N, H], scale [N, H/128])``."""
    N, H = x.shape
    if H % FP8_BLOCK:
        raise ValueError(f"fp8 dispatch needs hidden divisible by {FP8_BLOCK}, got {H}")
    xb = x.float().view(N, H // FP8_BLOCK, FP8_BLOCK)
    scale = xb.abs().amax(-1).clamp(min=1e-4) / _FP8_MAX
    q = (xb / scale[..., None]).to(torch.float8_e4m3fn).view(N, H)
    return q, scale


def dequantize_fp8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of :func:`quantize_fp8` (up to fp8 rounding), for any leading shape ``[..., H]``."""
    H = q.shape[-1]
    xb = q.float().reshape(*q.shape[:-1], H // FP8_BLOCK, FP8_BLOCK) * scale.float()[..., None]
    return xb.reshape(q.shape).to(dtype)
