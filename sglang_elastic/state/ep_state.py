"""The per-process elastic-EP state: live-rank mask, epoch, listeners (see :mod:`sglang_elastic.state`)."""
from __future__ import annotations

import logging
import operator
import threading
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Deque, Iterable, List, Optional, Sequence, Tuple, Union

import torch

__all__ = ["ElasticEPEvent", "ElasticEPState", "Listener", "RankArg"]

logger = logging.getLogger(__name__)

RankArg = Union[int, Iterable[int]]


@dataclass(frozen=True)
class ElasticEPEvent:
    """One change of the live set, delivered to listeners.

    Attributes:
        kind: ``"failed"`` (ranks went from alive to dead) or ``"joined"`` (dead to alive).
        ranks: the ranks that changed, sorted.
        epoch: the state's epoch after the change (shared by the events of one change).
        reason: free text (``"heartbeat timeout"``, ``"PeerFailure ..."``, ``"restarted"``...).
        membership_epoch: the agreed membership epoch when the change came from
            :meth:`ElasticEPState.apply_membership`, else ``None``.
    """

    kind: str
    ranks: Tuple[int, ...]
    epoch: int
    reason: str = ""
    membership_epoch: Optional[int] = None


Listener = Callable[[ElasticEPEvent], Any]


def _default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


class ElasticEPState:
    """Live-rank mask of one process plus an epoch; every method is thread-safe.

    Args:
        ep_size: capacity, the number of rank ids (``--max-ep-size`` or the world size).
        device: where ``active_ranks`` lives (default: cuda when available, else cpu).
        live: ranks alive at start (default: all).
        effective_ep_size: upstream's serving size (default: ``ep_size``, or ``max(live) + 1``).

    Attributes (upstream names):
        active_ranks: int32 ``[ep_size]`` on ``device``, 1 = alive; updated in place only.
        last_active_ranks: the snapshot taken by :meth:`snapshot_active_to_last` (same device).
        active_ranks_cpu: int32 CPU mirror of ``active_ranks``, updated in place.
        effective_ep_size, pending_ep_size, scale_phase, last_error, pending_since,
        original_ep_size, has_scaled, ep_join_rank_offset: upstream's scale bookkeeping.
    """

    def __init__(
        self,
        ep_size: int,
        device: Optional[Union[str, torch.device]] = None,
        *,
        live: Optional[Iterable[int]] = None,
        effective_ep_size: Optional[int] = None,
    ) -> None:
        ep_size = operator.index(ep_size)
        if ep_size <= 0:
            raise ValueError(f"ep_size must be a positive integer, got {ep_size}")
        self._ep_size = ep_size
        self._device = torch.device(device) if device is not None else _default_device()
        self._lock = threading.RLock()
        alive = [1] * ep_size
        if live is not None:
            live_set = set(self._check_ranks(live))
            alive = [1 if r in live_set else 0 for r in range(ep_size)]
            if effective_ep_size is None:
                effective_ep_size = max(live_set) + 1 if live_set else 0
        self._alive: List[int] = alive  # the host copy everything reads (no device sync)
        self.active_ranks: torch.Tensor = torch.tensor(alive, dtype=torch.int32, device=self._device)
        self.last_active_ranks: torch.Tensor = self.active_ranks.clone()
        self.active_ranks_cpu: torch.Tensor = torch.tensor(alive, dtype=torch.int32)
        self._epoch = 0
        self._membership_epoch: Optional[int] = None
        self._listeners: List[Listener] = []
        self._pending: Deque[ElasticEPEvent] = deque()
        self._dispatch_lock = threading.Lock()
        self._dispatching = threading.local()
        n_eff = ep_size if effective_ep_size is None else operator.index(effective_ep_size)
        if not 0 <= n_eff <= ep_size:
            raise ValueError(f"effective_ep_size must be in [0, {ep_size}], got {n_eff}")
        # upstream scale bookkeeping (same names and meaning as SGLang's ElasticEPState)
        self.effective_ep_size: int = n_eff
        self.original_ep_size: int = n_eff
        self.pending_ep_size: Optional[int] = None
        self.scale_phase: str = "idle"
        self.last_error: Optional[str] = None
        self.pending_since: Optional[float] = None
        self.has_scaled: bool = False
        self.ep_join_rank_offset: int = 0

    # ------------------------------------------------------------------ read side (no device sync)
    @property
    def ep_size(self) -> int:
        """Capacity: the number of rank ids this state knows (``len(active_ranks)``)."""
        return self._ep_size

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def epoch(self) -> int:
        """Bumped on every change of the live set; a plain host integer."""
        return self._epoch

    @property
    def membership_epoch(self) -> Optional[int]:
        """The last agreed membership epoch applied through :meth:`apply_membership` (or None)."""
        return self._membership_epoch

    def changed_since(self, epoch: int) -> bool:
        """True when the live set changed after ``epoch`` was read (reads one host int)."""
        return self._epoch != epoch

    def live_ranks(self) -> List[int]:
        """Sorted alive rank ids (host mirror; empty when every rank failed)."""
        with self._lock:
            return [r for r, a in enumerate(self._alive) if a]

    def dead_ranks(self) -> List[int]:
        with self._lock:
            return [r for r, a in enumerate(self._alive) if not a]

    def is_alive(self, rank: int) -> bool:
        (r,) = self._check_ranks([rank])
        return bool(self._alive[r])

    # ------------------------------------------------------------------ upstream surface
    def is_active_equal_last(self) -> bool:
        """Upstream semantics: compares the device mask with the last snapshot (a device sync)."""
        with self._lock:
            return bool(torch.equal(self.active_ranks, self.last_active_ranks))

    def snapshot_active_to_last(self) -> None:
        """Copy ``active_ranks`` into ``last_active_ranks`` (in place)."""
        with self._lock:
            self.last_active_ranks.copy_(self.active_ranks)

    def sync_active_to_cpu(self) -> None:
        """Read the device mask back (a device sync) into the CPU mirror.

        Kernels may write ``active_ranks`` themselves (NIXL-EP copies its mask buffer into it);
        such changes are adopted here as ``failed`` / ``joined`` events with an epoch bump.
        """
        with self._lock:
            dev = [int(x) for x in self.active_ranks.detach().cpu().tolist()]
            failed = [r for r in range(self._ep_size) if self._alive[r] and not dev[r]]
            joined = [r for r in range(self._ep_size) if dev[r] and not self._alive[r]]
            if failed or joined:
                self._commit(failed, joined, "device mask", None, write_device=False)
        self._dispatch()

    def reset(self) -> None:
        """Upstream semantics: ranks ``[0, effective_ep_size)`` alive, the rest dead; snapshot."""
        with self._lock:
            target = [1 if r < self.effective_ep_size else 0 for r in range(self._ep_size)]
            failed = [r for r in range(self._ep_size) if self._alive[r] and not target[r]]
            joined = [r for r in range(self._ep_size) if target[r] and not self._alive[r]]
            if failed or joined:
                self._commit(failed, joined, "reset", None)
            self.snapshot_active_to_last()
        self._dispatch()

    # ------------------------------------------------------------------ changes
    def mark_failed(self, ranks: RankArg, reason: str = "") -> int:
        """Mark ``ranks`` dead; returns the epoch after the call.

        Already-dead ranks are ignored (no epoch bump when nothing changed). Unknown ids raise
        ``ValueError`` and change nothing. Marking every rank dead is allowed.
        """
        rs = self._check_ranks(ranks)
        with self._lock:
            failed = sorted({r for r in rs if self._alive[r]})
            if failed:
                self._commit(failed, [], reason, None)
            epoch = self._epoch
        self._dispatch()
        return epoch

    def mark_joined(self, ranks: RankArg, reason: str = "") -> int:
        """Mark ``ranks`` alive; returns the epoch after the call (idempotent like mark_failed).

        A rank at or beyond ``effective_ep_size`` grows ``effective_ep_size`` to include it.
        """
        rs = self._check_ranks(ranks)
        with self._lock:
            joined = sorted({r for r in rs if not self._alive[r]})
            if joined:
                self._commit([], joined, reason, None)
            epoch = self._epoch
        self._dispatch()
        return epoch

    def apply_membership(
        self,
        live: Iterable[int],
        epoch: int,
        *,
        restarted: Iterable[int] = (),
        reason: str = "",
    ) -> int:
        """Adopt an agreed membership view: exactly ``live`` alive, epoch ``epoch``.

        ``restarted`` are ranks alive before and after whose process was replaced (a new
        incarnation): they get a ``failed`` and a ``joined`` event. Views are applied in order;
        one whose ``epoch`` is not newer than the last applied one is ignored. The local epoch
        becomes ``epoch`` when that is ahead of it (the usual case: every rank then holds the same
        epoch); if local marks ran ahead, it counts on by one. Returns the local epoch.
        """
        live_set = set(self._check_ranks(live))
        restarted_set = set(self._check_ranks(restarted)) & live_set
        epoch = operator.index(epoch)
        with self._lock:
            if self._membership_epoch is not None and epoch <= self._membership_epoch:
                return self._epoch
            failed = [r for r in range(self._ep_size) if self._alive[r] and (r not in live_set or r in restarted_set)]
            joined = [r for r in range(self._ep_size) if r in live_set and (not self._alive[r] or r in restarted_set)]
            self._membership_epoch = epoch
            if failed or joined:
                self._commit(failed, joined, reason or f"membership epoch {epoch}", epoch)
            elif epoch > self._epoch:
                self._epoch = epoch
            out = self._epoch
        self._dispatch()
        return out

    def _commit(
        self,
        failed: Sequence[int],
        joined: Sequence[int],
        reason: str,
        membership_epoch: Optional[int],
        *,
        write_device: bool = True,
    ) -> None:
        """Apply one change under ``self._lock``: one epoch bump, events queued in order."""
        for r in failed:
            self._alive[r] = 0
        for r in joined:
            self._alive[r] = 1
        changed = sorted(set(failed) | set(joined))
        idx = torch.tensor(changed, dtype=torch.long)
        vals = torch.tensor([self._alive[r] for r in changed], dtype=torch.int32)
        self.active_ranks_cpu.index_copy_(0, idx, vals)
        if write_device:  # in place: kernels hold this tensor by reference
            self.active_ranks.index_copy_(0, idx.to(self._device), vals.to(self._device))
        if joined:
            self.effective_ep_size = max(self.effective_ep_size, max(joined) + 1)
        if membership_epoch is not None and membership_epoch > self._epoch:
            self._epoch = membership_epoch
        else:
            self._epoch += 1
        if failed:
            self._pending.append(
                ElasticEPEvent("failed", tuple(sorted(failed)), self._epoch, reason, membership_epoch))
        if joined:
            self._pending.append(
                ElasticEPEvent("joined", tuple(sorted(joined)), self._epoch, reason, membership_epoch))
        logger.info("elastic EP state epoch %d: failed=%s joined=%s (%s)",
                    self._epoch, list(failed), list(joined), reason)

    # ------------------------------------------------------------------ listeners
    def add_listener(self, fn: Listener) -> Listener:
        """Call ``fn(event)`` after every change, in epoch order; returns ``fn``.

        Listeners run on the thread that made the change, outside the state lock (they may read
        or change the state). Exceptions are logged and swallowed.
        """
        if not callable(fn):
            raise TypeError(f"listener must be callable, got {type(fn).__name__}")
        with self._lock:
            self._listeners.append(fn)
        return fn

    def remove_listener(self, fn: Listener) -> None:
        with self._lock:
            try:
                self._listeners.remove(fn)
            except ValueError:
                pass

    def _dispatch(self) -> None:
        """Deliver queued events; re-entrant calls (from a listener) leave them to the outer loop."""
        if getattr(self._dispatching, "active", False):
            return
        with self._dispatch_lock:
            self._dispatching.active = True
            try:
                while True:
                    with self._lock:
                        if not self._pending:
                            return
                        event = self._pending.popleft()
                        listeners = list(self._listeners)
                    for fn in listeners:
                        try:
                            fn(event)
                        except Exception:  # noqa: BLE001 - one failing listener must not keep the
                            # change from the others (the state itself is already updated); logged in full
                            logger.exception("elastic EP listener %r failed on %s", fn, event)
            finally:
                self._dispatching.active = False

    # ------------------------------------------------------------------ helpers
    def _check_ranks(self, ranks: Any) -> List[int]:
        if isinstance(ranks, torch.Tensor):
            ranks = ranks.reshape(-1).tolist()
        elif isinstance(ranks, (str, bytes)):
            raise ValueError(f"rank ids must be integers, got {ranks!r}")
        elif not isinstance(ranks, Iterable):
            ranks = [ranks]
        out: List[int] = []
        bad: List[Any] = []
        for r in ranks:
            if isinstance(r, bool):
                bad.append(r)
                continue
            try:
                i = operator.index(r)
            except TypeError:
                bad.append(r)
                continue
            if 0 <= i < self._ep_size:
                out.append(i)
            else:
                bad.append(i)
        if bad:
            raise ValueError(
                f"unknown rank id(s) {bad}: this elastic EP state knows ranks 0..{self._ep_size - 1} "
                f"(ep_size={self._ep_size}; raise --max-ep-size to admit more)")
        return out

    def __repr__(self) -> str:
        return (f"ElasticEPState(ep_size={self._ep_size}, epoch={self._epoch}, "
                f"live={self.live_ranks()}, device={self._device})")
