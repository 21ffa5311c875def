"""Rehearsal configuration and scenarios (YAML), validated before any process starts.

A config file has three sections::

    model:    {layers: 4, experts: 32, top_k: 4, hidden: 256, ffn: 256, skew: 1.0, seed: 0}
    cluster:  {ranks: 4, max_ranks: 4, slots_per_rank: 12, tokens_per_rank: 32, transport: torch,
               timeout_s: 2.0, heartbeat_timeout_s: 2.0, layers_per_chunk: 1, policy: renormalize,
               recovery: elastic, ranks_per_node: 0}
    scenario: {steps: 40, events: [{step: 4, action: rebalance}, {step: 10, action: kill, rank: 2}, ...]}

Actions: ``rebalance`` (from the load recorded since the last one), ``kill`` (SIGKILL),
``freeze`` (SIGSTOP; found by heartbeats), ``join`` (a fresh process takes a dead or unused rank id
and receives experts from peers), ``leave`` (planned scale-down: the rank is drained by a rebalance
without it, then leaves). A kill or freeze lands at ``phase`` (default ``dispatch``; see
:data:`~sglang_elastic.rehearsal.protocol.FAULT_PHASES` and docs/rehearsal.md) and, for the serving
phases, at MoE ``layer`` (default 1). ``node: N`` instead of ``rank`` kills/freezes every rank of
node N (``cluster.ranks_per_node``). Every event of a step is played. A scenario file given with
``--scenario`` holds just the ``scenario`` section (``steps`` and ``events``).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import yaml

from .protocol import FAULT_PHASES

__all__ = ["ModelConfig", "ClusterConfig", "Event", "Scenario", "RehearsalConfig", "ConfigError",
           "ACTIONS", "TRANSPORTS", "DEFAULT_CONFIG", "SCENARIO_DIR", "load_config", "read_yaml"]

ACTIONS = ("rebalance", "kill", "freeze", "join", "leave")
FAULTS = ("kill", "freeze")
TRANSPORTS = ("torch", "nixl", "mooncake")
RECOVERY = ("elastic", "stop_the_world")
DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "rehearsal_default.yaml"
SCENARIO_DIR = DEFAULT_CONFIG.parent / "scenarios"
# Per-process memory the model may take (expert weights + the reference's copy): far beyond what a
# rehearsal needs, far below what would take the machine down.
MAX_PROCESS_BYTES = 4 << 30
LIMITS = dict(layers=256, experts=4096, top_k=64, hidden=65536, ffn=65536, ranks=64, max_ranks=64,
              slots_per_rank=4096, tokens_per_rank=65536, layers_per_chunk=256, max_retries=100,
              ranks_per_node=64, steps=1_000_000)
MAX_SECONDS = 3600.0


class ConfigError(ValueError):
    """A rehearsal config or scenario is invalid (one line, said before anything starts)."""


@dataclass(frozen=True)
class ModelConfig:
    """The small MoE model: ``layers`` MoE layers of ``experts`` SiLU MLPs (``hidden`` -> ``ffn`` -> ``hidden``)
    with top-``top_k`` routing; ``skew`` is the sigma of the lognormal expert popularity in the router."""

    layers: int = 4
    experts: int = 32
    top_k: int = 4
    hidden: int = 256
    ffn: int = 256
    skew: float = 1.0
    seed: int = 0


@dataclass(frozen=True)
class ClusterConfig:
    """The EP cluster on 127.0.0.1 and how it recovers."""

    ranks: int = 4
    max_ranks: int = 0                 # 0: same as ranks
    slots_per_rank: int = 12
    tokens_per_rank: int = 32
    transport: str = "torch"
    timeout_s: float = 2.0
    heartbeat_timeout_s: float = 2.0
    layers_per_chunk: int = 1
    policy: str = "renormalize"
    recovery: str = "elastic"          # or stop_the_world (upstream-style, for the benchmark)
    rebalance_after_failure: bool = True
    max_retries: int = 5
    ranks_per_node: int = 0            # 0: one node; else node n holds ranks [n*k, (n+1)*k)

    @property
    def capacity(self) -> int:
        return self.max_ranks or self.ranks

    @property
    def node_size(self) -> Optional[int]:
        """``ranks_per_node`` for the planners (None: a single node)."""
        return self.ranks_per_node or None


@dataclass(frozen=True)
class Event:
    """One scripted event: ``action`` at ``step`` (on ``rank`` where the action needs one); faults
    land at ``phase`` (and MoE ``layer`` for the serving phases)."""

    step: int
    action: str
    rank: Optional[int] = None
    phase: Optional[str] = None
    layer: int = 1

    def label(self) -> str:
        """How the report names it: ``kill 2 @combine``."""
        who = "" if self.rank is None else f" {self.rank}"
        where = f" @{self.phase}" if self.phase else ""
        return f"{self.action}{who}{where}"


@dataclass(frozen=True)
class Scenario:
    steps: int = 40
    events: tuple = ()

    def at(self, step: int) -> List[Event]:
        return [e for e in self.events if e.step == step]


@dataclass(frozen=True)
class RehearsalConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    scenario: Scenario = field(default_factory=Scenario)

    def to_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        d["scenario"]["events"] = [_event_dict(e) for e in self.scenario.events]
        return d

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "RehearsalConfig":
        """Build and validate (raises :class:`ConfigError` with one line saying what is wrong)."""
        if not isinstance(d, dict):
            raise ConfigError("a rehearsal config must be a mapping with model/cluster/scenario sections")
        unknown = set(d) - {"model", "cluster", "scenario"}
        if unknown:
            raise ConfigError(f"unknown config section(s): {', '.join(sorted(map(str, unknown)))}")
        model = _section(ModelConfig, d.get("model") or {}, "model")
        cluster = _section(ClusterConfig, d.get("cluster") or {}, "cluster")
        scenario = parse_scenario(d.get("scenario") or {}, cluster.ranks_per_node)
        cfg = cls(model, cluster, scenario)
        validate(cfg)
        return cfg


def _event_dict(e: Event) -> Dict[str, Any]:
    d: Dict[str, Any] = {"step": e.step, "action": e.action}
    if e.rank is not None:
        d["rank"] = e.rank
    if e.phase is not None:
        d["phase"] = e.phase
        d["layer"] = e.layer
    return d


def _section(cls, raw: Any, name: str):
    if not isinstance(raw, dict):
        raise ConfigError(f"section {name!r} must be a mapping, got {type(raw).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(raw) - set(fields)
    if unknown:
        raise ConfigError(f"unknown key(s) in {name}: {', '.join(sorted(map(str, unknown)))}")
    out = {}
    for k, v in raw.items():
        want = type(getattr(cls(), k))
        if want is float and isinstance(v, int) and not isinstance(v, bool):
            v = float(v)
        if not isinstance(v, want) or (want is int and isinstance(v, bool)):
            raise ConfigError(f"{name}.{k} must be {want.__name__}, got {v!r}")
        if want is float and not math.isfinite(v):
            raise ConfigError(f"{name}.{k} must be a finite number, got {v!r}")
        if want is int and k in LIMITS and v > LIMITS[k]:
            raise ConfigError(f"{name}.{k} = {v} is absurd for a local rehearsal (at most {LIMITS[k]})")
        if want is float and k.endswith("_s") and v > MAX_SECONDS:
            raise ConfigError(f"{name}.{k} = {v:g} s is absurd for a local rehearsal (at most {MAX_SECONDS:g} s)")
        out[k] = v
    return cls(**out)


def _int(ev: Dict[str, Any], key: str, i: int, lo: int = 0, hi: Optional[int] = None) -> int:
    v = ev.get(key)
    if not isinstance(v, int) or isinstance(v, bool) or v < lo or (hi is not None and v >= hi):
        rng = f"in [{lo}, {hi})" if hi is not None else f">= {lo}"
        raise ConfigError(f"scenario event #{i + 1}: {key} must be an integer {rng}, got {v!r}")
    return v


def parse_scenario(raw: Any, ranks_per_node: int = 0) -> Scenario:
    """Parse a ``scenario`` mapping (``steps``, ``events``) into a :class:`Scenario` (``node: N``
    events are expanded to one event per rank of node N)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"a scenario must be a mapping with 'steps' and 'events', got {type(raw).__name__}")
    unknown = set(raw) - {"steps", "events"}
    if unknown:
        raise ConfigError(f"unknown key(s) in scenario: {', '.join(sorted(map(str, unknown)))}")
    steps = raw.get("steps", 40)
    if not isinstance(steps, int) or isinstance(steps, bool) or not 1 <= steps <= LIMITS["steps"]:
        raise ConfigError(f"scenario.steps must be an integer in [1, {LIMITS['steps']}], got {steps!r}")
    evs = raw.get("events") or []
    if not isinstance(evs, list):
        raise ConfigError(f"scenario.events must be a list of events, got {type(evs).__name__}")
    events: List[Event] = []
    for i, ev in enumerate(evs):
        if not isinstance(ev, dict):
            raise ConfigError(f"scenario event #{i + 1} must be a mapping like {{step: 10, action: kill, rank: 2}}")
        bad = set(ev) - {"step", "action", "rank", "node", "phase", "layer"}
        if bad:
            raise ConfigError(f"scenario event #{i + 1}: unknown key(s) {', '.join(sorted(map(str, bad)))}")
        step = _int(ev, "step", i, 0, steps)
        action = ev.get("action")
        if action not in ACTIONS:
            raise ConfigError(f"scenario event #{i + 1}: unknown action {action!r}; choose one of {', '.join(ACTIONS)}")
        phase, layer = ev.get("phase"), ev.get("layer")
        if action not in FAULTS and (phase is not None or layer is not None):
            raise ConfigError(f"scenario event #{i + 1}: {action} takes no phase or layer (only kill and freeze do)")
        if action in FAULTS:
            phase = "dispatch" if phase is None else phase
            if phase not in FAULT_PHASES:
                raise ConfigError(f"scenario event #{i + 1}: unknown phase {phase!r}; choose one of "
                                  f"{', '.join(FAULT_PHASES)}")
            layer = 1 if layer is None else _int(ev, "layer", i)
        if action == "rebalance":
            if "rank" in ev or "node" in ev:
                raise ConfigError(f"scenario event #{i + 1}: rebalance takes no rank")
            events.append(Event(step, action))
            continue
        if "node" in ev:
            if action not in FAULTS or "rank" in ev:
                raise ConfigError(f"scenario event #{i + 1}: node: N goes with kill or freeze, instead of rank")
            if not ranks_per_node:
                raise ConfigError(f"scenario event #{i + 1}: node: N needs cluster.ranks_per_node")
            node = _int(ev, "node", i)
            events += [Event(step, action, r, phase, layer)
                       for r in range(node * ranks_per_node, (node + 1) * ranks_per_node)]
            continue
        rank = ev.get("rank")
        if not isinstance(rank, int) or isinstance(rank, bool) or rank < 0:
            raise ConfigError(f"scenario event #{i + 1}: {action} needs a rank (a non-negative integer), got {rank!r}")
        events.append(Event(step, action, rank, phase, layer if action in FAULTS else 1))
    return Scenario(steps, tuple(sorted(events, key=lambda e: e.step)))


def validate(cfg: RehearsalConfig) -> None:
    """Check the whole config, including a dry run of the scenario's live sets."""
    m, c = cfg.model, cfg.cluster
    for name in ("layers", "experts", "top_k", "hidden", "ffn"):
        if getattr(m, name) < 1:
            raise ConfigError(f"model.{name} must be >= 1, got {getattr(m, name)}")
    if m.top_k > m.experts:
        raise ConfigError(f"model.top_k ({m.top_k}) exceeds model.experts ({m.experts})")
    if c.transport not in TRANSPORTS:
        raise ConfigError(f"unknown transport {c.transport!r}; choose one of {', '.join(TRANSPORTS)}")
    if c.recovery not in RECOVERY:
        raise ConfigError(f"unknown recovery {c.recovery!r}; choose one of {', '.join(RECOVERY)}")
    if c.policy not in ("renormalize", "reroute"):
        raise ConfigError(f"unknown degraded-token policy {c.policy!r}; choose renormalize or reroute")
    if c.ranks < 1 or c.capacity < c.ranks:
        raise ConfigError(f"cluster.ranks must be >= 1 and <= max_ranks, got ranks={c.ranks} max_ranks={c.capacity}")
    for name in ("slots_per_rank", "tokens_per_rank", "layers_per_chunk", "max_retries"):
        if getattr(c, name) < 1:
            raise ConfigError(f"cluster.{name} must be >= 1, got {getattr(c, name)}")
    for name in ("timeout_s", "heartbeat_timeout_s"):
        if getattr(c, name) <= 0:
            raise ConfigError(f"cluster.{name} must be > 0, got {getattr(c, name)}")
    if c.ranks_per_node < 0:
        raise ConfigError(f"cluster.ranks_per_node must be >= 0, got {c.ranks_per_node}")
    # Each rank process holds its slots' weights, the reference's copy of every expert and backups.
    expert = 2 * m.hidden * m.ffn * 4
    need = m.layers * (2 * c.slots_per_rank + m.experts) * expert
    if need > MAX_PROCESS_BYTES:
        raise ConfigError(f"model too large for a local rehearsal: each rank process would need ~{need / 2**30:.1f} "
                          f"GiB for {m.layers} layers x {m.experts} experts of {m.hidden}x{m.ffn} "
                          f"(at most {MAX_PROCESS_BYTES >> 30} GiB)")
    _dry_run(cfg)


def _dry_run(cfg: RehearsalConfig) -> None:
    """Play the scenario's live sets: every step keeps enough live slots, events name sensible ranks."""
    m, c, s = cfg.model, cfg.cluster, cfg.scenario
    live = set(range(c.ranks))
    need = m.experts
    if len(live) * c.slots_per_rank < need:
        raise ConfigError(f"{len(live)} ranks x {c.slots_per_rank} slots = {len(live) * c.slots_per_rank} live slots "
                          f"< {need} experts")
    for ev in s.events:
        if ev.rank is not None and ev.rank >= c.capacity:
            raise ConfigError(f"step {ev.step}: {ev.action} names rank {ev.rank}, but rank ids are 0..{c.capacity - 1} "
                              f"(raise cluster.max_ranks to scale up)")
        if ev.phase is not None and ev.layer >= m.layers:
            raise ConfigError(f"step {ev.step}: {ev.label()} at layer {ev.layer}, but the model has {m.layers} layers")
    for step in sorted({e.step for e in s.events}):
        evs = s.at(step)
        seen: Dict[int, str] = {}
        for ev in evs:
            if ev.rank is None:
                continue
            if ev.rank in seen:
                raise ConfigError(f"step {step}: rank {ev.rank} has two events ({seen[ev.rank]} and {ev.action}); "
                                  f"put them in different steps")
            seen[ev.rank] = ev.action
        # Joins are played before the step's faults, so the live set is checked in that order.
        for ev in sorted(evs, key=lambda e: e.action != "join"):
            if ev.action in ("kill", "freeze", "leave"):
                if ev.rank not in live:
                    raise ConfigError(f"step {step}: {ev.action} rank {ev.rank}, which is not live then")
                live.discard(ev.rank)
                if not live:
                    raise ConfigError(f"step {step}: {ev.action} rank {ev.rank} leaves no live rank")
                if len(live) * c.slots_per_rank < need:
                    raise ConfigError(f"step {step}: after {ev.action} rank {ev.rank}, {len(live)} ranks x "
                                      f"{c.slots_per_rank} slots = {len(live) * c.slots_per_rank} live slots "
                                      f"< {need} experts")
            elif ev.action == "join":
                if ev.rank in live:
                    raise ConfigError(f"step {step}: join rank {ev.rank}, which is already live")
                live.add(ev.rank)


def load_config(path: Optional[Path] = None, *, scenario: Optional[Path] = None,
                overrides: Optional[Dict[str, Any]] = None) -> RehearsalConfig:
    """Read a config YAML (default ``configs/rehearsal_default.yaml``), optionally replace its scenario
    with a scenario YAML and apply ``cluster`` overrides (e.g. ``{"ranks": 3}``; ``None`` values are
    ignored). A file may be a whole config or, for ``scenario``, just the scenario section."""
    path = Path(path) if path else DEFAULT_CONFIG
    d = read_yaml(path, "config")
    if scenario is not None:
        sc = read_yaml(Path(scenario), "scenario")
        d["scenario"] = sc.get("scenario", sc)
    if overrides:
        d.setdefault("cluster", {})
        d["cluster"] = dict(d["cluster"] or {}, **{k: v for k, v in overrides.items() if v is not None})
    return RehearsalConfig.from_dict(d)


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a mapping with the same key twice (YAML says keys are unique; PyYAML
    silently keeps the last one, so ``steps: 10`` ... ``steps: 40`` would run 40 steps)."""


def _construct_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False) -> Dict[Any, Any]:
    loader.flatten_mapping(node)
    seen: Dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise ConfigError(f"duplicate key {key!r} (lines {seen[key] + 1} and {key_node.start_mark.line + 1})")
        seen[key] = key_node.start_mark.line
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def read_yaml(path: Path, what: str) -> Dict[str, Any]:
    """A YAML mapping from ``path``; :class:`ConfigError` naming the file for anything else (missing,
    a folder, binary or not UTF-8, invalid YAML, duplicate keys, empty, not a mapping)."""
    try:
        raw = path.read_bytes()
    except IsADirectoryError:
        raise ConfigError(f"{what} file {path} is a folder, not a YAML file") from None
    except OSError as exc:
        raise ConfigError(f"cannot read {what} file {path}: {exc.strerror or exc}") from None
    if b"\0" in raw:
        raise ConfigError(f"{what} file {path} is binary, not a YAML text file")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{what} file {path} is not UTF-8 text (byte {exc.start}); save it as UTF-8") from None
    try:
        d = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except ConfigError as exc:
        raise ConfigError(f"{what} file {path}: {exc}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{what} file {path} is not valid YAML{where}: {problem}") from None
    if d is None:
        raise ConfigError(f"{what} file {path} is empty")
    if not isinstance(d, dict):
        raise ConfigError(f"{what} file {path} must hold a mapping, got {type(d).__name__}")
    return d
