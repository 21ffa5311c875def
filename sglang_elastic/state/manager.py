"""``ElasticEPStateManager``: the process-wide singleton, a drop-in for SGLang's manager (see
:mod:`sglang_elastic.state`)."""
from __future__ import annotations

import operator
import os
import threading
from typing import Any, Callable, Iterable, List, Optional, Union

import torch

from .ep_state import ElasticEPState, Listener, RankArg, _default_device

__all__ = ["ElasticEPStateManager"]


class ElasticEPStateManager:
    """Process-wide singleton holder (classmethods only), drop-in for SGLang's manager.

    ``instance()`` is ``None`` until :meth:`init`. ``healthy_rank_state()`` works at any time.
    """

    _instance: Optional[ElasticEPState] = None
    _on_scale: Optional[Callable[[int, int], None]] = None
    _lock = threading.RLock()

    # ------------------------------------------------------------------ lifecycle
    @classmethod
    def instance(cls) -> Optional[ElasticEPState]:
        return cls._instance

    @classmethod
    def init(
        cls,
        server_args: Any = None,
        *,
        ep_size: Optional[int] = None,
        device: Optional[Union[str, torch.device]] = None,
        max_ep_size: Optional[int] = None,
        live: Optional[Iterable[int]] = None,
    ) -> Optional[ElasticEPState]:
        """Create the singleton once (later calls return it unchanged).

        With SGLang's ``server_args`` (upstream call): returns ``None`` and creates nothing when
        ``server_args.elastic_ep_backend`` is unset, as upstream does; otherwise the capacity is
        ``max_ep_size`` (or the world size) and ranks ``[0, world_size)`` start alive. With plain
        keywords: ``ep_size`` ranks alive (or exactly ``live``), capacity ``max_ep_size or ep_size``.
        """
        with cls._lock:
            if cls._instance is not None:
                return cls._instance
            if server_args is not None:
                backend = getattr(server_args, "elastic_ep_backend", None)
                if backend in (None, "none"):
                    return None
                if ep_size is None:
                    ep_size = cls._world_size(server_args)
                if max_ep_size is None:
                    max_ep_size = getattr(server_args, "max_ep_size", None)
                if device is None and getattr(server_args, "device", None) in ("cpu", "cuda"):
                    device = server_args.device
            if ep_size is None:
                ep_size = cls._world_size(None)
            capacity = max_ep_size if max_ep_size is not None else ep_size
            if capacity < ep_size:
                raise ValueError(f"max_ep_size ({capacity}) must be >= ep_size ({ep_size})")
            state = ElasticEPState(
                capacity, device,
                live=range(ep_size) if live is None else live,
                effective_ep_size=ep_size,
            )
            state.snapshot_active_to_last()
            cls._instance = state
            return state

    @classmethod
    def reset(cls) -> None:
        """Forget the singleton (tests, or a full re-initialisation)."""
        with cls._lock:
            cls._instance = None
            cls._on_scale = None

    @classmethod
    def healthy_rank_state(
        cls,
        ep_size: Optional[int] = None,
        device: Optional[Union[str, torch.device]] = None,
    ) -> torch.Tensor:
        """A fresh all-ones int32 mask; works before :meth:`init`.

        Size: ``ep_size``, else the initialised state's capacity, else the torch.distributed world
        size, else ``$WORLD_SIZE``. Device: ``device``, else the state's, else cuda when present.
        """
        inst = cls._instance
        if ep_size is None:
            if inst is not None:
                ep_size = inst.ep_size
            else:
                ep_size = cls._world_size(None)
        if device is None:
            device = inst.device if inst is not None else _default_device()
        if operator.index(ep_size) <= 0:
            raise ValueError(f"ep_size must be a positive integer, got {ep_size}")
        return torch.ones(ep_size, dtype=torch.int32, device=device)

    @staticmethod
    def _world_size(server_args: Any) -> int:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_world_size()
        if server_args is not None:
            ep = getattr(server_args, "ep_size", None)
            if isinstance(ep, int) and ep > 0:
                return ep
            tp = getattr(server_args, "tp_size", None)
            if isinstance(tp, int) and tp > 0:
                return tp * (getattr(server_args, "pp_size", None) or 1)
        env = os.environ.get("WORLD_SIZE")
        if env and env.isdigit() and int(env) > 0:
            return int(env)
        raise ValueError(
            "cannot tell the EP size: pass ep_size=..., call ElasticEPStateManager.init(...) or "
            "initialise torch.distributed first")

    @classmethod
    def _require(cls) -> ElasticEPState:
        inst = cls._instance
        if inst is None:
            raise RuntimeError("ElasticEPStateManager is not initialised: call ElasticEPStateManager.init(...) first")
        return inst

    # ------------------------------------------------------------------ additions (delegates)
    @classmethod
    def mark_failed(cls, ranks: RankArg, reason: str = "") -> int:
        return cls._require().mark_failed(ranks, reason)

    @classmethod
    def mark_joined(cls, ranks: RankArg, reason: str = "") -> int:
        return cls._require().mark_joined(ranks, reason)

    @classmethod
    def apply_membership(cls, live: Iterable[int], epoch: int, *, restarted: Iterable[int] = (),
                         reason: str = "") -> int:
        return cls._require().apply_membership(live, epoch, restarted=restarted, reason=reason)

    @classmethod
    def add_listener(cls, fn: Listener) -> Listener:
        return cls._require().add_listener(fn)

    @classmethod
    def remove_listener(cls, fn: Listener) -> None:
        inst = cls._instance
        if inst is not None:
            inst.remove_listener(fn)

    @classmethod
    def epoch(cls) -> int:
        """Current epoch (0 before init)."""
        inst = cls._instance
        return 0 if inst is None else inst.epoch

    @classmethod
    def changed_since(cls, epoch: int) -> bool:
        inst = cls._instance
        return (inst.epoch if inst is not None else 0) != epoch

    @classmethod
    def live_ranks(cls) -> List[int]:
        return cls._require().live_ranks()

    # ------------------------------------------------------------------ upstream scale phases
    @classmethod
    def request_scale(cls, n: int) -> bool:
        import time

        inst = cls._instance
        if inst is None or inst.pending_ep_size is not None or inst.scale_phase == "recovery_unsupported":
            return False
        if not 0 < n <= inst.ep_size:
            raise ValueError(f"cannot scale to {n} ranks: capacity is {inst.ep_size} (--max-ep-size)")
        inst.pending_ep_size = n
        inst.scale_phase = "waiting_for_cohort"
        inst.last_error = None
        inst.pending_since = time.monotonic()
        return True

    @classmethod
    def begin_scale(cls) -> bool:
        inst = cls._instance
        if inst is None or inst.pending_ep_size is None or inst.scale_phase != "waiting_for_cohort":
            return False
        inst.scale_phase = "pending"
        return True

    @classmethod
    def mark_joining(cls) -> None:
        cls._mark_phase("joining")

    @classmethod
    def mark_configuring_data_plane(cls) -> None:
        cls._mark_phase("configuring_data_plane")

    @classmethod
    def mark_syncing_new_world(cls) -> None:
        cls._mark_phase("syncing_new_world")

    @classmethod
    def _mark_phase(cls, phase: str) -> None:
        inst = cls._instance
        if inst is not None and inst.pending_ep_size is not None:
            inst.scale_phase = phase

    @classmethod
    def commit_scale(cls) -> None:
        inst = cls._instance
        if inst is None or inst.pending_ep_size is None:
            return
        inst.effective_ep_size = inst.pending_ep_size
        inst.has_scaled = True
        cls._end_scale(inst, "serving_expanded", None)

    @classmethod
    def fail_scale(cls, error: str) -> None:
        inst = cls._instance
        if inst is None:
            return
        cls._end_scale(inst, "failed", error)

    @staticmethod
    def _end_scale(inst: Any, phase: str, error: Optional[str]) -> None:
        inst.pending_ep_size = None
        inst.scale_phase = phase
        inst.last_error = error
        inst.pending_since = None
        inst.reset()

    @classmethod
    def fail_recovery(cls, error: str) -> None:
        inst = cls._instance
        if inst is not None:
            inst.scale_phase = "recovery_unsupported"
            inst.last_error = error

    @classmethod
    def get_effective_ep_size(cls) -> int:
        return cls._require().effective_ep_size

    @classmethod
    def get_pending_ep_size(cls) -> Optional[int]:
        inst = cls._instance
        return None if inst is None else inst.pending_ep_size

    @classmethod
    def get_data_plane_ep_size(cls) -> int:
        inst = cls._require()
        if inst.pending_ep_size is not None and inst.scale_phase in ("configuring_data_plane", "syncing_new_world"):
            return inst.pending_ep_size
        return inst.effective_ep_size

    @classmethod
    def get_scale_phase(cls) -> str:
        inst = cls._instance
        return "disabled" if inst is None else inst.scale_phase

    @classmethod
    def get_last_error(cls) -> Optional[str]:
        inst = cls._instance
        return None if inst is None else inst.last_error

    @classmethod
    def get_ep_join_rank_offset(cls) -> int:
        inst = cls._instance
        return 0 if inst is None else inst.ep_join_rank_offset

    @classmethod
    def on_scale(cls, from_ep_size: int, to_ep_size: int) -> None:
        if cls._on_scale is not None:
            cls._on_scale(from_ep_size, to_ep_size)

    @classmethod
    def is_scaling(cls) -> bool:
        """A scale is pending, or a rank below ``effective_ep_size`` is dead (host mirror only)."""
        inst = cls._instance
        if inst is None or inst.scale_phase == "recovery_unsupported":
            return False
        if inst.pending_ep_size is not None:
            return True
        live = inst.live_ranks()
        return sum(1 for r in live if r < inst.effective_ep_size) < inst.effective_ep_size
