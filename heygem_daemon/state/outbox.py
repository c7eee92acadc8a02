"""The notification outbox: one row per event and chat target. pending -> sent | retrying (next_at) -> gave_up.

`target` is a digest of the apprise URL: the URL holds tokens and is never stored. A message split into
parts has one row per part, keyed `<event>#part<i>/<n>`; the event counts as recorded once any part is.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from itertools import groupby

from heygem_daemon.state.db import Repository, job_and_states

PART = "#part"


def event_of(event_key: str) -> str:
    """The event a (part) row belongs to."""
    return event_key.split(PART, 1)[0]


@dataclass(frozen=True)
class NewNotification:
    event_key: str
    target: str
    kind: str
    job_id: str | None
    title: str
    body: str
    body_format: str
    notify_type: str


@dataclass(frozen=True)
class Notification(NewNotification):
    id: int
    state: str
    attempts: int
    next_at: float
    last_error: str | None
    created_at: float
    sent_at: float | None


class OutboxRepository(Repository):
    def add(self, rows: list[NewNotification]) -> int:
        """Record messages to send; an (event, target) already recorded — any of its parts — is left alone,
        so a message rendered again into another number of parts adds nothing. Returns rows added."""
        now = time.time()
        added = 0
        with self.tx() as db:
            for (event, target), group in groupby(rows, key=lambda r: (event_of(r.event_key), r.target)):
                known = db.execute(
                    "SELECT 1 FROM notifications WHERE target = ? AND (event_key = ? OR substr(event_key, 1, ?) = ?)"
                    " LIMIT 1", (target, event, len(event) + len(PART), event + PART)).fetchone()
                if known is not None:
                    continue
                for r in group:
                    db.execute(
                        "INSERT OR IGNORE INTO notifications (event_key, target, kind, job_id, title, body,"
                        " body_format, notify_type, state, next_at, created_at)"
                        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, 'pending', ?, ?)",
                        (r.event_key, r.target, r.kind, r.job_id, r.title, r.body, r.body_format, r.notify_type,
                         now, now))
                    added += 1
        return added

    def due(self, now: float, limit: int = 20) -> list[Notification]:
        rows = self._conn().execute(
            "SELECT * FROM notifications WHERE state IN ('pending', 'retrying') AND next_at <= ?"
            " ORDER BY next_at, id LIMIT ?", (now, limit))
        return [Notification(**dict(r)) for r in rows]

    def next_at(self) -> float | None:
        row = self._conn().execute(
            "SELECT MIN(next_at) AS t FROM notifications WHERE state IN ('pending', 'retrying')").fetchone()
        return row["t"]

    def select(self, job_id: str | None = None, states: tuple[str, ...] | None = None) -> list[Notification]:
        sql, args = job_and_states("SELECT * FROM notifications WHERE 1=1", job_id, states)
        return [Notification(**dict(r)) for r in self._conn().execute(sql + " ORDER BY id", args)]

    def sent(self, notification_id: int) -> None:
        now = time.time()
        with self.tx() as db:
            db.execute("UPDATE notifications SET state = 'sent', attempts = attempts + 1, sent_at = ?,"
                       " last_error = NULL WHERE id = ?", (now, notification_id))

    def sent_since(self, target: str, since: float) -> list[float]:
        """When messages to `target` went out since `since`, oldest first (for pacing a robot's rate limit,
        across restarts too)."""
        rows = self._conn().execute(
            "SELECT sent_at FROM notifications WHERE target = ? AND state = 'sent' AND sent_at >= ? ORDER BY sent_at",
            (target, since))
        return [r["sent_at"] for r in rows]

    def postpone(self, notification_id: int, until: float) -> None:
        """Not sent yet, not an attempt either: the target's rate limit is used up until `until`."""
        with self.tx() as db:
            db.execute("UPDATE notifications SET next_at = ? WHERE id = ?", (until, notification_id))

    def failed(self, notification_id: int, error: str, retry_at: float | None) -> None:
        """A failed send: try again at retry_at, or give up for good when None."""
        with self.tx() as db:
            db.execute(
                "UPDATE notifications SET state = ?, attempts = attempts + 1, next_at = COALESCE(?, next_at),"
                " last_error = ? WHERE id = ?",
                ("retrying" if retry_at is not None else "gave_up", retry_at, error, notification_id))

    def forget_ended(self, created_before: float) -> int:
        """Sent and given-up messages older than the cut-off; pending ones stay until they end."""
        with self.tx() as db:
            return db.execute("DELETE FROM notifications WHERE state IN ('sent', 'gave_up') AND created_at < ?",
                              (created_before,)).rowcount
