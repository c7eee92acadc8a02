"""The task queue: one task per output video. queued -> running -> done | failed; one row per attempt."""

from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import dataclass
from typing import Any

from heygem_daemon.state.db import Repository, decoded, job_and_states


@dataclass(frozen=True)
class Task:
    id: int
    job_id: str
    name: str
    audio: str
    portrait: str
    output: str
    state: str
    attempts: int
    progress: float
    not_before: float
    device: str | None
    last_error: dict[str, Any] | None
    started_at: float | None
    updated_at: float
    finished_at: float | None
    object_key: str | None = None
    """The video's S3 key when a remote worker uploads it (workers.remote.transfer: s3); fixed once."""


@dataclass(frozen=True)
class NewTask:
    name: str
    audio: str
    portrait: str
    output: str


def _task(row: sqlite3.Row) -> Task:
    return Task(**decoded(row, "last_error"))


class TaskQueue(Repository):
    def select(self, job_id: str | None = None, states: tuple[str, ...] | None = None) -> list[Task]:
        sql, args = job_and_states("SELECT * FROM tasks WHERE 1=1", job_id, states)
        return [_task(r) for r in self._conn().execute(sql + " ORDER BY id", args)]

    def get(self, task_id: int) -> Task:
        return _task(self._conn().execute("SELECT * FROM tasks WHERE id = ?", (task_id,)).fetchone())

    def take_next(self, device: str, now: float | None = None) -> Task | None:
        """Atomically move the next runnable task to running on `device` and open an attempt.

        Fair across jobs: higher priority first, then the job whose last attempt began longest ago (a job
        never started goes first), so a one-video job is never stuck behind a big batch.
        """
        now = time.time() if now is None else now
        with self.tx() as db:
            row = db.execute(
                "WITH ready AS (SELECT job_id, MIN(id) AS id FROM tasks WHERE state = 'queued' AND not_before <= ?"
                "  GROUP BY job_id)"
                " SELECT r.id FROM ready r JOIN jobs j ON j.id = r.job_id ORDER BY"
                "  CASE json_extract(j.spec, '$.priority') WHEN 'high' THEN 0 WHEN 'low' THEN 2 ELSE 1 END,"
                "  COALESCE((SELECT MAX(a.id) FROM attempts a JOIN tasks s ON s.id = a.task_id"
                "   WHERE s.job_id = r.job_id), 0), r.id LIMIT 1", (now,)
            ).fetchone()
            if row is None:
                return None
            tid = row["id"]
            db.execute(
                "UPDATE tasks SET state = 'running', attempts = attempts + 1, progress = 0, device = ?,"
                " started_at = ?, updated_at = ? WHERE id = ?", (device, now, now, tid))
            db.execute(
                "INSERT INTO attempts (task_id, n, device, started_at)"
                " SELECT id, attempts, ?, ? FROM tasks WHERE id = ?", (device, now, tid))
            db.execute("UPDATE jobs SET state = 'running', updated_at = ? WHERE id ="
                       " (SELECT job_id FROM tasks WHERE id = ?) AND state = 'queued'", (now, tid))
        return self.get(tid)

    def next_wakeup(self) -> float | None:
        row = self._conn().execute("SELECT MIN(not_before) AS t FROM tasks WHERE state = 'queued'").fetchone()
        return row["t"]

    def set_progress(self, task_id: int, progress: float) -> None:
        with self.tx() as db:
            db.execute("UPDATE tasks SET progress = ?, updated_at = ? WHERE id = ? AND state = 'running'",
                       (progress, time.time(), task_id))

    def set_remote_id(self, task_id: int, remote_id: str) -> None:
        """Name the Celery task that carries the running attempt; written before it is sent, so a crash
        between the two cannot lose a render."""
        with self.tx() as db:
            db.execute("UPDATE attempts SET remote_id = ? WHERE task_id = ? AND ended_at IS NULL",
                       (remote_id, task_id))

    def running_remote(self) -> list[tuple[Task, str]]:
        """Running tasks whose attempt was sent to another host, with its Celery id."""
        rows = self._conn().execute(
            "SELECT t.*, a.remote_id FROM tasks t JOIN attempts a ON a.task_id = t.id AND a.ended_at IS NULL"
            " WHERE t.state = 'running' AND a.remote_id IS NOT NULL ORDER BY t.id").fetchall()
        found = []
        for row in rows:
            fields = decoded(row, "last_error")
            remote_id = fields.pop("remote_id")
            found.append((Task(**fields), remote_id))
        return found

    def _end_attempt(self, db: sqlite3.Connection, task_id: int, outcome: str,
                     error: dict[str, Any] | None, now: float) -> None:
        db.execute(
            "UPDATE attempts SET ended_at = ?, outcome = ?, error = ? WHERE task_id = ? AND ended_at IS NULL",
            (now, outcome, json.dumps(error) if error else None, task_id))

    def finish(self, task_id: int) -> bool:
        """A running task made its video; False when it was not running (nothing changed)."""
        now = time.time()
        with self.tx() as db:
            self._end_attempt(db, task_id, "done", None, now)
            moved = db.execute("UPDATE tasks SET state = 'done', progress = 1, updated_at = ?, finished_at = ?,"
                               " last_error = NULL WHERE id = ? AND state = 'running'", (now, now, task_id))
        return moved.rowcount == 1

    def fail_attempt(self, task_id: int, error: dict[str, Any], retry_at: float | None) -> str:
        """Record a failed attempt of a running task; requeue at retry_at or fail for good when None.
        Returns the new state, or "" when the task was not running (nothing changed)."""
        now = time.time()
        state = "queued" if retry_at is not None else "failed"
        with self.tx() as db:
            moved = db.execute(
                "UPDATE tasks SET state = ?, not_before = ?, last_error = ?, updated_at = ?, finished_at = ?"
                " WHERE id = ? AND state = 'running'",
                (state, retry_at or 0, json.dumps(error), now, None if retry_at is not None else now, task_id))
            if moved.rowcount != 1:
                return ""
            self._end_attempt(db, task_id, "retry" if retry_at is not None else "failed", error, now)
        return state

    def wait(self, task_id: int, error: dict[str, Any], not_before: float) -> bool:
        """A dependency is out: back to the queue until not_before, the attempt not counted.
        False when the task was not running (nothing changed)."""
        now = time.time()
        with self.tx() as db:
            # Progress back to 0: the next attempt starts over, and `status` must not show a waiting task as 5 % made.
            moved = db.execute("UPDATE tasks SET state = 'queued', attempts = MAX(attempts - 1, 0), not_before = ?,"
                               " progress = 0, last_error = ?, updated_at = ? WHERE id = ? AND state = 'running'",
                               (not_before, json.dumps(error), now, task_id))
            if moved.rowcount != 1:
                return False
            self._end_attempt(db, task_id, "outage", error, now)
        return True

    def outage_streak(self, task_id: int) -> int:
        """How many of the task's latest attempts in a row ended waiting for a dependency."""
        rows = self._conn().execute("SELECT outcome FROM attempts WHERE task_id = ? AND ended_at IS NOT NULL"
                                    " ORDER BY id DESC LIMIT 64", (task_id,))
        streak = 0
        for row in rows:
            if row["outcome"] != "outage":
                break
            streak += 1
        return streak

    def outages(self, states: tuple[str, ...] = ("queued",)) -> list[dict[str, Any]]:
        """Dependencies tasks are waiting for: dependency, reason, since (the earliest), tasks. A running
        task whose last attempt waited has not got past the dependency yet (`states` may count it)."""
        sql, args = job_and_states(
            "SELECT json_extract(last_error, '$.dependency') AS dependency,"
            " MIN(json_extract(last_error, '$.reason')) AS reason, MIN(json_extract(last_error, '$.since')) AS since,"
            " COUNT(*) AS tasks FROM tasks WHERE json_extract(last_error, '$.kind') = 'outage'", None, states)
        return [dict(r) for r in self._conn().execute(sql + " GROUP BY 1 ORDER BY 3", args)]

    def wake(self, dependencies: list[str], now: float) -> int:
        """The tasks waiting out an outage of one of `dependencies` may go now (it answers again), not when
        their backoff ends. Returns how many."""
        marks = ",".join("?" * len(dependencies))
        with self.tx() as db:
            moved = db.execute(
                f"UPDATE tasks SET not_before = ? WHERE state = 'queued' AND not_before > ?"
                f" AND json_extract(last_error, '$.kind') = 'outage'"
                f" AND json_extract(last_error, '$.dependency') IN ({marks})", (now, now, *dependencies))
        return moved.rowcount

    def requeue(self, task_ids: list[int], reset_attempts: bool) -> None:
        now = time.time()
        with self.tx() as db:
            for tid in task_ids:
                db.execute(
                    "UPDATE tasks SET state = 'queued', progress = 0, not_before = 0, finished_at = NULL,"
                    " attempts = CASE WHEN ? THEN 0 ELSE MAX(attempts - 1, 0) END, updated_at = ? WHERE id = ?",
                    (reset_attempts, now, tid))
                db.execute("UPDATE attempts SET ended_at = ?, outcome = 'interrupted' WHERE task_id = ?"
                           " AND ended_at IS NULL", (now, tid))

    def counts(self) -> dict[str, int]:
        rows = self._conn().execute("SELECT state, COUNT(*) AS n FROM tasks GROUP BY state")
        return {r["state"]: r["n"] for r in rows}

    def attempts(self, task_id: int) -> list[dict[str, Any]]:
        rows = self._conn().execute("SELECT * FROM attempts WHERE task_id = ? ORDER BY id", (task_id,))
        return [dict(r) for r in rows]

    def attempt_count(self, job_id: str) -> int:
        """Attempts ever made for a job's tasks: grows with every retry, unchanged by crash recovery."""
        row = self._conn().execute(
            "SELECT COUNT(*) AS n FROM attempts WHERE task_id IN (SELECT id FROM tasks WHERE job_id = ?)",
            (job_id,)).fetchone()
        return int(row["n"])

    def fix_object_key(self, task_id: int, key: str) -> str:
        """The task's object key: `key` if it has none yet, else the one fixed before (every attempt, one key)."""
        with self.tx() as db:
            db.execute("UPDATE tasks SET object_key = ? WHERE id = ? AND object_key IS NULL", (key, task_id))
            return str(db.execute("SELECT object_key FROM tasks WHERE id = ?", (task_id,)).fetchone()[0])

    def by_output(self, path: str) -> Task | None:
        row = self._conn().execute("SELECT * FROM tasks WHERE output = ? ORDER BY id DESC LIMIT 1",
                                   (path,)).fetchone()
        return _task(row) if row else None
