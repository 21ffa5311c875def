"""Triton kernels for sglang_elastic's MoE token dispatch (installed as ``sglang_elastic.kernels``).

Each wrapper here runs the Triton kernel when it can and otherwise the torch reference from
:mod:`sglang_elastic.dispatch`; both give identical results (see ``docs/kernels.md``). Triton is
imported only when a kernel runs, so this package imports without it.

* :func:`map_mask_record`: logical top-k ids -> physical slots on live ranks, + load record.
* :func:`scatter_rows` / :func:`gather_rows`: wire order <-> per-expert (DeepEP low-latency) layout.
* :func:`combine_reduce`: the float32 weighted sum over top-k, optionally fused with the un-permute.

``backend`` is ``"auto"`` (Triton if :func:`triton_available` and the tensors are where Triton runs:
CUDA, or anywhere under ``TRITON_INTERPRET=1``), ``"triton"`` or ``"torch"``.
"""
from __future__ import annotations

import functools
import importlib
import os
from typing import Optional

import torch

__all__ = ["BACKENDS", "REDUCE_DTYPES", "triton_available", "map_mask_record", "scatter_rows", "gather_rows",
           "combine_reduce"]

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
                    backend: str = "auto") -> torch.Tensor:
    """Physical slot of each pair on a live rank (``-1``: unused or no live replica), recording load.

    Same result as :func:`sglang_elastic.dispatch.routing.route`'s map step: replica number
    ``(token_offset + t + e) mod n_live(e)`` of expert ``e`` among its live replicas in ``log2phy``
    order. ``load [E]``, if given, gets ``+1`` per id ``>= 0`` in place. Returns int64 ``[T, K]``.
    """
    if _use_triton(backend, topk_ids, log2phy_layer, live_mask):
        from .routing import map_mask_record as kernel
        return kernel(topk_ids, log2phy_layer, live_mask, slots_per_rank, token_offset, load)
    from sglang_elastic.dispatch.routing import map_mask_record_reference

    return map_mask_record_reference(topk_ids, log2phy_layer, live_mask, slots_per_rank, token_offset, load)


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
    from sglang_elastic.dispatch.layout import weighted_sum

    if order is not None:
        T, K = weights.shape
        full = pair_out.new_zeros(T * K, pair_out.shape[-1])
        full[order] = pair_out
        pair_out = full.view(T, K, -1)
    return weighted_sum(pair_out, weights, out_dtype)
