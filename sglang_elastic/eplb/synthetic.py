"""Synthetic expert-load matrices for planning, benchmarks and tests (deterministic by seed)."""
from __future__ import annotations

from typing import Callable, Dict

import numpy as np

__all__ = ["SYNTHETIC_LOADS", "synthetic_load", "drift"]


def _lognormal(sigma: float) -> Callable[[np.random.Generator, int, int], np.ndarray]:
    return lambda rng, L, E: rng.lognormal(0.0, sigma, size=(L, E))


def _zipf(s: float) -> Callable[[np.random.Generator, int, int], np.ndarray]:
    def make(rng: np.random.Generator, L: int, E: int) -> np.ndarray:
        base = 1.0 / np.arange(1, E + 1, dtype=np.float64) ** s
        # Each layer ranks its experts differently; real routers do not share hot experts across layers.
        return np.stack([base[rng.permutation(E)] for _ in range(L)])

    return make


def _hot(rng: np.random.Generator, L: int, E: int) -> np.ndarray:
    w = rng.lognormal(0.0, 0.5, size=(L, E))
    n_hot = max(1, E // 32)
    for l in range(L):  # a few experts per layer get 10-30x the typical load
        hot = rng.choice(E, n_hot, replace=False)
        w[l, hot] *= rng.uniform(10, 30, size=n_hot)
    return w


def _dirichlet(alpha: float) -> Callable[[np.random.Generator, int, int], np.ndarray]:
    # alpha <= 0.5: a few experts take most of a layer's tokens, many get almost none.
    return lambda rng, L, E: rng.dirichlet(np.full(E, alpha), size=L)


def _shared_hot(rng: np.random.Generator, L: int, E: int) -> np.ndarray:
    """Correlated bursts: one hot set of experts shared by every layer (e.g. a topic or language in the
    batch), each layer scaling it by its own burst factor; the rest lognormal."""
    w = rng.lognormal(0.0, 0.5, size=(L, E))
    hot = rng.choice(E, max(1, E // 16), replace=False)
    w[:, hot] *= rng.uniform(8, 25, size=(L, 1)) * rng.lognormal(0.0, 0.3, size=(L, hot.size))
    return w


SYNTHETIC_LOADS: Dict[str, Callable[[np.random.Generator, int, int], np.ndarray]] = {
    "uniform": lambda rng, L, E: np.ones((L, E)),
    "lognormal0.5": _lognormal(0.5),
    "lognormal1": _lognormal(1.0),
    "lognormal1.5": _lognormal(1.5),
    "zipf1.2": _zipf(1.2),
    "hot": _hot,
    "dirichlet0.3": _dirichlet(0.3),
    "shared_hot": _shared_hot,
}


def synthetic_load(name: str, num_layers: int, num_experts: int, seed: int = 0, tokens: float = 1e6) -> np.ndarray:
    """float64 ``[num_layers, num_experts]`` load of family ``name``, each layer summing to ``tokens``."""
    if name not in SYNTHETIC_LOADS:
        raise ValueError(f"unknown synthetic load {name!r}; choose one of {sorted(SYNTHETIC_LOADS)}")
    w = SYNTHETIC_LOADS[name](np.random.default_rng(seed), num_layers, num_experts)
    return w / w.sum(1, keepdims=True) * tokens


def drift(load: np.ndarray, fraction: float, seed: int = 1) -> np.ndarray:
    """``load`` with each expert's share multiplied by a lognormal factor so the total variation is about ``fraction``.

    Total variation distance between per-layer distributions is what "x % drift" means here.
    """
    rng = np.random.default_rng(seed)
    p = load / load.sum(1, keepdims=True)
    sigma, q = 0.05, p
    for _ in range(60):  # bisection-free search: grow sigma until the TV distance reaches the target
        q = p * rng.lognormal(0.0, sigma, size=p.shape)
        q /= q.sum(1, keepdims=True)
        if 0.5 * np.abs(q - p).sum(1).mean() >= fraction:
            break
        sigma *= 1.15
    return q * load.sum(1, keepdims=True)
