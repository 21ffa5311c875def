"""Expert placement: which logical expert each physical slot serves, per layer.

A placement is one tensor, ``phy2log[L, P]`` (int64, ``P = num_ranks * slots_per_rank``), with
``-1`` in every slot of a dead rank. Everything else (``log2phy``, ``logcnt``, the live-rank mask)
is derived from it, so there is a single source of truth to validate, ship and commit.

SGLang's own format differs in one way: its ``physical_to_logical_map`` cannot hold ``-1`` (it is
used as an index), so dead slots carry a filler id and are left out of ``logical_to_physical_map``
and ``logical_count`` instead. :meth:`Placement.to_sglang` / :meth:`Placement.from_sglang` convert.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Tuple, Union

import numpy as np
import torch

__all__ = ["Placement", "PlacementError", "as_live_mask", "load_placement_file", "save_placement_file"]


class PlacementError(ValueError):
    """A placement (or an input describing one) is inconsistent."""


def as_live_mask(live_ranks: Union[None, torch.Tensor, np.ndarray, Sequence], num_ranks: int) -> np.ndarray:
    """Normalise a live-rank mask (bool/int, tensor/array/list; ``None`` = all live) to ``bool[num_ranks]``."""
    if live_ranks is None:
        return np.ones(num_ranks, dtype=bool)
    if isinstance(live_ranks, torch.Tensor):
        live_ranks = live_ranks.detach().cpu().numpy()
    arr = np.asarray(live_ranks)
    if arr.ndim != 1 or arr.shape[0] != num_ranks:
        raise PlacementError(f"live_ranks must have one entry per rank ({num_ranks}), got shape {tuple(arr.shape)}")
    if arr.dtype != bool and not np.isin(arr, (0, 1)).all():
        raise PlacementError("live_ranks must be a 0/1 or bool mask")
    return arr.astype(bool)


@dataclass(frozen=True)
class Placement:
    """Expert placement over ``num_ranks`` ranks of ``slots_per_rank`` slots, for every MoE layer.

    Attributes:
        phy2log: int64 ``[layers, num_ranks * slots_per_rank]``; ``-1`` marks slots of dead ranks.
        num_ranks: EP size the placement was made for (dead ranks included).
        num_logical_experts: number of logical experts ``E``.
    """

    phy2log: torch.Tensor
    num_ranks: int
    num_logical_experts: int

    def __post_init__(self) -> None:
        p = self.phy2log
        if not isinstance(p, torch.Tensor):
            p = torch.as_tensor(np.asarray(p))
        if p.dim() != 2:
            raise PlacementError(f"phy2log must be 2-D [layers, physical slots], got shape {tuple(p.shape)}")
        if p.dtype.is_floating_point or p.dtype == torch.bool:
            raise PlacementError(f"phy2log must be an integer tensor, got {p.dtype}")
        if self.num_ranks <= 0 or p.shape[1] % self.num_ranks != 0:
            raise PlacementError(
                f"{p.shape[1]} physical slots cannot be split evenly over {self.num_ranks} ranks"
            )
        object.__setattr__(self, "phy2log", p.to(torch.int64).cpu().contiguous())

    # ------------------------------------------------------------------ shape
    @property
    def num_layers(self) -> int:
        """Number of MoE layers."""
        return self.phy2log.shape[0]

    @property
    def num_physical(self) -> int:
        """Physical slots per layer, dead ones included."""
        return self.phy2log.shape[1]

    @property
    def slots_per_rank(self) -> int:
        """Slots each rank holds per layer."""
        return self.num_physical // self.num_ranks

    def by_rank(self) -> torch.Tensor:
        """``phy2log`` viewed as ``[layers, num_ranks, slots_per_rank]``."""
        return self.phy2log.view(self.num_layers, self.num_ranks, self.slots_per_rank)

    @property
    def live_ranks(self) -> torch.Tensor:
        """bool ``[num_ranks]``: ranks holding routable slots (a rank is dead iff all its slots are ``-1``)."""
        return (self.by_rank() >= 0).any(-1).any(0)

    # --------------------------------------------------------------- derived
    @property
    def logcnt(self) -> torch.Tensor:
        """int64 ``[layers, E]``: replicas of each logical expert on live ranks."""
        cnt = torch.zeros(self.num_layers, self.num_logical_experts + 1, dtype=torch.int64)
        cnt.scatter_add_(1, self.phy2log.clamp(min=-1) + 1, torch.ones_like(self.phy2log))
        return cnt[:, 1:]

    @property
    def log2phy(self) -> torch.Tensor:
        """int64 ``[layers, E, X]``: physical slots of each logical expert, ascending, padded with ``-1``.

        ``X`` is the largest replica count; dead slots never appear.
        """
        L, P, E = self.num_layers, self.num_physical, self.num_logical_experts
        cnt = self.logcnt
        X = max(int(cnt.max().item()) if cnt.numel() else 1, 1)
        key = torch.where(self.phy2log >= 0, self.phy2log, torch.full_like(self.phy2log, E))
        # A stable sort by expert id groups slots per expert in ascending slot order.
        order = torch.sort(key, dim=1, stable=True).indices
        sorted_e = key.gather(1, order)
        start = torch.cumsum(cnt, dim=1) - cnt  # first position of each expert in the sorted row
        rank_in_e = torch.arange(P).expand(L, P) - start.gather(1, sorted_e.clamp(max=E - 1))
        out = torch.full((L, E + 1, X), -1, dtype=torch.int64)
        valid = sorted_e < E
        e_idx = torch.where(valid, sorted_e, torch.full_like(sorted_e, E))
        r_idx = torch.where(valid, rank_in_e, torch.zeros_like(rank_in_e))
        out[torch.arange(L).unsqueeze(1).expand(L, P), e_idx, r_idx] = torch.where(valid, order, -1)
        return out[:, :E]

    # ------------------------------------------------------------ validation
    def validate(
        self,
        live_ranks: Optional[Union[torch.Tensor, np.ndarray, Sequence]] = None,
        allow_duplicates: bool = False,
    ) -> "Placement":
        """Check the placement; raise :class:`PlacementError` naming the first problem found.

        Checks: ids in ``[-1, E)``; each rank is either entirely dead (all ``-1``) or has no ``-1``;
        every logical expert has a replica on a live rank in every layer; no rank holds an expert twice;
        if ``live_ranks`` is given, dead slots match it exactly. Returns ``self`` for chaining.
        """
        p, E = self.phy2log.numpy(), self.num_logical_experts
        L, R, S = self.num_layers, self.num_ranks, self.slots_per_rank
        if p.size and (p.min() < -1 or p.max() >= E):
            raise PlacementError(f"phy2log holds ids outside [-1, {E}): min {int(p.min())}, max {int(p.max())}")
        x = p.reshape(L, R, S)
        dead_slot = x < 0
        all_dead, any_dead = dead_slot.all(-1), dead_slot.any(-1)
        partial = any_dead & ~all_dead
        if partial.any():
            l, r = (int(v) for v in np.argwhere(partial)[0])
            raise PlacementError(f"rank {r} in layer {l} mixes dead (-1) and live slots")
        if (all_dead != all_dead[:1]).any():
            raise PlacementError("a rank is dead in some layers and live in others")
        placement_live = ~all_dead[0] if L else np.ones(R, dtype=bool)
        if live_ranks is not None:
            mask = as_live_mask(live_ranks, R)
            wrong = mask != placement_live
            if wrong.any():
                r = int(np.flatnonzero(wrong)[0])
                state = "live" if mask[r] else "dead"
                raise PlacementError(
                    f"rank {r} is {state} but the placement {'gives it no' if mask[r] else 'routes to its'} slots"
                )
        cnt = np.bincount((np.arange(L)[:, None] * (E + 1) + p + 1).ravel(), minlength=L * (E + 1)).reshape(L, E + 1)
        missing = cnt[:, 1:] == 0
        if missing.any():
            l, e = (int(v) for v in np.argwhere(missing)[0])
            raise PlacementError(
                f"logical expert {e} has no replica on a live rank in layer {l} "
                f"({int(missing.sum())} (layer, expert) pairs missing)"
            )
        if not allow_duplicates:
            srt = np.sort(x, axis=-1)
            dup = (srt[..., 1:] == srt[..., :-1]) & (srt[..., 1:] >= 0)
            if dup.any():
                l, r, i = (int(v) for v in np.argwhere(dup)[0])
                raise PlacementError(f"rank {r} holds logical expert {int(srt[l, r, i])} twice in layer {l}")
        return self

    # ------------------------------------------------------ SGLang interop
    def to_sglang(self) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """SGLang's triple ``(physical_to_logical_map, logical_to_physical_map, logical_count)``.

        Dead slots get a filler id (the slot's own index modulo ``E``) in ``physical_to_logical_map``
        because SGLang indexes with it; they never appear in the other two.
        """
        filler = torch.arange(self.num_physical).remainder(self.num_logical_experts).expand_as(self.phy2log)
        p2l = torch.where(self.phy2log >= 0, self.phy2log, filler).contiguous()
        return p2l, self.log2phy, self.logcnt

    @classmethod
    def from_sglang(
        cls,
        physical_to_logical_map: Union[torch.Tensor, np.ndarray, Sequence],
        num_ranks: int,
        num_logical_experts: Optional[int] = None,
        live_ranks: Optional[Union[torch.Tensor, np.ndarray, Sequence]] = None,
    ) -> "Placement":
        """Build from SGLang's ``physical_to_logical_map`` and the live-rank mask (dead slots become ``-1``)."""
        p = torch.as_tensor(np.asarray(physical_to_logical_map)) if not isinstance(
            physical_to_logical_map, torch.Tensor) else physical_to_logical_map
        if p.dim() != 2:
            raise PlacementError(f"physical_to_logical_map must be 2-D, got shape {tuple(p.shape)}")
        if p.shape[1] % num_ranks:
            raise PlacementError(f"{p.shape[1]} physical slots cannot be split evenly over {num_ranks} ranks")
        p = p.to(torch.int64).clone()
        mask = torch.from_numpy(as_live_mask(live_ranks, num_ranks))
        p.view(p.shape[0], num_ranks, -1)[:, ~mask] = -1
        if num_logical_experts is None:
            num_logical_experts = int(p.max().item()) + 1
        return cls(p, num_ranks, num_logical_experts)

    @classmethod
    def trivial(cls, num_layers: int, num_logical_experts: int, num_ranks: int, slots_per_rank: int) -> "Placement":
        """SGLang's trivial placement: slot ``p`` serves expert ``p % E`` in every layer."""
        P = num_ranks * slots_per_rank
        if P < num_logical_experts:
            raise PlacementError(f"{P} slots cannot hold {num_logical_experts} experts")
        return cls(torch.arange(P).remainder(num_logical_experts).expand(num_layers, P).clone(),
                   num_ranks, num_logical_experts)


def save_placement_file(placement: Placement, path: Union[str, Path]) -> None:
    """Write ``placement`` in SGLang's ``--init-expert-location`` format (``.json`` or ``.pt``).

    The file holds exactly ``{"physical_to_logical_map": [...]}``: SGLang passes the dict's keys as
    keyword arguments to ``ExpertLocationMetadata.init_by_mapping``, so extra keys would break it.
    """
    path = Path(path)
    p2l, _, _ = placement.to_sglang()
    if path.suffix == ".json":
        path.write_text(json.dumps({"physical_to_logical_map": p2l.tolist()}))
    elif path.suffix == ".pt":
        torch.save({"physical_to_logical_map": p2l}, str(path))
    else:
        raise PlacementError(f"placement files must end in .json or .pt, got {path.name!r}")


def load_placement_file(
    path: Union[str, Path],
    num_ranks: int,
    num_logical_experts: Optional[int] = None,
    live_ranks: Optional[Union[torch.Tensor, np.ndarray, Sequence]] = None,
) -> Placement:
    """Read an SGLang ``--init-expert-location`` mapping file (``.json`` or ``.pt``) into a :class:`Placement`."""
    path = Path(path)
    try:
        if path.suffix == ".pt":
            data = torch.load(str(path), weights_only=True, map_location="cpu")
        elif path.suffix == ".json":
            data = json.loads(path.read_text())
        else:
            raise PlacementError(f"placement files must end in .json or .pt, got {path.name!r}")
    except (OSError, json.JSONDecodeError, RuntimeError, EOFError) as exc:
        raise PlacementError(f"cannot read placement file {str(path)!r}: {exc}") from None
    if not isinstance(data, dict) or "physical_to_logical_map" not in data:
        keys = list(data) if isinstance(data, dict) else type(data).__name__
        raise PlacementError(f"{path.name}: expected a 'physical_to_logical_map' entry, found {keys}")
    try:
        p2l = torch.as_tensor(np.asarray(data["physical_to_logical_map"], dtype=np.int64))
    except (ValueError, TypeError) as exc:
        raise PlacementError(f"{path.name}: physical_to_logical_map is not a rectangular integer array ({exc})") from None
    return Placement.from_sglang(p2l, num_ranks, num_logical_experts, live_ranks)
