"""The rehearsal's MoE model: deterministic weights, a skewed router, SiLU expert MLPs.

Every process can rebuild any expert's weights from ``(seed, layer, expert)``, which gives the
single-process reference and the initial weights of each rank; after start-up, ranks only ever get
weights from peers or the backup store (the updater), and the reference checks they are right.
"""
from __future__ import annotations

import math
from typing import Tuple

import torch

from .config import ModelConfig

__all__ = ["MoEModel"]


def _gen(*key: int) -> torch.Generator:
    h = 0
    for k in key:
        h = (h * 1_000_003 + int(k) + 1) % (2 ** 62)
    return torch.Generator().manual_seed(h)


class MoEModel:
    """``layers`` residual MoE layers: ``x <- x + sum_k w_k * mlp_{e_k}(norm(x))``."""

    def __init__(self, cfg: ModelConfig) -> None:
        self.cfg = cfg
        L, E, H = cfg.layers, cfg.experts, cfg.hidden
        g = _gen(cfg.seed, 7)
        self.router = torch.randn(L, H, E, generator=g) / math.sqrt(H)
        # Lognormal popularity: a few experts get most tokens, so placement matters.
        self.bias = cfg.skew * torch.randn(L, E, generator=g)

    def expert(self, layer: int, expert: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(w1 [H, F], w2 [F, H])`` of one expert."""
        g = _gen(self.cfg.seed, 11, layer, expert)
        H, F = self.cfg.hidden, self.cfg.ffn
        return torch.randn(H, F, generator=g) / math.sqrt(H), torch.randn(F, H, generator=g) / math.sqrt(F)

    def all_experts(self, layer: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(w1 [E, H, F], w2 [E, F, H])`` of one layer."""
        ws = [self.expert(layer, e) for e in range(self.cfg.experts)]
        return torch.stack([w[0] for w in ws]), torch.stack([w[1] for w in ws])

    def batch(self, batch_id: int, tokens: int) -> torch.Tensor:
        """The hidden states of request batch ``batch_id`` (deterministic)."""
        return torch.randn(tokens, self.cfg.hidden, generator=_gen(self.cfg.seed, 13, batch_id))

    @staticmethod
    def norm(x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)

    def route(self, layer: int, h: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Router: ``(topk_ids [T, K], topk_weights [T, K], logits [T, E])`` for normalised input ``h``."""
        logits = h @ self.router[layer] + self.bias[layer]
        vals, ids = logits.topk(self.cfg.top_k, dim=1)
        return ids, torch.softmax(vals, dim=1), logits

    @staticmethod
    def mlp(h: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
        """SiLU MLP, batched over leading dims: ``h [..., N, H]``, ``w1 [..., H, F]``, ``w2 [..., F, H]``."""
        return torch.nn.functional.silu(h @ w1) @ w2

    def reference_layer(self, layer: int, h: torch.Tensor, logical: torch.Tensor, weights: torch.Tensor,
                        experts: Tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """MoE output for normalised ``h [T, H]`` given routing decisions (``logical [T, K]``, -1 = none)
        and the layer's expert weights, in one process."""
        w1, w2 = experts
        every = self.mlp(h.unsqueeze(0), w1, w2)                                 # [E, T, H]
        T, K = logical.shape
        tok = torch.arange(T)[:, None].expand(T, K)
        pair = every[logical.clamp(min=0), tok]                                  # [T, K, H]
        pair = torch.where((logical >= 0)[..., None], pair, torch.zeros_like(pair))
        return (weights[..., None].float() * pair).sum(1)
