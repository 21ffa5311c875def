"""Triton kernels for sglang_elastic's MoE token dispatch (installed as ``sglang_elastic.kernels``).

Each wrapper here runs the Triton kernel when it can and otherwise the torch reference from
:mod:`.reference`; both give identical results (see ``docs/kernels.md``). Triton is imported only
when a kernel runs, so this package imports without it. It imports nothing of
:mod:`sglang_elastic` either: ``dispatch`` builds on it, never the reverse.

* :func:`map_mask_record`: THE routing rule (logical top-k ids -> physical slots on live ranks,
  + load record), used by the host dispatchers, the GPU dispatchers and the SGLang hook alike;
* :func:`route_renormalize`: the same launch plus the ``renormalize`` policy and counters (GPU path);
* :func:`after_combine`: re-weight tokens that lost pairs during an EP combine, count them.
* :func:`scatter_rows` / :func:`gather_rows`: wire order <-> per-expert (DeepEP low-latency) layout.
* :func:`combine_reduce`: the float32 weighted sum over top-k, optionally fused with the un-permute.

``backend`` is ``"auto"`` (Triton if :func:`triton_available` and the tensors are where Triton runs:
CUDA, or anywhere under ``TRITON_INTERPRET=1``), ``"triton"`` or ``"torch"``.
"""
from __future__ import annotations

import functools
import importlib
import os
from typing import Optional, Tuple

import torch

from . import reference
from .reference import RenormRouted

__all__ = ["BACKENDS", "REDUCE_DTYPES", "triton_available", "use_triton", "map_mask_record", "route_renormalize",
           "after_combine", "scatter_rows", "gather_rows", "combine_reduce", "reference", "RenormRouted"]

BACKENDS = ("auto", "triton", "torch")
# Output dtypes of the Triton combine; "auto" leaves any other to torch.
REDUCE_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


@functools.lru_cache(maxsize=None)
def _triton_importable() -> bool:
    try:
        importlib.import_module("triton")
    except Exception:  # an ImportError, or a broken install failing at import: both mean "no Triton"
        return False
    return True


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def triton_available() -> bool:
    """True when Triton imports and can run: a CUDA device is present, or ``TRITON_INTERPRET=1`` is set."""
    return _triton_importable() and (_interpret() or torch.cuda.is_available())


def use_triton(backend: str, *tensors: torch.Tensor) -> bool:
    """Whether ``backend`` ("auto", "triton", "torch") runs Triton on ``tensors`` (ValueError if unknown)."""
    return _use_triton(backend, *tensors)


def _use_triton(backend: str, *tensors: torch.Tensor) -> bool:
    if backend == "torch":
        return False
    if backend == "triton":
        return True
    if backend != "auto":
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if not triton_available():
        return False
    # Compiled Triton needs device memory; the interpreter runs on whatever torch can read.
    return _interpret() or all(t.is_cuda for t in tensors)


def map_mask_record(topk_ids: torch.Tensor, log2phy_layer: torch.Tensor, live_mask: torch.Tensor,
                    slots_per_rank: int, token_offset: int = 0, load: Optional[torch.Tensor] = None, *,
                    backend: str = "auto", out: Optional[torch.Tensor] = None, dropped_id: int = -1) -> torch.Tensor:
    """Physical slot of each pair on a live rank (``-1``: unused, ``dropped_id``: no live replica), recording load.

    The rule (:mod:`.reference`): replica number ``(token_offset + t + e) mod n_live(e)`` of expert
    ``e`` among its live replicas in ``log2phy`` order. ``load [E]``, if given, gets ``+1`` per id
    ``>= 0`` in place. Returns ``out`` (default int64 ``[T, K]``; any integer dtype, may alias ``topk_ids``).
    """
    if _use_triton(backend, topk_ids, log2phy_layer, live_mask):
        from .routing import map_mask_record as kernel
        return kernel(topk_ids, log2phy_layer, live_mask, slots_per_rank, token_offset, load, out=out,
                      dropped_id=dropped_id)
    phys = reference.map_mask_record_reference(topk_ids, log2phy_layer, live_mask, slots_per_rank, token_offset,
                                               load)
    if dropped_id != -1:
        known = (topk_ids >= 0) & (topk_ids < log2phy_layer.shape[0])
        phys = torch.where(known & (phys < 0), torch.full_like(phys, dropped_id), phys)
    if out is None:
        return phys
    out.copy_(phys)
    return out


def route_renormalize(topk_ids: torch.Tensor, topk_weights: torch.Tensor, log2phy_layer: torch.Tensor,
                      live_mask: torch.Tensor, slots_per_rank: int, token_offset: int = 0,
                      load: Optional[torch.Tensor] = None, *, acc: Optional[torch.Tensor] = None,
                      cum: Optional[torch.Tensor] = None, idx_dtype: torch.dtype = torch.int64,
                      backend: str = "auto") -> Tuple[RenormRouted, torch.Tensor]:
    """:func:`map_mask_record` plus the ``renormalize`` policy, in one launch on Triton.

    Returns ``(RenormRouted, ids)`` with ``ids`` the slots in ``idx_dtype`` (``phys`` itself for
    int64). ``cum`` (int64 ``[>= 3]``) gets this call's affected tokens / rerouted / dropped pairs
    added in place; ``acc`` is the kernel's persistent per-call accumulator (int64 ``[3]`` zeros).
    """
    if _use_triton(backend, topk_ids, topk_weights, log2phy_layer, live_mask):
        from .routing import route_renormalize as kernel
        return kernel(topk_ids, topk_weights, log2phy_layer, live_mask, slots_per_rank, token_offset, load, acc=acc,
                      cum=cum, idx_dtype=idx_dtype)
    routed = reference.route_renormalize_reference(topk_ids, topk_weights, log2phy_layer, live_mask,
                                                   slots_per_rank, token_offset, load)
    if cum is not None:
        cum[:3] += routed.stats
    return routed, (routed.phys if idx_dtype == torch.int64 else routed.phys.to(idx_dtype))


def after_combine(out: torch.Tensor, phys: torch.Tensor, weights: torch.Tensor, affected: torch.Tensor,
                  flags: torch.Tensor, flag_is_mask: bool, num_ranks: int, slots_per_rank: int, cum: torch.Tensor,
                  connected: Optional[torch.Tensor] = None, active: Optional[torch.Tensor] = None,
                  dropped_id: Optional[int] = None, *, backend: str = "auto") -> None:
    """After an EP combine, in place: rescale tokens that lost pairs (see :func:`.reference.after_combine_reference`)."""
    if _use_triton(backend, out, phys, weights, flags):
        from .post_combine import after_combine as kernel
        return kernel(out, phys, weights, affected, flags, flag_is_mask, num_ranks, slots_per_rank, cum, connected,
                      active, dropped_id)
    reference.after_combine_reference(out, phys, weights, affected, flags, flag_is_mask, num_ranks, slots_per_rank,
                                      cum, connected, active, dropped_id)


def scatter_rows(rows: torch.Tensor, pos: torch.Tensor, out: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """``out.view(-1, H)[pos] = rows`` in place, e.g. received rows into ``[S, R * M, H]``; returns ``out``.

    ``pos`` comes from :func:`sglang_elastic.dispatch.layout.recv_positions` (distinct positions).
    """
    if _use_triton(backend, rows, pos, out):
        from .permute import scatter_rows as kernel
        return kernel(rows, pos, out)
    out.view(-1, rows.shape[-1])[pos] = rows
    return out


def gather_rows(layout: torch.Tensor, pos: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """``layout.view(-1, H)[pos]``: the rows ``[N, H]`` at ``pos`` (e.g. expert outputs, back in wire order)."""
    if _use_triton(backend, layout, pos):
        from .permute import gather_rows as kernel
        return kernel(layout, pos)
    return layout.reshape(-1, layout.shape[-1])[pos]


def combine_reduce(pair_out: torch.Tensor, weights: torch.Tensor, out_dtype: torch.dtype,
                   order: Optional[torch.Tensor] = None, *, backend: str = "auto") -> torch.Tensor:
    """``[T, H]``: ``sum_k weights[:, k] * y[:, k]`` in float32, k in order, cast to ``out_dtype``.

    ``pair_out`` is ``[T, K, H]``, or with ``order`` (``send_plan(...).order``) the ``[N, H]`` rows in
    wire order, pairs not sent counting as zero rows. Same bits as
    :func:`sglang_elastic.dispatch.layout.weighted_sum`.
    """
    if (backend != "auto" or out_dtype in REDUCE_DTYPES) and _use_triton(backend, pair_out, weights):
        from .permute import combine_reduce as kernel
        return kernel(pair_out, weights, out_dtype, order)
    if order is not None:
        T, K = weights.shape
        full = pair_out.new_zeros(T * K, pair_out.shape[-1])
        full[order] = pair_out
        pair_out = full.view(T, K, -1)
    return reference.weighted_sum(pair_out, weights, out_dtype)
