"""A dependency out (an engine service, the disk): tasks wait without using attempts; after
`workers.outage_alert_seconds` the operator is alerted, and `status` shows what is awaited since when."""

from __future__ import annotations

import time
from typing import Any, Callable

from heygem_daemon.clock import SYSTEM_CLOCK, Clock
from heygem_daemon.config import Config
from heygem_daemon.generation.dependencies import dependency_alerts
from heygem_daemon.log import get_logger
from heygem_daemon.state import Store

log = get_logger("heygem.outages")
CHECK_SECONDS = 10.0


def waiting(store: Store) -> list[dict[str, Any]]:
    """What queued tasks wait for: dependency, reason, since (unix time), tasks."""
    return [o for o in store.tasks.outages() if o["since"] is not None]


def describe(outage: dict[str, Any]) -> str:
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(outage["since"]))
    return f"waiting for {outage['dependency']} since {since} ({outage['tasks']} task(s)): {outage['reason']}"


class OutageWatch:
    """Called from the daemon's main loop; alerts once per outage (the outbox repeats it at most every
    notify.alert_repeat_hours)."""

    def __init__(self, cfg: Config, store: Store, on_alert: Callable[[str, str], Any],
                 clock: Clock = SYSTEM_CLOCK, others: Callable[[], list[dict[str, Any]]] = lambda: []) -> None:
        self.cfg, self.store, self.on_alert, self.clock = cfg, store, on_alert, clock
        # Outages no queued task records (the task broker away while every remote task is in flight).
        self.others = others
        self._next = 0.0
        self._alerted: set[tuple[str, float]] = set()

    def check(self) -> list[str]:
        """Alert for every outage older than the configured time; returns the alert keys raised now."""
        now = self.clock.time()
        if now < self._next:
            return []
        self._next = now + CHECK_SECONDS
        raised = []
        for outage in waiting(self.store) + self.others():
            mark = (outage["dependency"], outage["since"])
            if now - outage["since"] < self.cfg.workers.outage_alert_seconds or mark in self._alerted:
                continue
            self._alerted.add(mark)
            key = f"outage:{outage['dependency']}"
            message = f"Generation is {describe(outage)}. Tasks run again by themselves once it is back."
            log.error("operator alert", alert=key, message=message)
            self.on_alert(key, message)
            raised.append(key)
        for key, message in dependency_alerts(self.cfg, now):
            if (key, message) in self._alerted:  # the same service, out since the same time: said once
                continue
            self._alerted.add((key, message))
            log.error("operator alert", alert=key, message=message)
            self.on_alert(key, message)
            raised.append(key)
        return raised
