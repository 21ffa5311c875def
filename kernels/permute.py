"""Triton kernels for moving token rows between the wire order and the per-expert layout, and the combine.

References (:mod:`sglang_elastic.dispatch.layout`):

* :func:`scatter_rows`: ``out.view(-1, H)[pos] = rows`` with ``pos`` from ``recv_positions``
  (received rows -> DeepEP low-latency layout ``[S, R * M, H]``);
* :func:`gather_rows`: ``layout.view(-1, H)[pos]`` (the inverse, for sending expert outputs back);
* :func:`combine_reduce`: ``weighted_sum``, optionally fused with the un-permute of rows that came
  back in the wire order of ``send_plan``.

Row copies move raw bits (rows are reinterpreted as integer words), so any dtype, fp8 included,
is copied exactly. The reduce does the reference's float32 operations in the reference's order and
is compiled with floating-point contraction off, so ``w * y`` is rounded before it is added, as
torch does; outputs are bit-identical.

Importing this module imports Triton; :mod:`sglang_elastic.kernels` imports it lazily.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from . import REDUCE_DTYPES

__all__ = ["scatter_rows", "gather_rows", "combine_reduce", "pair_rows_of_order"]

_MAX_BLOCK_BYTES = 8192  # bytes per program tile in row copies (one row or several short ones)
_MAX_BLOCK_H = 1024      # hidden elements per program in the reduce
_WORD = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.uint8}


@triton.jit
def _copy_rows_kernel(src_ptr, dst_ptr, idx_ptr, n_rows, W, n_bound, SCATTER: tl.constexpr, BLOCK_R: tl.constexpr,
                      BLOCK_W: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_W + tl.arange(0, BLOCK_W)
    rmask = rows < n_rows
    cmask = cols[None, :] < W
    p = tl.load(idx_ptr + rows, mask=rmask, other=-1).to(tl.int64)
    # torch raises on an out-of-range index; a kernel would corrupt memory, so it skips the row
    # (scatter) or yields zeros (gather) instead.
    ok = rmask & (p >= 0) & (p < n_bound)
    if SCATTER:
        v = tl.load(src_ptr + rows[:, None] * W + cols[None, :], mask=rmask[:, None] & cmask)
        tl.store(dst_ptr + p[:, None] * W + cols[None, :], v, mask=ok[:, None] & cmask)
    else:
        v = tl.load(src_ptr + p[:, None] * W + cols[None, :], mask=ok[:, None] & cmask, other=0)
        tl.store(dst_ptr + rows[:, None] * W + cols[None, :], v, mask=rmask[:, None] & cmask)


@triton.jit
def _combine_kernel(y_ptr, src_ptr, w_ptr, out_ptr, T, H, K: tl.constexpr, HAS_SRC: tl.constexpr,
                    OUT_BF16: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr):
    ts = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_H + tl.arange(0, BLOCK_H)
    tmask = ts < T
    cmask = cols[None, :] < H
    acc = tl.zeros([BLOCK_T, BLOCK_H], dtype=tl.float32)
    # Unrolled, but each add depends on the previous acc, so k order is kept; with fp contraction
    # off at launch, w * y is rounded to float32 before the add, exactly like torch's two ops.
    for k in tl.static_range(K):
        w = tl.load(w_ptr + ts * K + k, mask=tmask, other=0.0).to(tl.float32)
        if HAS_SRC:
            r = tl.load(src_ptr + ts * K + k, mask=tmask, other=-1)
            # A pair with no row is a zero row in the reference: w * 0 is added all the same, so
            # a non-finite weight still gives the reference's NaN.
            m = (r >= 0)[:, None] & cmask
            row = tl.maximum(r, 0)
        else:
            m = tmask[:, None] & cmask
            row = ts * K + k
        y = tl.load(y_ptr + row[:, None] * H + cols[None, :], mask=m, other=0.0).to(tl.float32)
        acc += w[:, None] * y
    dst = out_ptr + ts[:, None] * H + cols[None, :]
    omask = tmask[:, None] & cmask
    if OUT_BF16:
        # Round to nearest even by hand (torch's rule, NaN -> 0x7FC0): the compiled cast does the
        # same, but Triton's interpreter truncates, and the tests run there.
        u = acc.to(tl.uint32, bitcast=True)
        b = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
        b = tl.where(acc != acc, 0x7FC0, b)
        tl.store(dst, b.to(tl.int16), mask=omask)
    else:
        tl.store(dst, acc.to(out_ptr.dtype.element_ty), mask=omask)


def _as_words(*ts: torch.Tensor) -> "tuple[torch.Tensor, ...]":
    """Views of contiguous ``[N, H]`` tensors as ``[N, W]`` integer words, the widest that all allow.

    Copying words instead of elements moves bits untouched (no NaN canonicalisation, any dtype) and
    lets one kernel serve every dtype.
    """
    for size in (8, 4, 2, 1):
        if all((t.shape[-1] * t.element_size()) % size == 0 and (t.storage_offset() * t.element_size()) % size == 0
               for t in ts):
            break
    return tuple(t.view(torch.uint8).view(_WORD[size]) for t in ts)


def _copy_launch(src: torch.Tensor, dst: torch.Tensor, idx: torch.Tensor, n_rows: int, n_bound: int,
                 scatter: bool) -> None:
    W = src.shape[1]
    per_prog = _MAX_BLOCK_BYTES // src.element_size()
    block_w = min(triton.next_power_of_2(W), per_prog)
    # Several rows per program when rows are short, so small hidden sizes still move large tiles.
    block_r = min(max(per_prog // block_w, 1), triton.next_power_of_2(n_rows))
    grid = (triton.cdiv(n_rows, block_r), triton.cdiv(W, block_w))
    _copy_rows_kernel[grid](src, dst, idx, n_rows, W, n_bound, SCATTER=scatter, BLOCK_R=block_r, BLOCK_W=block_w,
                            num_warps=4)


def scatter_rows(rows: torch.Tensor, pos: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``out.view(-1, H)[pos] = rows`` in place (any dtype, bit-exact); returns ``out``.

    Args:
        rows: ``[N, H]`` received rows in wire order.
        pos: int ``[N]`` flat row of each (``recv_positions``); positions must be distinct.
        out: contiguous ``[..., H]`` layout, e.g. ``[S, R * M, H]``; rows not in ``pos`` are untouched.
    """
    H = rows.shape[-1]
    if out.shape[-1] != H or out.dtype != rows.dtype:
        raise ValueError(f"rows {tuple(rows.shape)} {rows.dtype} do not fit out {tuple(out.shape)} {out.dtype}")
    if not out.is_contiguous():
        raise ValueError("out must be contiguous (it is written in place)")
    N = rows.shape[0]
    if N == 0 or H == 0:
        return out
    flat = out.view(-1, H)
    src, dst = _as_words(rows.contiguous(), flat)
    _copy_launch(src, dst, pos.contiguous(), N, flat.shape[0], scatter=True)
    return out


def gather_rows(layout: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """``layout.view(-1, H)[pos]``: rows ``[N, H]`` in the order of ``pos`` (any dtype, bit-exact).

    Args:
        layout: ``[..., H]`` e.g. the expert outputs ``[S, R * M, H]``.
        pos: int ``[N]`` flat row indices.
    """
    H = layout.shape[-1]
    flat = layout.contiguous().view(-1, H)
    N = pos.shape[0]
    out = torch.empty(N, H, dtype=layout.dtype, device=layout.device)
    if N == 0 or H == 0:
        return out
    src, dst = _as_words(flat, out)
    _copy_launch(src, dst, pos.contiguous(), N, flat.shape[0], scatter=False)
    return out


def pair_rows_of_order(order: torch.Tensor, num_pairs: int) -> torch.Tensor:
    """Inverse of ``send_plan``'s ``order``: int64 ``[num_pairs]`` row of each pair, ``-1`` if not sent."""
    src = torch.full((num_pairs,), -1, dtype=torch.int64, device=order.device)
    src[order.to(torch.int64)] = torch.arange(order.shape[0], dtype=torch.int64, device=order.device)
    return src


def combine_reduce(pair_out: torch.Tensor, weights: torch.Tensor, out_dtype: torch.dtype,
                   order: Optional[torch.Tensor] = None, *, fp_fusion: bool = False) -> torch.Tensor:
    """``sum_k weights[:, k] * y[:, k]`` in float32, k in order, cast to ``out_dtype`` (= ``weighted_sum``).

    Args:
        pair_out: ``[T, K, H]`` each pair's output; or, with ``order``, ``[N, H]`` rows in wire order.
        weights: ``[T, K]`` combine weights.
        out_dtype: float32, bfloat16, float16 or float64.
        order: optional int ``[N]`` flat pair ``t * K + k`` of each row (``send_plan(...).order``);
            pairs not in it count as zero rows, as in the reference.
        fp_fusion: let the compiler fuse ``w * y + acc`` into FMAs; breaks bit-equality with the
            reference, so it is there only to measure what that would change (``bench_kernels.py``).

    Returns:
        ``[T, H]`` of ``out_dtype``.
    """
    if out_dtype not in REDUCE_DTYPES:
        raise ValueError(f"combine_reduce supports out_dtype in {REDUCE_DTYPES}, got {out_dtype}")
    T, K = weights.shape
    H = pair_out.shape[-1]
    if order is None and tuple(pair_out.shape) != (T, K, H):
        raise ValueError(f"pair_out {tuple(pair_out.shape)} does not match weights {tuple(weights.shape)}")
    out = torch.empty(T, H, dtype=out_dtype, device=pair_out.device)
    if T == 0 or H == 0:
        return out
    y = pair_out.contiguous().view(-1, H)
    src = pair_rows_of_order(order, T * K) if order is not None else y  # y: an unused placeholder
    block_h = min(triton.next_power_of_2(H), _MAX_BLOCK_H)
    block_t = min(max(_MAX_BLOCK_H // block_h, 1), triton.next_power_of_2(T))
    grid = (triton.cdiv(T, block_t), triton.cdiv(H, block_h))
    bf16 = out_dtype == torch.bfloat16
    _combine_kernel[grid](y, src, weights.contiguous(), out.view(torch.int16) if bf16 else out, T, H, K=K,
                          HAS_SRC=order is not None, OUT_BF16=bf16, BLOCK_T=block_t, BLOCK_H=block_h, num_warps=4,
                          enable_fp_fusion=fp_fusion)
    return out
