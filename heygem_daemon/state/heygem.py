"""Codes the heygem engine gave a service's temp folder, kept until the service has forgotten them."""

from __future__ import annotations

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
    """The newest code of a running task: its attempt may be following it, so nobody else may ask."""


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
            "SELECT c.*, (t.state = 'running' AND c.code = (SELECT n.code FROM heygem_codes n"
            " WHERE n.task_id = c.task_id ORDER BY n.created_at DESC, n.rowid DESC LIMIT 1)) AS live"
            " FROM heygem_codes c LEFT JOIN tasks t ON t.id = c.task_id ORDER BY c.created_at")
        return [HeygemCode(r["code"], r["temp"], r["task_id"], r["service"], bool(r["live"])) for r in rows]

    def forget(self, code: str, temp: str) -> None:
        """`<temp>/<code>*` is gone and the service no longer knows the code."""
        with self.tx() as db:
            db.execute("DELETE FROM heygem_codes WHERE code = ? AND temp = ?", (code, temp))
