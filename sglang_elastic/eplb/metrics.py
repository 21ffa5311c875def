"""Placement quality metrics, exactly as ``DESIGN.md`` defines them.

- rank load ``tok[l, r] = sum_{p on r} w[l, phy2log[l, p]] / cnt[l, phy2log[l, p]]`` (an expert's
  tokens split evenly over its replicas on live ranks; dead ranks excluded);
- balancedness ``sum_l mean_{live r} tok[l, r] / sum_l max_{live r} tok[l, r]`` (1.0 is perfect);
- movement A -> B: (layer, slot) pairs on ranks live in both whose expert changed and whose new
  expert was not already on that rank in A;
- orphans: logical experts with no replica on any live rank.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import numpy as np
import torch

from .algorithms.inputs import scale_to_unit
from .placement import Placement, as_live_mask

__all__ = ["rank_load", "balancedness", "layer_balancedness", "movement", "movement_bytes", "orphans"]

Mask = Optional[Union[torch.Tensor, np.ndarray, Sequence]]


def _load2d(load: Union[torch.Tensor, np.ndarray], placement: Placement, scaled: bool = False) -> np.ndarray:
    w = load.detach().cpu().double().numpy() if isinstance(load, torch.Tensor) else np.asarray(load, dtype=np.float64)
    if scaled and w.size and np.isfinite(w).all() and (w >= 0).all():
        w = scale_to_unit(w)  # before summing steps, so huge finite loads cannot overflow
    if w.ndim == 3:
        w = w.sum(0)
    if w.shape != (placement.num_layers, placement.num_logical_experts):
        raise ValueError(
            f"load has shape {w.shape}, expected [layers, experts] = "
            f"[{placement.num_layers}, {placement.num_logical_experts}]"
        )
    return w


def rank_load(load: Union[torch.Tensor, np.ndarray], placement: Placement) -> np.ndarray:
    """float64 ``[layers, num_ranks]`` tokens per rank; dead ranks are ``nan``."""
    w = _load2d(load, placement)
    p2l = placement.phy2log.numpy()
    L, R, S = placement.num_layers, placement.num_ranks, placement.slots_per_rank
    cnt = placement.logcnt.numpy()
    e = np.where(p2l >= 0, p2l, 0)
    rows = np.arange(L)[:, None]
    per_slot = np.where(p2l >= 0, w[rows, e] / np.maximum(cnt[rows, e], 1), 0.0)
    tok = per_slot.reshape(L, R, S).sum(-1)
    tok[:, ~placement.live_ranks.numpy()] = np.nan
    return tok


def _live_rank_load(load: Union[torch.Tensor, np.ndarray], placement: Placement) -> np.ndarray:
    """float64 ``[layers, live ranks]`` rank load of ``load`` scaled by a power of two (ratios unchanged,
    no overflow for huge finite loads); ``[layers, 0]`` when no rank is live."""
    return rank_load(_load2d(load, placement, scaled=True), placement)[:, placement.live_ranks.numpy()]


def balancedness(load: Union[torch.Tensor, np.ndarray], placement: Placement) -> float:
    """``sum_l mean_{live r} tok[l, r] / sum_l max_{live r} tok[l, r]``; 1.0 when perfectly balanced.

    Scale-free (huge finite loads give a finite answer); 1.0 when there is no load at all.
    """
    tok = _live_rank_load(load, placement)
    if tok.shape[1] == 0:
        return 1.0
    den = tok.max(axis=1).sum()
    return float(tok.mean(axis=1).sum() / den) if den > 0 else 1.0


def layer_balancedness(load: Union[torch.Tensor, np.ndarray], placement: Placement) -> np.ndarray:
    """float64 ``[layers]``: ``mean/max`` of rank load per layer (1.0 for a layer with no load)."""
    tok = _live_rank_load(load, placement)
    if tok.shape[1] == 0:
        return np.ones(tok.shape[0])
    mx = tok.max(axis=1)
    return np.where(mx > 0, tok.mean(axis=1) / np.where(mx > 0, mx, 1.0), 1.0)


def movement(old: Placement, new: Placement) -> int:
    """Slots whose expert must be fetched when going from ``old`` to ``new``.

    Counts (layer, slot) on ranks live in both placements whose expert changed and whose new expert
    was not already on that rank in ``old`` (a local copy is free). Ranks that joined are not counted.
    """
    if old.phy2log.shape != new.phy2log.shape or old.num_ranks != new.num_ranks:
        raise ValueError(f"placements differ in shape: {tuple(old.phy2log.shape)} vs {tuple(new.phy2log.shape)}")
    a, b = old.by_rank().numpy(), new.by_rank().numpy()
    both = (old.live_ranks & new.live_ranks).numpy()
    a, b = a[:, both], b[:, both]
    changed = a != b
    # was b[l, r, i] anywhere on rank r in a?  [L, R, S, S] comparison; S is small (<= tens).
    present = (b[..., :, None] == a[..., None, :]).any(-1)
    return int((changed & ~present & (b >= 0)).sum())


def movement_bytes(old: Placement, new: Placement, bytes_per_expert: int) -> int:
    """``movement(old, new) * bytes_per_expert``."""
    return movement(old, new) * int(bytes_per_expert)


def orphans(placement: Placement, live_ranks: Mask = None) -> torch.Tensor:
    """bool ``[layers, E]``: experts with no replica on any rank of ``live_ranks``.

    ``live_ranks`` defaults to the placement's own live ranks; pass the new mask to ask which experts
    a failure leaves without a live copy.
    """
    mask = as_live_mask(live_ranks, placement.num_ranks) if live_ranks is not None else placement.live_ranks.numpy()
    held = placement.by_rank().numpy()[:, mask].reshape(placement.num_layers, -1)
    present = np.zeros((placement.num_layers, placement.num_logical_experts + 1), dtype=bool)
    present[np.arange(placement.num_layers)[:, None], held + 1] = True
    return torch.from_numpy(~present[:, 1:])
