"""Where a rehearsal's events come from: the config's scenario, or the soak's random generator
(:class:`~.soak.SoakEvents`)."""
from __future__ import annotations

from typing import List

from .config import Event, RehearsalConfig
from .tracking import RunState

__all__ = ["EventSource", "ScenarioEvents"]


class EventSource:
    """Where a run's events come from: :class:`ScenarioEvents`, or the soak's random generator."""

    def events(self, step: int, st: RunState) -> List[Event]:
        raise NotImplementedError

    def finished(self, step: int, st: RunState) -> bool:
        raise NotImplementedError


class ScenarioEvents(EventSource):
    """The config's scenario: its events at their steps, ``steps`` steps."""

    def __init__(self, cfg: RehearsalConfig) -> None:
        self.scenario = cfg.scenario

    def events(self, step: int, st: RunState) -> List[Event]:
        return self.scenario.at(step)

    def finished(self, step: int, st: RunState) -> bool:
        return step >= self.scenario.steps
