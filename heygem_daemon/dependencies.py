"""What the daemon depends on and waits for (engine services, the disk): which are out, for `status`,
and an operator alert when one stays out.

Two sources, both generic: tasks the workers put back to wait on an outage (any engine; their
last_error names the dependency), and engines that describe their services (an optional classmethod
`dependencies(settings) -> list[Dependency]`; heygem: down, busy or wedged services, as its workers saw
them)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from heygem_daemon.config import Config, ConfigError
from heygem_daemon.store import Store

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
    from heygem_daemon.engines.registry import engine_class, settings_for

    found: list[Dependency] = []
    for name in sorted({cfg.engine.name, *cfg.engines}):
        try:
            describe = getattr(engine_class(name), "dependencies", None)
            if describe is not None:
                found.extend(describe(settings_for(cfg, name)))
        except ConfigError:
            continue  # `doctor` and the start-up check report a broken engine section
    return found


def outage_alerts(cfg: Config, store: Store, now: float | None = None) -> list[tuple[str, str]]:
    """(key, message) for every dependency out longer than workers.outage_alert_seconds."""
    now = time.time() if now is None else now
    limit = cfg.workers.outage_alert_seconds
    alerts: list[tuple[str, str]] = []
    waiting: dict[str, list[tuple[dict[str, Any], float]]] = {}
    for task, since in store.outage_waits():
        error = task.last_error or {}
        waiting.setdefault(error.get("dependency") or error.get("reason", "?"), []).append((error, since))
    for dependency, items in waiting.items():
        since = min(s for _, s in items)
        if now - since >= limit:
            error = items[0][0]
            text = (f"{len(items)} task(s) waiting since {time.strftime('%H:%M', time.localtime(since))} "
                    f"({(now - since) / 60:.0f} min) for {dependency}: {error.get('reason', '')}. "
                    f"{error.get('hint', '')}")
            alerts.append((f"outage:{dependency}", text))
    for dep in engine_dependencies(cfg):
        out_for = now - (dep.since or now)
        fresh = now - dep.seen <= FRESH_SECONDS
        if dep.state in OUT_STATES and fresh and (dep.state == "wedged" or out_for >= limit):
            alerts.append((f"dependency:{dep.name}", f"{dep.name} is {dep.state}: {dep.detail}. {dep.hint}"))
    return alerts
