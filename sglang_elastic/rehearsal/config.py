"""Rehearsal configuration and scenarios (YAML), validated before any process starts.

A config file has three sections::

    model:    {layers: 4, experts: 32, top_k: 4, hidden: 256, ffn: 256, skew: 1.0, seed: 0}
    cluster:  {ranks: 4, max_ranks: 4, slots_per_rank: 12, tokens_per_rank: 32, transport: torch,
               timeout_s: 2.0, heartbeat_timeout_s: 2.0, layers_per_chunk: 1, policy: renormalize,
               recovery: elastic}
    scenario: {steps: 40, events: [{step: 4, action: rebalance}, {step: 10, action: kill, rank: 2}, ...]}

Actions: ``rebalance`` (from the load recorded since the last one), ``kill`` (SIGKILL in the middle
of the step's forward pass), ``freeze`` (SIGSTOP in the middle of the step; found by heartbeats),
``join`` (a fresh process takes a dead or unused rank id and receives experts from peers), ``leave``
(planned scale-down: the rank is drained by a rebalance without it, then leaves). A scenario file
given with ``--scenario`` holds just the ``scenario`` section (``steps`` and ``events``).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import yaml

__all__ = ["ModelConfig", "ClusterConfig", "Event", "Scenario", "RehearsalConfig", "ConfigError",
           "ACTIONS", "TRANSPORTS", "DEFAULT_CONFIG", "load_config"]

ACTIONS = ("rebalance", "kill", "freeze", "join", "leave")
TRANSPORTS = ("torch", "nixl", "mooncake")
RECOVERY = ("elastic", "stop_the_world")
DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "rehearsal_default.yaml"


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

    @property
    def capacity(self) -> int:
        return self.max_ranks or self.ranks


@dataclass(frozen=True)
class Event:
    """One scripted event: ``action`` at ``step`` (on ``rank`` where the action needs one)."""

    step: int
    action: str
    rank: Optional[int] = None


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
        d["scenario"]["events"] = [dataclasses.asdict(e) for e in self.scenario.events]
        return d

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "RehearsalConfig":
        """Build and validate (raises :class:`ConfigError` with one line saying what is wrong)."""
        if not isinstance(d, dict):
            raise ConfigError("a rehearsal config must be a mapping with model/cluster/scenario sections")
        unknown = set(d) - {"model", "cluster", "scenario"}
        if unknown:
            raise ConfigError(f"unknown config section(s): {', '.join(sorted(unknown))}")
        model = _section(ModelConfig, d.get("model") or {}, "model")
        cluster = _section(ClusterConfig, d.get("cluster") or {}, "cluster")
        scenario = parse_scenario(d.get("scenario") or {})
        cfg = cls(model, cluster, scenario)
        validate(cfg)
        return cfg


def _section(cls, raw: Any, name: str):
    if not isinstance(raw, dict):
        raise ConfigError(f"section {name!r} must be a mapping, got {type(raw).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(raw) - set(fields)
    if unknown:
        raise ConfigError(f"unknown key(s) in {name}: {', '.join(sorted(unknown))}")
    out = {}
    for k, v in raw.items():
        want = type(getattr(cls(), k))
        if want is float and isinstance(v, int) and not isinstance(v, bool):
            v = float(v)
        if not isinstance(v, want) or (want is int and isinstance(v, bool)):
            raise ConfigError(f"{name}.{k} must be {want.__name__}, got {v!r}")
        out[k] = v
    return cls(**out)


def parse_scenario(raw: Any) -> Scenario:
    """Parse a ``scenario`` mapping (``steps``, ``events``) into a :class:`Scenario`."""
    if not isinstance(raw, dict):
        raise ConfigError(f"a scenario must be a mapping with 'steps' and 'events', got {type(raw).__name__}")
    unknown = set(raw) - {"steps", "events"}
    if unknown:
        raise ConfigError(f"unknown key(s) in scenario: {', '.join(sorted(unknown))}")
    steps = raw.get("steps", 40)
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ConfigError(f"scenario.steps must be a positive integer, got {steps!r}")
    events = []
    for i, ev in enumerate(raw.get("events") or []):
        if not isinstance(ev, dict):
            raise ConfigError(f"scenario event #{i + 1} must be a mapping like {{step: 10, action: kill, rank: 2}}")
        bad = set(ev) - {"step", "action", "rank"}
        if bad:
            raise ConfigError(f"scenario event #{i + 1}: unknown key(s) {', '.join(sorted(bad))}")
        step, action, rank = ev.get("step"), ev.get("action"), ev.get("rank")
        if not isinstance(step, int) or isinstance(step, bool) or not 0 <= step < steps:
            raise ConfigError(f"scenario event #{i + 1}: step must be an integer in [0, {steps}), got {step!r}")
        if action not in ACTIONS:
            raise ConfigError(f"scenario event #{i + 1}: unknown action {action!r}; choose one of {', '.join(ACTIONS)}")
        if action == "rebalance":
            if rank is not None:
                raise ConfigError(f"scenario event #{i + 1}: rebalance takes no rank")
        elif not isinstance(rank, int) or isinstance(rank, bool) or rank < 0:
            raise ConfigError(f"scenario event #{i + 1}: {action} needs a rank (a non-negative integer), got {rank!r}")
        events.append(Event(step, action, rank))
    return Scenario(steps, tuple(sorted(events, key=lambda e: e.step)))


def validate(cfg: RehearsalConfig) -> None:
    """Check the whole config, including a dry run of the scenario's live sets."""
    m, c, s = cfg.model, cfg.cluster, cfg.scenario
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
    live = set(range(c.ranks))
    need = m.experts
    if len(live) * c.slots_per_rank < need:
        raise ConfigError(f"{len(live)} ranks x {c.slots_per_rank} slots = {len(live) * c.slots_per_rank} live slots "
                          f"< {need} experts")
    for ev in s.events:
        if ev.rank is not None and ev.rank >= c.capacity:
            raise ConfigError(f"step {ev.step}: {ev.action} names rank {ev.rank}, but rank ids are 0..{c.capacity - 1} "
                              f"(raise cluster.max_ranks to scale up)")
        if ev.action in ("kill", "freeze", "leave"):
            if ev.rank not in live:
                raise ConfigError(f"step {ev.step}: {ev.action} rank {ev.rank}, which is not live then")
            live.discard(ev.rank)
            if not live:
                raise ConfigError(f"step {ev.step}: {ev.action} rank {ev.rank} leaves no live rank")
            if len(live) * c.slots_per_rank < need:
                raise ConfigError(f"step {ev.step}: after {ev.action} rank {ev.rank}, {len(live)} ranks x "
                                  f"{c.slots_per_rank} slots = {len(live) * c.slots_per_rank} live slots < {need} experts")
        elif ev.action == "join":
            if ev.rank in live:
                raise ConfigError(f"step {ev.step}: join rank {ev.rank}, which is already live")
            live.add(ev.rank)


def load_config(path: Optional[Path] = None, *, scenario: Optional[Path] = None,
                overrides: Optional[Dict[str, Any]] = None) -> RehearsalConfig:
    """Read a config YAML (default ``configs/rehearsal_default.yaml``), optionally replace its scenario
    with a scenario YAML and apply ``cluster`` overrides (e.g. ``{"ranks": 3}``)."""
    path = Path(path) if path else DEFAULT_CONFIG
    d = _read_yaml(path, "config")
    if scenario is not None:
        sc = _read_yaml(Path(scenario), "scenario")
        d["scenario"] = sc.get("scenario", sc) if isinstance(sc, dict) else sc
    if overrides:
        d.setdefault("cluster", {})
        d["cluster"] = dict(d["cluster"] or {}, **{k: v for k, v in overrides.items() if v is not None})
    return RehearsalConfig.from_dict(d)


def _read_yaml(path: Path, what: str) -> Any:
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read {what} file {path}: {exc.strerror or exc}") from None
    try:
        d = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise ConfigError(f"{what} file {path} is not valid YAML{where}: {getattr(exc, 'problem', exc)}") from None
    if d is None:
        raise ConfigError(f"{what} file {path} is empty")
    if not isinstance(d, dict):
        raise ConfigError(f"{what} file {path} must hold a mapping, got {type(d).__name__}")
    return d
