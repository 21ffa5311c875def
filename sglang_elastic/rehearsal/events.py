"""Where a rehearsal's events come from: the config's scenario, or the soak's random generator
(:class:`~.soak.SoakEvents`)."""
from __future__ import annotations

from typing import List

from .config import Event, RehearsalConfig
from .tracking import RunState

__all__ = ["EventSource", "ScenarioEvents", "DRAIN_GRACE_STEPS"]

# Steps a scenario runs past its last one while a drain it started is still moving experts.
DRAIN_GRACE_STEPS = 16


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
        """After ``steps`` steps; a planned scale-down still under way then finishes first (an
        operator's drain never ends half done because the schedule did), for at most
        :data:`DRAIN_GRACE_STEPS` more steps."""
        if step < self.scenario.steps:
            return False
        draining = bool(st.leaving or st.leave_now)
        return not draining or step >= self.scenario.steps + DRAIN_GRACE_STEPS
