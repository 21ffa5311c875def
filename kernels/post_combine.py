"""Triton kernel run after an EP combine: re-weight tokens that lost pairs, count them, update the mask.

Reference: :func:`.reference.after_combine_reference` (same arithmetic; outputs agree to the ulp of
the output dtype, counters exactly). A program whose tokens lost nothing reads only its slots and
the flags and exits, so at decode size the launch costs a few microseconds.

Importing this module imports Triton; :mod:`sglang_elastic.kernels` imports it lazily.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .routing import _pow2

__all__ = ["after_combine"]


@triton.jit(do_not_specialize=["T", "dropped_id"])
def _after_combine_kernel(out_ptr, phys_ptr, w_ptr, aff_ptr, flag_ptr, conn_ptr, active_ptr, cum_ptr, T, H, K, S,
                          NR, dropped_id, FLAG_IS_MASK: tl.constexpr, UPDATE_ACTIVE: tl.constexpr,
                          HAS_DROPPED: tl.constexpr, K_PAD: tl.constexpr, BLOCK_T: tl.constexpr,
                          BLOCK_H: tl.constexpr, R_PAD: tl.constexpr):
    pid = tl.program_id(0)
    if UPDATE_ACTIVE:
        if pid == 0:
            rs = tl.arange(0, R_PAD)
            rm = rs < NR
            mk = tl.load(flag_ptr + rs, mask=rm, other=0)
            cn = tl.load(conn_ptr + rs, mask=rm, other=0)
            act = tl.load(active_ptr + rs, mask=rm, other=0)
            tl.store(active_ptr + rs, tl.where((mk != 0) & (cn != 0), act * 0, act), mask=rm)
    ts = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    row = ts < T
    ks = tl.arange(0, K_PAD)
    pm = row[:, None] & (ks[None, :] < K)
    off = ts[:, None].to(tl.int64) * K + ks[None, :]
    phys = tl.load(phys_ptr + off, mask=pm, other=-1).to(tl.int64)
    sent = phys >= 0
    rank = tl.where(sent, phys, 0) // S
    if FLAG_IS_MASK:
        fl = tl.load(flag_ptr + rank, mask=sent & (rank < NR), other=0)
        lost = sent & (fl != 0)
    else:
        fl = tl.load(flag_ptr + rank, mask=sent & (rank < NR), other=1)
        lost = sent & (fl == 0)
    n_lost = tl.sum(lost.to(tl.int32), axis=1)
    if HAS_DROPPED:
        w0 = tl.load(w_ptr + off, mask=pm & (phys == dropped_id), other=0.0)
        routed_out = pm & (phys == dropped_id) & (w0 != 0.0)
    else:
        routed_out = lost & (lost == 0)
    n_out = tl.sum(routed_out.to(tl.int32), axis=1)
    need = (n_lost > 0) | (n_out > 0)
    if tl.sum(need.to(tl.int32), axis=0) > 0:
        w = tl.load(w_ptr + off, mask=pm, other=0.0)
        total = tl.sum(tl.where(sent | routed_out, w, 0.0), axis=1)
        keep = tl.sum(tl.where(sent & (lost == 0), w, 0.0), axis=1)
        scale = tl.where(keep != 0.0, total / tl.where(keep != 0.0, keep, 1.0), 0.0)
        for h0 in range(0, H, BLOCK_H):
            hs = h0 + tl.arange(0, BLOCK_H)
            m2 = need[:, None] & (hs[None, :] < H)
            p = out_ptr + ts[:, None].to(tl.int64) * H + hs[None, :]
            v = tl.load(p, mask=m2, other=0.0).to(tl.float32)
            tl.store(p, (v * scale[:, None]).to(out_ptr.dtype.element_ty), mask=m2)
        fresh = need & (tl.load(aff_ptr + ts, mask=row, other=1) == 0)
        nl = tl.sum(n_lost, axis=0).to(tl.int64)
        tl.atomic_add(cum_ptr + 3, nl)
        tl.atomic_add(cum_ptr + 2, nl + tl.sum(n_out, axis=0).to(tl.int64))
        tl.atomic_add(cum_ptr + 0, tl.sum(fresh.to(tl.int32), axis=0).to(tl.int64))


def after_combine(out: torch.Tensor, phys: torch.Tensor, weights: torch.Tensor, affected: torch.Tensor,
                  flags: torch.Tensor, flag_is_mask: bool, num_ranks: int, slots_per_rank: int, cum: torch.Tensor,
                  connected: Optional[torch.Tensor] = None, active: Optional[torch.Tensor] = None,
                  dropped_id: Optional[int] = None) -> None:
    """In place; see :func:`.reference.after_combine_reference` for the arguments."""
    T, K = phys.shape
    H = out.shape[1]
    block_t = 32
    update = connected is not None and active is not None
    _after_combine_kernel[(max(1, -(-T // block_t)),)](
        out, phys, weights, affected.view(torch.uint8), flags, connected if update else flags,
        active if update else flags, cum, T, H, K, int(slots_per_rank), int(num_ranks),
        int(dropped_id) if dropped_id is not None else -1, FLAG_IS_MASK=flag_is_mask, UPDATE_ACTIVE=update,
        HAS_DROPPED=dropped_id is not None, K_PAD=max(2, _pow2(K)), BLOCK_T=block_t, BLOCK_H=128,
        R_PAD=max(2, _pow2(num_ranks)), num_warps=4)
