"""The remote workers the dispatcher has heard from (their tasks' beats) and those alive in Redis (their own
entries: queue, set-up problem), for `status` and metrics (read from other threads)."""

from __future__ import annotations

import threading
import time
from typing import Any

from heygem_daemon.generation.remote_setup import WorkerEntry


class WorkerRoster:
    def __init__(self) -> None:
        self._by_host: dict[str, dict[str, Any]] = {}
        self._present: dict[str, WorkerEntry] = {}
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

    def present(self, entries: list[WorkerEntry]) -> None:
        """The workers alive now, as their own entries in Redis say."""
        with self._lock:
            self._present = {e.host: e for e in entries}

    def describe(self) -> list[dict[str, Any]]:
        """Each remote worker heard from or alive: host, its devices, what it runs now, its last heartbeat, and
        (alive ones) its queue and set-up problem (None: healthy)."""
        with self._lock:
            found = []
            for host in sorted(set(self._by_host) | set(self._present)):
                worker = self._by_host.get(host) or {"host": host, "devices": [], "tasks": {}, "last_beat": None}
                entry = self._present.get(host)
                found.append(dict(worker, tasks=dict(worker["tasks"]), alive=entry is not None,
                                  devices=worker["devices"] or (entry.devices if entry else []),
                                  queue=entry.queue if entry else None, problem=entry.problem if entry else None))
            return found
