"""The services engines depend on, as their workers last saw them: which are down or wedged, for `status`,
`doctor`, the operator's alerts and the probe that wakes waiting tasks. An engine describes them with an
optional classmethod `dependencies(settings) -> list[Dependency]` (heygem: down, busy or wedged services);
a dependency that can be asked whether it answers again carries a `probe`. Tasks that wait on an outage
and the alerts are followed by generation/outages.py."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable

from heygem_daemon.config import Config, ConfigError

OUT_STATES = ("down", "wedged")
# An observation older than this says nothing about now (nobody has needed the service since).
FRESH_SECONDS = 600.0

Describe = Callable[[], list["Dependency"]]


@dataclass(frozen=True)
class Dependency:
    name: str
    """As tasks waiting on it record it (`last_error.dependency`)."""
    state: str
    """ok, busy, unknown, or one of OUT_STATES."""
    since: float | None
    seen: float
    """When this was last observed (epoch seconds; 0 when never)."""
    detail: str
    hint: str = ""
    group: str = ""
    """Dependencies that stand in for each other (one engine's services): one back wakes the tasks of all."""
    probe: Callable[[], bool] | None = field(default=None, compare=False, repr=False)
    """Asks it now whether it answers (and records what it saw); only down ones are asked."""
    probe_every: float = 0.0

    def fresh(self, now: float) -> bool:
        return now - self.seen <= FRESH_SECONDS

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "state": self.state, "since": self.since, "seen": self.seen,
                "detail": self.detail, "hint": self.hint}


def dependency_sources(cfg: Config) -> list[Describe]:
    """One reader per engine that describes dependencies, its settings validated once (the outage watch
    reads them every second)."""
    from heygem_daemon.engines.registry import engine_class, engine_names, settings_for

    sources: list[Describe] = []
    for name in engine_names(cfg):
        try:
            describe = getattr(engine_class(name), "dependencies", None)
            if describe is not None:
                settings = settings_for(cfg, name)
                sources.append(partial(describe, settings))
        except ConfigError:
            continue  # `doctor` and the start-up check report a broken engine section
    return sources


def engine_dependencies(cfg: Config) -> list[Dependency]:
    return [dep for describe in dependency_sources(cfg) for dep in describe()]
