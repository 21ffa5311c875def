"""Drain (scale-down) of EP ranks while they keep serving: the request checks, the plan, the steps.

A drain of ranks ``D`` runs in three kinds of step, each collective over the schedulers:

1. **plan**: the movement-aware EPLB places every expert on the ranks that stay (``live - D``),
   starting from the placement in force with ``D``'s slots emptied, so survivors keep what they
   hold and only ``D``'s experts (and any rebalancing the tolerance allows) move;
2. **move**, one chunk of layers per step: SGLang's update entry point with our layerwise updater
   copies the chunk's experts from their current holders (``D`` included: they are still live and
   serving) and commits the chunk's metadata, after which routing for those layers avoids ``D``;
   between steps the server runs forward passes as usual;
3. **mask**: ``D`` is marked dead in the elastic state with reason ``drained`` (dispatch masks
   them); no token was routed to them since their last layer moved, so no request is lost.

:class:`SchedulerDrain` is the scheduler side (one per scheduler process, no SGLang import: the
weight movement is the ``apply_chunk`` callable it is given). :class:`DrainController` is the HTTP
side: it checks a request against the cluster's view, runs the steps on a worker thread through a
:class:`DrainEngine`, and reports progress. ``sglang_plugin/drain_sglang.py`` binds both to SGLang.
"""
from __future__ import annotations

import logging
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, List, Optional, Protocol, Sequence, Tuple

import numpy as np
import torch

from ..eplb.algorithms import rebalance
from ..eplb.placement import Placement

__all__ = ["DrainError", "ClusterView", "DrainProgress", "DrainEngine", "parse_drain_request", "check_drain",
           "plan_drain", "SchedulerDrain", "DrainController", "DRAINED_REASON"]

log = logging.getLogger(__name__)

#: Reason recorded in the elastic state (and the failures metric's label) for drained ranks.
DRAINED_REASON = "drained"


class DrainError(Exception):
    """A refused drain request: ``status`` is the HTTP status to answer, ``message`` one line."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


@dataclass(frozen=True)
class ClusterView:
    """What a drain request is checked against.

    Attributes:
        ep_size: EP ranks of the placement (dead ones included).
        live: live ranks, sorted.
        slots_per_rank: physical expert slots per rank and layer.
        num_logical: logical experts per layer.
        epoch: the elastic state's epoch.
    """

    ep_size: int
    live: Tuple[int, ...]
    slots_per_rank: int
    num_logical: int
    epoch: int = 0


@dataclass
class DrainProgress:
    """A drain's progress (what ``GET /elastic_ep/status`` shows)."""

    drain_id: str
    ranks: List[int]
    phase: str = "planning"  # planning -> moving -> masking -> done | failed
    layers_total: int = 0
    layers_done: int = 0
    moved_slots: int = 0
    error: Optional[str] = None
    started: float = field(default_factory=time.time)
    finished: Optional[float] = None

    @property
    def running(self) -> bool:
        return self.phase not in ("done", "failed")

    def as_dict(self) -> Dict[str, Any]:
        return asdict(self)


def parse_drain_request(body: Any) -> List[int]:
    """The ranks of a ``{"ranks": [...]}`` body, sorted and unique (``DrainError`` 400 otherwise)."""
    if not isinstance(body, dict):
        raise DrainError(400, 'the body must be a JSON object such as {"ranks": [3]}')
    extra = sorted(set(body) - {"ranks"})
    if extra:
        raise DrainError(400, f"unknown field {extra[0]!r}; the body is {{\"ranks\": [...]}}")
    ranks = body.get("ranks")
    if not isinstance(ranks, list) or not ranks:
        raise DrainError(400, '"ranks" must be a non-empty list of rank numbers')
    bad = [r for r in ranks if not isinstance(r, int) or isinstance(r, bool)]
    if bad:
        raise DrainError(400, f'"ranks" must hold integers, got {bad[0]!r}')
    return sorted(set(ranks))


def check_drain(ranks: Sequence[int], view: ClusterView) -> List[int]:
    """The ranks of ``ranks`` still live (what is left to drain); ``DrainError`` when the drain is impossible.

    400: a rank outside ``0..ep_size-1``. 422: the survivors' slots cannot hold every logical
    expert, or no rank would stay. Ranks already dead (drained before, or failed) are skipped:
    draining them again is a no-op.
    """
    out = [r for r in ranks if not 0 <= r < view.ep_size]
    if out:
        raise DrainError(400, f"rank {out[0]} is not an EP rank: ranks are 0..{view.ep_size - 1}")
    live = set(view.live)
    todo = [r for r in ranks if r in live]
    stay = len(live) - len(todo)
    if todo and stay == 0:
        raise DrainError(422, f"draining ranks {todo} would leave no live rank")
    if todo and stay * view.slots_per_rank < view.num_logical:
        raise DrainError(422, f"draining ranks {todo} leaves {stay} live ranks x {view.slots_per_rank} slots = "
                              f"{stay * view.slots_per_rank} slots, fewer than the {view.num_logical} logical experts")
    return todo


def plan_drain(p2l: torch.Tensor, live: np.ndarray, leaving: Sequence[int], num_logical: int,
               load: Optional[torch.Tensor] = None, ranks_per_node: Optional[int] = None) -> Placement:
    """The placement after draining ``leaving``, moving few experts.

    Parameters:
        p2l: int64 ``[L, P]`` SGLang's ``physical_to_logical_map`` in force.
        live: bool ``[R]`` live ranks now (``leaving`` among them).
        leaving: ranks to drain.
        num_logical: ``E``.
        load: ``[L, E]`` expert load to balance with (``None``: uniform).
        ranks_per_node: node-aware placement (``None``: flat).

    Returns:
        a :class:`Placement` over ``R`` ranks with ``leaving`` (and the dead) as ``-1``.
    """
    R = live.shape[0]
    stay = live.copy()
    stay[list(leaving)] = False
    # The placement in force over the ranks live NOW: the algorithm places on ``stay`` only, and sees
    # the live set change (its failover/scale trade-off, few transfers, not a periodic rebalance's).
    current = Placement.from_sglang(p2l, R, num_logical, live).phy2log
    w = torch.ones(p2l.shape[0], num_logical, dtype=torch.float64) if load is None else load.to(torch.float64)
    return rebalance(w, R, p2l.shape[1] // R, live_ranks=stay, current=current, ranks_per_node=ranks_per_node)


class SchedulerDrain:
    """The scheduler side of a drain (one per scheduler process; every step runs on every scheduler).

    Args:
        state: the process's :class:`~sglang_elastic.state.ElasticEPState`.
        get_p2l: ``() -> [L, P]`` SGLang's ``physical_to_logical_map`` in force (CPU).
        apply_chunk: ``(target, layer_ids)`` moves those layers' weights to the :class:`Placement`
            ``target`` (drained ranks ``-1``) and commits their metadata (collective: SGLang's update
            entry point with our updater).
        num_logical: ``E``.
        get_load: ``() -> [L, E]`` load of the last rebalance, or None.
        layers_per_step: layers moved per step (serving runs between steps).
        on_progress: called with the progress after every step (the status writer).
        num_ranks: EP ranks of the placement (default: the state's size; SGLang's state may be larger,
            up to ``--max-ep-size``, than the placement in force).
    """

    def __init__(self, state: Any, get_p2l: Callable[[], torch.Tensor],
                 apply_chunk: Callable[[Placement, List[int]], None], num_logical: int, *,
                 get_load: Callable[[], Optional[torch.Tensor]] = lambda: None, layers_per_step: int = 1,
                 on_progress: Callable[[DrainProgress], None] = lambda p: None,
                 num_ranks: Optional[int] = None) -> None:
        self.state, self.get_p2l, self.apply_chunk = state, get_p2l, apply_chunk
        self.num_logical, self.get_load, self.layers_per_step = num_logical, get_load, max(1, layers_per_step)
        self.on_progress = on_progress
        self.num_ranks = int(num_ranks) if num_ranks is not None else state.ep_size
        self.progress: Optional[DrainProgress] = None
        self._target: Optional[Placement] = None
        self._chunks: List[List[int]] = []
        self._steps_done = 0

    def view(self) -> ClusterView:
        p2l = self.get_p2l()
        R = self.num_ranks
        live = tuple(r for r in self.state.live_ranks() if r < R)
        return ClusterView(R, live, p2l.shape[1] // R, self.num_logical, self.state.epoch)

    def step(self, drain_id: str, ranks: Sequence[int], step: int) -> DrainProgress:
        """Run step ``step`` of drain ``drain_id`` (0: plan; 1..n: move a chunk; n+1: mask).

        Steps of a drain must come in order; a repeated step is answered from the progress
        (idempotent); a step of another drain while one runs raises ``DrainError`` 409.
        """
        p = self.progress
        if step == 0:
            if p is not None and p.drain_id == drain_id:
                return p
            if p is not None and p.running:
                raise DrainError(409, f"drain {p.drain_id} of ranks {p.ranks} is running")
            return self._plan(drain_id, list(ranks))
        if p is None or p.drain_id != drain_id:
            raise DrainError(409, f"drain {drain_id} was not planned on this scheduler")
        n = len(self._chunks)
        if step <= self._steps_done or not p.running:
            return p  # already done (a retried request)
        if step != self._steps_done + 1:
            raise DrainError(409, f"drain {drain_id}: step {step} out of order (next is {self._steps_done + 1})")
        self._steps_done = step
        try:
            if step <= n:
                p.phase = "moving"
                layers = self._chunks[step - 1]
                self.apply_chunk(self._target, layers)
                p.layers_done += len(layers)
            else:
                p.phase = "masking"
                self.state.mark_failed(p.ranks, reason=DRAINED_REASON)
                p.phase, p.finished = "done", time.time()
        except Exception as exc:  # reported to the operator through the status; the server keeps serving
            p.phase, p.error, p.finished = "failed", f"{type(exc).__name__}: {exc}", time.time()
            log.exception("[sglang_elastic] drain %s failed at step %d", drain_id, step)
        self.on_progress(p)
        return p

    def _plan(self, drain_id: str, ranks: List[int]) -> DrainProgress:
        p2l = self.get_p2l()
        todo = check_drain(ranks, self.view())
        p = DrainProgress(drain_id, todo)
        self._steps_done = 0
        live = self.state.active_ranks_cpu.numpy().astype(bool)[: self.num_ranks].copy()
        if todo:
            target = plan_drain(p2l, live, todo, self.num_logical, self.get_load())
            tgt, _, _ = target.to_sglang()
            keep = Placement.from_sglang(p2l, self.num_ranks, self.num_logical, live)
            p.moved_slots = int(((target.phy2log != keep.phy2log) & (target.phy2log >= 0)).sum())
            changed = (tgt != p2l).any(1).nonzero().flatten().tolist()
            self._target = target
            self._chunks = [changed[i:i + self.layers_per_step] for i in range(0, len(changed), self.layers_per_step)]
            p.layers_total, p.phase = len(changed), "moving"
        else:
            self._chunks, p.phase, p.finished = [], "done", time.time()
        self.progress = p
        self.on_progress(p)
        log.info("[sglang_elastic] drain %s of ranks %s: %d layers to move, %d slots change", drain_id, todo,
                 p.layers_total, p.moved_slots)
        return p

    @property
    def steps(self) -> int:
        """Steps after the plan: one per chunk, and the mask."""
        return len(self._chunks) + 1


class DrainEngine(Protocol):
    """What the HTTP side drives: the schedulers, all together (SGLang: an RPC to every scheduler)."""

    def view(self) -> ClusterView: ...

    def step(self, drain_id: str, ranks: List[int], step: int) -> DrainProgress: ...


class DrainController:
    """The HTTP side: one drain at a time, run on a worker thread, progress on request.

    Args:
        engine: the schedulers.
        pause_s: pause between steps (serving continues meanwhile; SGLang serves between RPCs anyway).
    """

    def __init__(self, engine: DrainEngine, pause_s: float = 0.0) -> None:
        self.engine, self.pause_s = engine, pause_s
        self._lock = threading.Lock()
        self._job: Optional[DrainProgress] = None
        self._thread: Optional[threading.Thread] = None
        self.drained: List[int] = []

    def request(self, body: Any) -> Tuple[int, Dict[str, Any]]:
        """Answer ``POST /elastic_ep/drain``: ``(status, payload)``. 202: started (or the same drain is
        running); 200: nothing left to drain (idempotent); 4xx: refused, with ``error``."""
        try:
            ranks = parse_drain_request(body)
            with self._lock:
                job = self._job
                if job is not None and job.running:
                    if ranks == job.ranks:
                        return 202, dict(message="this drain is running", **job.as_dict())
                    raise DrainError(409, f"a drain of ranks {job.ranks} is running; wait for it to finish")
                todo = check_drain(ranks, self.engine.view())
                if not todo:
                    return 200, dict(message=f"ranks {ranks} are not live: nothing to drain",
                                     drained=sorted(self.drained))
                self._job = DrainProgress(uuid.uuid4().hex[:12], todo)
                self._thread = threading.Thread(target=self._run, args=(self._job,), name="sglang-elastic-drain",
                                                daemon=True)
                self._thread.start()
                return 202, dict(message="drain started", **self._job.as_dict())
        except DrainError as exc:
            return exc.status, dict(error=exc.message)

    def status(self) -> Dict[str, Any]:
        """Answer ``GET /elastic_ep/status``: the cluster view and the last drain's progress."""
        view = self.engine.view()
        with self._lock:
            job = self._job.as_dict() if self._job is not None else None
        return dict(ep_size=view.ep_size, live_ranks=list(view.live), epoch=view.epoch,
                    slots_per_rank=view.slots_per_rank, num_logical_experts=view.num_logical,
                    drained_ranks=sorted(self.drained), drain=job)

    def wait(self, timeout: float) -> Optional[DrainProgress]:
        """Join the running drain (tests, tools); returns its progress."""
        t = self._thread
        if t is not None:
            t.join(timeout)
        return self._job

    def _run(self, job: DrainProgress) -> None:
        step = 0
        try:
            while True:
                got = self.engine.step(job.drain_id, job.ranks, step)
                self._update(job, got)
                if not got.running:
                    break
                step += 1
                if self.pause_s:
                    time.sleep(self.pause_s)
        except Exception as exc:  # the worker must always leave a final state for the status route
            self._update(job, None, error=f"{type(exc).__name__}: {exc}")
            log.exception("[sglang_elastic] drain %s failed", job.drain_id)

    def _update(self, job: DrainProgress, got: Optional[DrainProgress], error: Optional[str] = None) -> None:
        with self._lock:
            if got is not None:
                for k in ("phase", "layers_total", "layers_done", "moved_slots", "error", "finished"):
                    setattr(job, k, getattr(got, k))
            if error is not None:
                job.phase, job.error, job.finished = "failed", error, time.time()
            if job.phase == "done":
                self.drained = sorted(set(self.drained) | set(job.ranks))
