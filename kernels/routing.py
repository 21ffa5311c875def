"""The routing rule as one Triton kernel: logical -> live physical slot, load record, degraded policy.

Reference: :mod:`.reference` (``map_mask_record_reference``, ``route_renormalize_reference``); the
outputs are bit-identical to it: the map is integer arithmetic evaluated the same way (the ``j``-th
live replica in ``log2phy`` order, ``j = (token_offset + t + e) mod n_live``, floor modulo as in
torch), and the renormalisation does the reference's float32 operations.

One kernel, three uses, chosen by constexpr flags (so each use compiles to only what it needs):

* :func:`map_mask_record`: the slot of each pair, optionally the load record; any integer output
  dtype (SGLang's int32 top-k ids, nixl_ep's int32 ``topk_idx_t``) and a ``dropped_id`` for pairs
  whose expert has no live replica (``-1`` by default, like unused pairs);
* :func:`route_renormalize`: the same plus the logical expert served, the renormalised weights, the
  affected tokens and per-call / cumulative counters (a persistent accumulator, no host sync).

Importing this module imports Triton; :mod:`sglang_elastic.kernels` imports it lazily.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from .reference import RenormRouted

__all__ = ["map_mask_record", "route_renormalize", "tile"]


@triton.jit(do_not_specialize=["T", "token_offset", "dropped_id"])
def _route_kernel(ids_ptr, w_ptr, l2p_ptr, live_ptr, phys_ptr, idx2_ptr, logical_ptr, wout_ptr, aff_ptr,
                  call_ptr, acc_ptr, cum_ptr, load_ptr, T, K, E, X, R, S, token_offset, dropped_id,
                  HAS_LOAD: tl.constexpr, HAS_IDX2: tl.constexpr, HAS_W: tl.constexpr, K_PAD: tl.constexpr,
                  X_PAD: tl.constexpr, BLOCK_T: tl.constexpr):
    pid = tl.program_id(0)
    ks = tl.arange(0, K_PAD)
    xs = tl.arange(0, X_PAD)
    ts = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    row = ts < T
    pm = row[:, None] & (ks[None, :] < K)
    off = ts[:, None].to(tl.int64) * K + ks[None, :]
    ids = tl.load(ids_ptr + off, mask=pm, other=-1).to(tl.int64)
    # torch would raise on ids >= E; reading past log2phy instead would be silent, so such pairs
    # are treated as unroutable (-1, not counted).
    known = pm & (ids >= 0) & (ids < E)
    e = tl.where(known, ids, 0)
    cand = tl.load(l2p_ptr + e[:, :, None] * X + xs[None, None, :],
                   mask=known[:, :, None] & (xs[None, None, :] < X), other=-1)
    valid = cand >= 0
    rank = tl.where(valid, cand, 0) // S
    alive = tl.load(live_ptr + rank, mask=valid & (rank < R), other=0) != 0
    live = (valid & alive).to(tl.int32)
    n_live = tl.sum(live, axis=2)
    # Floor modulo (torch's %), whatever the sign of token_offset: Triton's % truncates.
    m = tl.maximum(n_live, 1).to(tl.int64)
    j = (ts[:, None].to(tl.int64) + token_offset + e) % m
    j = tl.where(j < 0, j + m, j)
    nth = (tl.cumsum(live, axis=2) - 1).to(tl.int64)
    hit = (live != 0) & (nth == j[:, :, None])
    # Exactly one column hits when n_live > 0, so the sum picks that slot.
    phys = tl.sum(tl.where(hit, cand, 0), axis=2)
    phys = tl.where(known & (n_live > 0), phys, -1)
    out = tl.where(known & (n_live == 0), dropped_id, phys)
    tl.store(phys_ptr + off, out.to(phys_ptr.dtype.element_ty), mask=pm)
    if HAS_IDX2:
        tl.store(idx2_ptr + off, out.to(idx2_ptr.dtype.element_ty), mask=pm)
    if HAS_LOAD:
        # Integer atomics commute, so the counts are exact and deterministic.
        tl.atomic_add(load_ptr + e, 1, mask=known)
    if HAS_W:
        tl.store(logical_ptr + off, tl.where(phys >= 0, ids, -1), mask=pm)
        # reference.renormalize: drop unrouted pairs, rescale rows that lost weight to their sum.
        w = tl.load(w_ptr + off, mask=pm, other=0.0).to(tl.float32)
        gone = pm & (phys < 0)
        total = tl.sum(w, axis=1)
        kw = tl.where(phys >= 0, w, 0.0)
        ksum = tl.sum(kw, axis=1)
        shrunk = tl.sum((gone & (w != 0.0)).to(tl.int32), axis=1) > 0
        scale = tl.where(ksum != 0.0, total / tl.where(ksum != 0.0, ksum, 1.0), 0.0)
        tl.store(wout_ptr + off, tl.where(shrunk[:, None], kw * scale[:, None], kw), mask=pm)
        nd = tl.sum((gone & (ids >= 0)).to(tl.int32), axis=1)
        tl.store(aff_ptr + ts, (nd > 0).to(tl.uint8), mask=row)
        # Per-call totals: each program adds its share to ``acc`` (persistent, zero between calls) and
        # takes a ticket; the last program publishes them to ``call``, adds them to ``cum``, resets ``acc``.
        tl.atomic_add(acc_ptr + 0, tl.sum((nd > 0).to(tl.int32), axis=0).to(tl.int64))
        tl.atomic_add(acc_ptr + 1, tl.sum(nd, axis=0).to(tl.int64))
        ticket = tl.atomic_add(acc_ptr + 2, 1)
        if ticket == tl.num_programs(0) - 1:
            a = tl.atomic_xchg(acc_ptr + 0, 0)
            d = tl.atomic_xchg(acc_ptr + 1, 0)
            tl.atomic_xchg(acc_ptr + 2, 0)
            tl.store(call_ptr + 0, a)
            tl.store(call_ptr + 1, a * 0)
            tl.store(call_ptr + 2, d)
            tl.atomic_add(cum_ptr + 0, a)
            tl.atomic_add(cum_ptr + 2, d)


def _pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _floor_pow2(n: int) -> int:
    return 1 << (max(1, int(n)).bit_length() - 1)


def tile(T: int, K: int, X: int) -> Tuple[int, int, int, int]:
    """``(grid, K_PAD, X_PAD, BLOCK_T)`` for ``T`` tokens: a ``[BLOCK_T, K, X]`` tile of ~512 lanes a program."""
    k_pad, x_pad = max(2, _pow2(K)), max(2, _pow2(X))
    block_t = max(2, min(64, _floor_pow2(512 // (k_pad * x_pad))))
    return max(1, -(-T // block_t)), k_pad, x_pad, block_t


def _check(topk_ids: torch.Tensor, log2phy_layer: torch.Tensor) -> None:
    if topk_ids.dim() != 2 or log2phy_layer.dim() != 2:
        raise ValueError(f"expected topk_ids [T, K] and log2phy [E, X], got {tuple(topk_ids.shape)} "
                         f"and {tuple(log2phy_layer.shape)}")


def _live(live_mask: torch.Tensor) -> torch.Tensor:
    live = live_mask.contiguous()
    return live.view(torch.uint8) if live.dtype == torch.bool else live  # same bytes; no i1 pointers


def map_mask_record(topk_ids: torch.Tensor, log2phy_layer: torch.Tensor, live_mask: torch.Tensor,
                    slots_per_rank: int, token_offset: int = 0, load: Optional[torch.Tensor] = None, *,
                    out: Optional[torch.Tensor] = None, dropped_id: int = -1) -> torch.Tensor:
    """Physical slot of each (token, expert) pair on a live rank, recording the router's demand.

    Parameters:
        topk_ids: int ``[T, K]`` logical experts, ``-1`` = unused pair.
        log2phy_layer: int64 ``[E, X]`` physical slots of each expert, ``-1`` padded.
        live_mask: ``[R]`` (bool or int), nonzero = rank alive; slot ``p`` is on rank ``p // slots_per_rank``.
        token_offset: global id of token 0, for the replica choice.
        load: optional ``[E]`` accumulator (int64 usually); each id ``>= 0`` adds 1 in place.
        out: optional integer ``[T, K]`` to write (any integer dtype; may be ``topk_ids`` itself).
        dropped_id: the value written for a pair whose expert has no live replica.
    Returns:
        ``out`` (default int64 ``[T, K]``): the slot, ``-1`` for unused pairs, ``dropped_id`` for
        experts with no live replica.
    """
    _check(topk_ids, log2phy_layer)
    T, K = topk_ids.shape
    E, X = log2phy_layer.shape
    ids = topk_ids.contiguous()
    phys = torch.empty(T, K, dtype=torch.int64, device=ids.device) if out is None else out
    if T * K == 0:
        return phys
    if load is not None and not load.is_contiguous():
        raise ValueError("load must be contiguous (it is updated in place)")
    live = _live(live_mask)
    grid, k_pad, x_pad, block_t = tile(T, K, X)
    _route_kernel[(grid,)](
        ids, ids, log2phy_layer, live, phys, phys, phys, phys, phys, phys, phys, phys,
        load if load is not None else phys, T, K, E, X, live.numel(), int(slots_per_rank), int(token_offset),
        int(dropped_id), HAS_LOAD=load is not None, HAS_IDX2=False, HAS_W=False, K_PAD=k_pad, X_PAD=x_pad,
        BLOCK_T=block_t, num_warps=4)
    return phys


def route_renormalize(topk_ids: torch.Tensor, topk_weights: torch.Tensor, log2phy_layer: torch.Tensor,
                      live_mask: torch.Tensor, slots_per_rank: int, token_offset: int = 0,
                      load: Optional[torch.Tensor] = None, *, acc: Optional[torch.Tensor] = None,
                      cum: Optional[torch.Tensor] = None,
                      idx_dtype: torch.dtype = torch.int64) -> Tuple[RenormRouted, torch.Tensor]:
    """The rule with policy ``renormalize`` in one launch; see :func:`.reference.route_renormalize_reference`.

    Parameters (besides :func:`map_mask_record`'s):
        topk_weights: float ``[T, K]``.
        acc: int64 ``[3]`` zeros, persistent between calls (the per-call accumulator; left zero).
        cum: int64 ``[>= 3]`` cumulative counters (affected tokens, rerouted, dropped), added to in place.
        idx_dtype: dtype of the second output (EP kernels' expert ids).
    Returns:
        ``(RenormRouted, ids)``: ``ids`` is ``phys`` itself when ``idx_dtype`` is int64, else a copy
        in ``idx_dtype`` written by the same launch.
    """
    _check(topk_ids, log2phy_layer)
    T, K = topk_ids.shape
    E, X = log2phy_layer.shape
    dev = topk_ids.device
    ibuf = torch.empty(2 * T * K + 3, dtype=torch.int64, device=dev)
    phys, logical, call = ibuf[:T * K].view(T, K), ibuf[T * K:2 * T * K].view(T, K), ibuf[2 * T * K:]
    weights = torch.empty(T, K, dtype=torch.float32, device=dev)
    aff = torch.empty(T, dtype=torch.uint8, device=dev)
    idx2 = torch.empty(T, K, dtype=idx_dtype, device=dev) if idx_dtype != torch.int64 else None
    if acc is None:
        acc = torch.zeros(3, dtype=torch.int64, device=dev)
    if cum is None:
        cum = torch.zeros(4, dtype=torch.int64, device=dev)
    live = _live(live_mask)
    grid, k_pad, x_pad, block_t = tile(T, K, X)
    _route_kernel[(grid,)](
        topk_ids.contiguous(), topk_weights.contiguous(), log2phy_layer, live, phys,
        idx2 if idx2 is not None else phys, logical, weights, aff, call, acc, cum,
        load if load is not None else phys, T, K, E, X, live.numel(), int(slots_per_rank), int(token_offset), -1,
        HAS_LOAD=load is not None, HAS_IDX2=idx2 is not None, HAS_W=True, K_PAD=k_pad, X_PAD=x_pad,
        BLOCK_T=block_t, num_warps=4)
    routed = RenormRouted(phys, logical, weights, aff.view(torch.bool), call)
    return routed, (idx2 if idx2 is not None else phys)
