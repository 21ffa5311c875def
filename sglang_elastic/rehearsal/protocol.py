"""The orchestrator <-> rank protocol: every store key and every message, typed, in one place.

The orchestrator and the rank processes talk only through the membership server's store (a
``TCPStore`` on 127.0.0.1 that no rank hosts), in lockstep:

========================  =========  ===============================================================
key                       writer     value
========================  =========  ===============================================================
``init``                  orch.      :class:`InitInfo` (start-up live set, placement version, log)
``placement/<v>``         orch.      placement ``v`` (``phy2log`` as a JSON list)
``load/<v>``              orch.      the recorded load a placement ``v`` was planned from
``placement/committed``   orch.      the version every rank has committed
``ready/<rank>``          rank       its membership incarnation, once its stack is up
``start/<rank>/<inc>``    orch.      the first step a joiner serves
``plan/<step>``           orch.      :class:`StepPlan`
``served/<step>/<rank>``  rank       :class:`Served`: its passes, as soon as it served them (before
                                     moving weights: a death then loses no served request)
``res/<step>/<rank>``     rank       :class:`StepResult`
``fault/<rank>/<inc>``    rank       :class:`FaultFired`, written just before it kills/freezes itself
``error/<rank>``          rank       the traceback of a crash
========================  =========  ===============================================================

Messages are frozen dataclasses with ``to_json`` / ``from_json``; nothing else crosses the store.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Type, TypeVar

__all__ = ["Keys", "InitInfo", "FaultSpec", "FaultFired", "StepPlan", "PassResult", "UpdateFigures",
           "Health", "StepResult", "Served", "FAULT_PHASES", "SERVING_PHASES", "UPDATE_PHASES"]

# Where a scripted kill or freeze lands (see docs/rehearsal.md, "Event phases").
SERVING_PHASES = ("dispatch", "combine")
UPDATE_PHASES = ("transfer", "vote", "rehome", "fill")
FAULT_PHASES = SERVING_PHASES + UPDATE_PHASES + ("between",)

M = TypeVar("M", bound="_Message")


class Keys:
    """Store keys (the table in the module docstring)."""

    INIT = "init"
    COMMITTED = "placement/committed"

    @staticmethod
    def placement(version: int) -> str:
        return f"placement/{version}"

    @staticmethod
    def load(version: int) -> str:
        return f"load/{version}"

    @staticmethod
    def ready(rank: int) -> str:
        return f"ready/{rank}"

    @staticmethod
    def start(rank: int, incarnation: int) -> str:
        return f"start/{rank}/{incarnation}"

    @staticmethod
    def plan(step: int) -> str:
        return f"plan/{step}"

    @staticmethod
    def result(step: int, rank: int) -> str:
        return f"res/{step}/{rank}"

    @staticmethod
    def served(step: int, rank: int) -> str:
        return f"served/{step}/{rank}"

    @staticmethod
    def fault(rank: int, incarnation: int) -> str:
        return f"fault/{rank}/{incarnation}"

    @staticmethod
    def error(rank: int) -> str:
        return f"error/{rank}"


class _Message:
    """JSON round trip for the dataclasses below (nested messages are rebuilt by their field type)."""

    _nested: Dict[str, Type["_Message"]] = {}
    _nested_lists: Dict[str, Type["_Message"]] = {}

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_dict(cls: Type[M], d: Dict[str, Any]) -> M:
        kw = dict(d)
        for name, sub in cls._nested.items():
            if kw.get(name) is not None:
                kw[name] = sub.from_dict(kw[name])
        for name, sub in cls._nested_lists.items():
            kw[name] = [sub.from_dict(x) for x in kw.get(name) or []]
        return cls(**kw)  # type: ignore[call-arg]

    @classmethod
    def from_json(cls: Type[M], raw: Any) -> M:
        return cls.from_dict(json.loads(raw))


@dataclass(frozen=True)
class InitInfo(_Message):
    """What every rank reads at start-up."""

    live: List[int]
    placement: int                  # version of the start-up placement
    log_path: Optional[str] = None  # where the rank sends its fd 1 and 2 (library log lines)


@dataclass(frozen=True)
class FaultSpec(_Message):
    """A scripted fault armed on ``rank``: ``action`` (kill or freeze) lands when the rank reaches
    ``phase`` (see :data:`FAULT_PHASES`; for serving phases, at MoE layer ``layer`` of the step's first
    forward pass). An armed fault stays armed until the rank reaches that point."""

    rank: int
    action: str
    phase: str = "dispatch"
    layer: int = 1
    step: int = 0                   # the step that armed it


@dataclass(frozen=True)
class FaultFired(_Message):
    """Written by a rank just before its scripted fault lands (the start of the interruption)."""

    rank: int
    incarnation: int
    action: str
    phase: str
    step: int                       # the step in which it landed
    armed_step: int
    t: float                        # wall clock (time.time())


@dataclass(frozen=True)
class StepPlan(_Message):
    """One step, published by the orchestrator as ``plan/<step>``."""

    step: int
    live: List[int] = field(default_factory=list)
    epoch: int = 0
    batches: Dict[str, List[int]] = field(default_factory=dict)  # str(rank) -> batch ids (JSON keys)
    passes: int = 0
    batches_per_pass: int = 1
    target: Optional[int] = None    # placement version to start moving to
    update_all: bool = False        # stop-the-world: the whole update before serving
    leave: List[int] = field(default_factory=list)   # drained ranks that leave now
    draining: List[int] = field(default_factory=list)  # ranks being drained (never re-planned onto)
    faults: List[FaultSpec] = field(default_factory=list)
    stop: bool = False
    # Ranks some rank gave up on (masked) that membership kept: every rank re-admits them and
    # rebuilds its dispatcher connections at this plan (collective), see Rank.adopt_serving_membership.
    readmit: List[int] = field(default_factory=list)

    _nested_lists = {"faults": FaultSpec}

    def batches_of(self, rank: int) -> List[int]:
        return self.batches.get(str(rank), [])


@dataclass(frozen=True)
class PassResult(_Message):
    """One request batch of one forward pass."""

    batch: int
    tokens: int
    ok: bool                        # False: it lost pairs to a failing peer and is served again
    lost_pairs: int
    latency: float
    t_done: float
    mismatch: int = 0
    degraded: int = 0
    degraded_mismatch: int = 0


@dataclass
class UpdateFigures(_Message):
    """What the layerwise updater did in one step on one rank."""

    layers: List[int] = field(default_factory=list)
    bytes: int = 0
    restored: int = 0
    remote: int = 0

    def add(self, rep: Any) -> None:
        """Accumulate a :class:`~sglang_elastic.location.updater.ChunkReport`."""
        self.layers += list(rep.layers)
        self.bytes += int(rep.bytes_moved)
        self.restored += int(rep.restored)
        self.remote += int(rep.copies_remote)


@dataclass(frozen=True)
class Health(_Message):
    """A rank process's resources (the soak's leak check; read by the orchestrator from /proc)."""

    fds: int
    threads: int
    rss_mb: float


@dataclass(frozen=True)
class StepResult(_Message):
    """One rank's answer for one step (``res/<step>/<rank>``)."""

    rank: int
    step: int
    passes: List[PassResult]
    load: List[List[float]]
    t_start: float
    t_served: float
    t_end: float
    update: UpdateFigures
    update_pause: float
    update_done: bool
    placement: Optional[List[List[int]]]
    dead_seen: List[int] = field(default_factory=list)
    suspects: List[int] = field(default_factory=list)        # live in the plan, given up on here
    degraded: Dict[str, int] = field(default_factory=dict)   # degraded mode -> count (this step)
    recoveries: Dict[str, int] = field(default_factory=dict)  # collectives re-planned after a death

    _nested = {"update": UpdateFigures}
    _nested_lists = {"passes": PassResult}


@dataclass(frozen=True)
class Served(_Message):
    """A rank's passes of one step (``served/<step>/<rank>``), written when serving ends: the
    orchestrator counts them even when the rank dies later in the step (moving weights)."""

    rank: int
    step: int
    passes: List[PassResult]

    _nested_lists = {"passes": PassResult}
