"""Codes the heygem engine gave a service's temp folder, kept until the service has forgotten them."""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass

from heygem_daemon.state.db import Repository


@dataclass(frozen=True)
class HeygemCode:
    code: str
    temp: str
    task_id: int
    service: str | None
    live: bool
    """The newest code of a task not ended: its attempt may be following it, or the task's next attempt
    adopt it, so nobody else may ask (a terminal answer is told once)."""
    created_at: float = 0.0


_NEWEST = ("c.code = (SELECT n.code FROM heygem_codes n WHERE n.task_id = c.task_id"
           " ORDER BY n.created_at DESC, n.rowid DESC LIMIT 1)")


def _code(row: sqlite3.Row) -> HeygemCode:
    return HeygemCode(row["code"], row["temp"], row["task_id"], row["service"],
                      bool(row["live"]) if "live" in row.keys() else True, row["created_at"])


class HeygemCodes(Repository):
    def remember(self, code: str, temp: str, task_id: int) -> None:
        """Before a task's inputs go into a service's temp folder under `code`."""
        with self.tx() as db:
            db.execute("INSERT OR IGNORE INTO heygem_codes (code, temp, task_id, created_at) VALUES (?, ?, ?, ?)",
                       (code, temp, task_id, time.time()))

    def submitted(self, code: str, temp: str, service: str | None) -> None:
        """The job goes to `service`, which knows the code until it has told the job's end; None when
        the service refused it (busy, unreachable)."""
        with self.tx() as db:
            db.execute("UPDATE heygem_codes SET service = ? WHERE code = ? AND temp = ?", (service, code, temp))

    def select(self) -> list[HeygemCode]:
        rows = self._conn().execute(
            f"SELECT c.*, (t.state IN ('queued', 'running') AND {_NEWEST}) AS live"
            " FROM heygem_codes c LEFT JOIN tasks t ON t.id = c.task_id ORDER BY c.created_at")
        return [_code(r) for r in rows]

    def left_running(self, task_id: int) -> HeygemCode | None:
        """The job the task's last attempt submitted, when that attempt was cut short (the daemon stopped or
        was killed) or waited out an outage mid-render: the service may still run it, to be followed
        rather than rendered again. Not one an attempt gave up on (over its time limit, a failure)."""
        row = self._conn().execute(
            f"SELECT c.* FROM heygem_codes c WHERE c.task_id = ? AND c.service IS NOT NULL AND {_NEWEST}"
            " AND (SELECT a.outcome FROM attempts a WHERE a.task_id = c.task_id AND a.ended_at IS NOT NULL"
            "  ORDER BY a.id DESC LIMIT 1) IN ('interrupted', 'outage')", (task_id,)).fetchone()
        return _code(row) if row else None

    def forget(self, code: str, temp: str) -> None:
        """`<temp>/<code>*` is gone and the service no longer knows the code."""
        with self.tx() as db:
            db.execute("DELETE FROM heygem_codes WHERE code = ? AND temp = ?", (code, temp))
