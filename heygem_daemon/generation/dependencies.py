"""The services engines depend on, as their workers last saw them: which are down or wedged, for `status`,
`doctor` and an operator alert. An engine describes them with an optional classmethod
`dependencies(settings) -> list[Dependency]` (heygem: down, busy or wedged services). Tasks that wait on an
outage are followed by generation/outages.py."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from heygem_daemon.config import Config, ConfigError

OUT_STATES = ("down", "wedged")
# An observation older than this says nothing about now (nobody has needed the service since).
FRESH_SECONDS = 600.0


@dataclass(frozen=True)
class Dependency:
    name: str
    state: str
    """ok, busy, unknown, or one of OUT_STATES."""
    since: float | None
    seen: float
    """When this was last observed (epoch seconds; 0 when never)."""
    detail: str
    hint: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "state": self.state, "since": self.since, "seen": self.seen,
                "detail": self.detail, "hint": self.hint}


def engine_dependencies(cfg: Config) -> list[Dependency]:
    from heygem_daemon.engines.registry import engine_class, engine_names, settings_for

    found: list[Dependency] = []
    for name in engine_names(cfg):
        try:
            describe = getattr(engine_class(name), "dependencies", None)
            if describe is not None:
                found.extend(describe(settings_for(cfg, name)))
        except ConfigError:
            continue  # `doctor` and the start-up check report a broken engine section
    return found


def dependency_alerts(cfg: Config, now: float) -> list[tuple[str, str]]:
    """(key, message) for every engine service wedged, or down longer than workers.outage_alert_seconds,
    as its workers last saw it (tasks waiting on an outage are OutageWatch's)."""
    alerts: list[tuple[str, str]] = []
    for dep in engine_dependencies(cfg):
        out_for = now - (dep.since or now)
        fresh = now - dep.seen <= FRESH_SECONDS
        if dep.state in OUT_STATES and fresh and (dep.state == "wedged" or out_for >= cfg.workers.outage_alert_seconds):
            alerts.append((f"dependency:{dep.name}", f"{dep.name} is {dep.state}: {dep.detail}. {dep.hint}"))
    return alerts
