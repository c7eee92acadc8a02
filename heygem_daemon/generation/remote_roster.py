"""The remote workers the dispatcher has heard from, for `status` and metrics (read from other threads)."""

from __future__ import annotations

import threading
import time
from typing import Any


class WorkerRoster:
    def __init__(self) -> None:
        self._by_host: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()

    def heard(self, meta: dict[str, Any], task_name: str) -> None:
        """A beat's meta: the worker's host, its devices, the device rendering `task_name`, the beat's time."""
        host = meta.get("host")
        if not host:
            return
        with self._lock:
            worker = self._by_host.setdefault(host, {"host": host, "devices": [], "tasks": {}, "last_beat": None})
            worker["devices"] = meta.get("devices", worker["devices"])
            worker["tasks"][meta.get("device", "?")] = task_name
            worker["last_beat"] = meta.get("beat") or time.time()

    def released(self, meta: dict[str, Any], task_name: str) -> None:
        """The attempt described by its last beat's `meta` is over: its device no longer renders `task_name`."""
        with self._lock:
            worker = self._by_host.get(meta.get("host", ""))
            if worker and worker["tasks"].get(meta.get("device")) == task_name:
                del worker["tasks"][meta["device"]]

    def describe(self) -> list[dict[str, Any]]:
        """Each remote worker heard from: host, its devices, what it runs now, its last heartbeat."""
        with self._lock:
            return [dict(w, tasks=dict(w["tasks"])) for _, w in sorted(self._by_host.items())]
