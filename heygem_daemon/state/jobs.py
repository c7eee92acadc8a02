"""Jobs: one per drop. detected -> queued -> running -> generated -> done (or failed; retried when re-dropped)."""

from __future__ import annotations

import json
import sqlite3
import time
import uuid
from dataclasses import dataclass
from typing import Any, Iterable

from heygem_daemon.state.db import Repository, decoded, job_and_states
from heygem_daemon.state.tasks import NewTask

TERMINAL_JOB_STATES = ("done", "failed", "retried")
# An operator asked to stop the job (`heygem-daemon cancel`); the daemon ends it as failed.
CANCELLING = "cancelling"


@dataclass(frozen=True)
class Job:
    id: str
    name: str
    state: str
    spec: dict[str, Any]
    fingerprint: str | None
    duplicate_of: str | None
    owner: str | None
    error: dict[str, Any] | None
    created_at: float
    updated_at: float
    finished_at: float | None


def _job(row: sqlite3.Row) -> Job:
    return Job(**decoded(row, "spec", "error"))


class JobRepository(Repository):
    def create(self, name_hint: str, spec: dict[str, Any], fingerprint: str | None = None,
                   owner: str | None = None, taken: set[str] = frozenset()) -> Job:  # type: ignore[assignment]
        """Insert a job in `detected` under a unique name (name, name-2, ...) not in `taken` either."""
        now = time.time()
        job_id = uuid.uuid4().hex[:12]
        with self.tx() as db:
            name = self._free_name(db, name_hint, taken)
            db.execute(
                "INSERT INTO jobs (id, name, state, spec, fingerprint, owner, created_at, updated_at)"
                " VALUES (?, ?, 'detected', ?, ?, ?, ?, ?)",
                (job_id, name, json.dumps(spec), fingerprint, owner, now, now),
            )
        return self.get(job_id)

    @staticmethod
    def _free_name(db: sqlite3.Connection, hint: str, taken: set[str]) -> str:
        n = 1
        while True:
            name = hint if n == 1 else f"{hint}-{n}"
            used = db.execute("SELECT 1 FROM jobs WHERE name = ? AND state != 'retried'", (name,)).fetchone()
            if not used and name not in taken:
                return name
            n += 1

    def get(self, job_id: str) -> Job:
        row = self._conn().execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise KeyError(job_id)
        return _job(row)

    def find(self, ref: str) -> Job | None:
        """A job by id, or the live job with that name."""
        db = self._conn()
        row = db.execute("SELECT * FROM jobs WHERE id = ?", (ref,)).fetchone() or db.execute(
            "SELECT * FROM jobs WHERE name = ? AND state != 'retried'", (ref,)).fetchone()
        return _job(row) if row else None

    def select(self, states: tuple[str, ...] | None = None, limit: int = 1000) -> list[Job]:
        db = self._conn()
        if states:
            marks = ",".join("?" * len(states))
            rows = db.execute(f"SELECT * FROM jobs WHERE state IN ({marks}) ORDER BY created_at DESC LIMIT ?",
                              (*states, limit))
        else:
            rows = db.execute("SELECT * FROM jobs ORDER BY created_at DESC LIMIT ?", (limit,))
        return [_job(r) for r in rows]

    def page(self, states: tuple[str, ...] | None, name_part: str, offset: int, limit: int) -> tuple[list[Job], int]:
        """Newest first: one page of the jobs in `states` (all when None) whose name contains `name_part`,
        and how many there are in all. Walks the created_at indexes, so a page costs the same at any size."""
        sql, args = job_and_states("FROM jobs WHERE 1", None, states)
        if name_part:
            sql += " AND instr(lower(name), ?) > 0"
            args.append(name_part.lower())
        db = self._conn()
        total = db.execute(f"SELECT COUNT(*) AS n {sql}", args).fetchone()["n"]
        rows = db.execute(f"SELECT * {sql} ORDER BY created_at DESC LIMIT ? OFFSET ?", (*args, limit, offset))
        return [_job(r) for r in rows], total

    def after(self, state: str | None, cursor: tuple[float, int] | None,
              limit: int) -> list[tuple[Job, tuple[float, int]]]:
        """Newest first, the jobs (in `state`, or all) after the cursor, each with its own cursor
        (created_at, rowid). Keyset paging on the created_at indexes (which hold the rowid): a page costs the
        same at any depth and a job made meanwhile never shifts the pages."""
        sql, args = job_and_states("FROM jobs WHERE 1", None, (state,) if state else None)
        if cursor is not None:
            sql += " AND (created_at < ? OR (created_at = ? AND rowid < ?))"
            args += [cursor[0], cursor[0], cursor[1]]
        rows = self._conn().execute(f"SELECT rowid AS _row, * {sql} ORDER BY created_at DESC, rowid DESC LIMIT ?",
                                    (*args, limit))
        found = []
        for row in rows:
            fields = decoded(row, "spec", "error")
            found.append((Job(**{k: v for k, v in fields.items() if k != "_row"}), (row["created_at"], row["_row"])))
        return found

    def set_state(self, job_id: str, state: str, error: dict[str, Any] | None = None,
                      spec: dict[str, Any] | None = None) -> None:
        now = time.time()
        finished = now if state in TERMINAL_JOB_STATES else None
        with self.tx() as db:
            db.execute(
                "UPDATE jobs SET state = ?, updated_at = ?, finished_at = ?,"
                " error = COALESCE(?, error), spec = COALESCE(?, spec) WHERE id = ?",
                (state, now, finished, json.dumps(error) if error else None,
                 json.dumps(spec) if spec is not None else None, job_id),
            )

    def transition(self, job_id: str, to: str, allowed_from: Iterable[str], error: dict[str, Any] | None = None,
                   spec: dict[str, Any] | None = None) -> str:
        """Compare-and-set: move the job to `to` only if it is in one of `allowed_from`, in one transaction.
        Returns the state it was in: the move happened if and only if that is one of `allowed_from`."""
        now = time.time()
        with self.tx() as db:
            row = db.execute("SELECT state FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                raise KeyError(job_id)
            if row["state"] in set(allowed_from):
                db.execute(
                    "UPDATE jobs SET state = ?, updated_at = ?, finished_at = ?,"
                    " error = COALESCE(?, error), spec = COALESCE(?, spec) WHERE id = ?",
                    (to, now, now if to in TERMINAL_JOB_STATES else None, json.dumps(error) if error else None,
                     json.dumps(spec) if spec is not None else None, job_id))
        return row["state"]

    def requeue_failed(self, job_id: str, from_state: str, spec: dict[str, Any]) -> int:
        """Retry carried out: the job's failed tasks queued again with fresh attempts and the job queued,
        in one transaction (a crash leaves either the request or the queued job). Returns the tasks queued."""
        now = time.time()
        with self.tx() as db:
            moved = db.execute("UPDATE jobs SET state = 'queued', spec = ?, updated_at = ?, finished_at = NULL"
                               " WHERE id = ? AND state = ?", (json.dumps(spec), now, job_id, from_state))
            if moved.rowcount != 1:
                return 0
            return db.execute(
                "UPDATE tasks SET state = 'queued', progress = 0, not_before = 0, finished_at = NULL, attempts = 0,"
                " updated_at = ? WHERE job_id = ? AND state = 'failed'", (now, job_id)).rowcount

    def all_tasks_ended(self, states: tuple[str, ...]) -> list[str]:
        """Ids of jobs in `states` that have tasks and none of them queued or running: ready to be finished."""
        rows = self._conn().execute(
            f"SELECT id FROM jobs j WHERE state IN ({','.join('?' * len(states))})"
            " AND EXISTS (SELECT 1 FROM tasks t WHERE t.job_id = j.id)"
            " AND NOT EXISTS (SELECT 1 FROM tasks t WHERE t.job_id = j.id AND t.state IN ('queued', 'running'))",
            states)
        return [r["id"] for r in rows]

    def delete(self, job_id: str) -> None:
        with self.tx() as db:
            db.execute("DELETE FROM jobs WHERE id = ?", (job_id,))
            # A claim undone by recovery is taken again as a new job with its own messages.
            db.execute("DELETE FROM notifications WHERE job_id = ? AND state != 'sent'", (job_id,))

    def queue(self, job_id: str, tasks: list[NewTask]) -> None:
        """Claimed: the job's tasks exist and are queued, in the same transaction as the job's state."""
        now = time.time()
        with self.tx() as db:
            db.executemany(
                "INSERT INTO tasks (job_id, name, audio, portrait, output, state, updated_at)"
                " VALUES (?, ?, ?, ?, ?, 'queued', ?)",
                [(job_id, t.name, t.audio, t.portrait, t.output, now) for t in tasks],
            )
            db.execute("UPDATE jobs SET state = 'queued', updated_at = ? WHERE id = ?", (now, job_id))

    def mark_duplicate(self, job_id: str, original_id: str) -> None:
        now = time.time()
        with self.tx() as db:
            db.execute("UPDATE jobs SET state = 'done', duplicate_of = ?, updated_at = ?, finished_at = ?"
                       " WHERE id = ?", (original_id, now, now, job_id))

    def find_duplicate(self, fingerprint: str, window_seconds: float) -> Job | None:
        """An earlier job with the same inputs and options that is done or on its way to done."""
        since = time.time() - window_seconds
        row = self._conn().execute(
            "SELECT * FROM jobs WHERE fingerprint = ? AND created_at >= ? AND duplicate_of IS NULL"
            " AND state NOT IN ('failed', 'retried', 'detected') ORDER BY created_at LIMIT 1",
            (fingerprint, since)).fetchone()
        return _job(row) if row else None

    def cancel(self, job_id: str, error: dict[str, Any]) -> tuple[str, int]:
        """Mark a queued/running job `cancelling` and fail its queued tasks, in one transaction.

        Returns the job's state before (unchanged unless it was queued or running) and how many tasks
        are still running: the daemon stops those and finishes the job.
        """
        now = time.time()
        with self.tx() as db:
            row = db.execute("SELECT state FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                raise KeyError(job_id)
            if row["state"] not in ("queued", "running", CANCELLING):
                return row["state"], 0
            if row["state"] != CANCELLING:  # settled again every second until its tasks stop: no rewrite
                db.execute("UPDATE jobs SET state = ?, updated_at = ? WHERE id = ?", (CANCELLING, now, job_id))
            db.execute("UPDATE tasks SET state = 'failed', last_error = ?, updated_at = ?, finished_at = ?"
                       " WHERE job_id = ? AND state = 'queued'", (json.dumps(error), now, now, job_id))
            running = db.execute("SELECT COUNT(*) AS n FROM tasks WHERE job_id = ? AND state = 'running'",
                                 (job_id,)).fetchone()["n"]
        return row["state"], running

    def state(self, job_id: str) -> str | None:
        row = self._conn().execute("SELECT state FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return row["state"] if row else None

    def counts(self) -> dict[str, int]:
        rows = self._conn().execute("SELECT state, COUNT(*) AS n FROM jobs GROUP BY state")
        return {r["state"]: r["n"] for r in rows}

    def delete_finished(self, done_before: float, failed_before: float) -> list[str]:
        """Forget finished jobs; failed ones have their own cut-off. Their tasks, attempts, batch, deliveries
        and upload parts go with them (foreign keys), their ended notifications too; the paths they
        delivered stay marked, so the outputs rescan does not deliver those files again.
        Returns the names of the jobs forgotten."""
        where = "(state IN ('done', 'retried') AND finished_at < ?) OR (state = 'failed' AND finished_at < ?)"
        with self.tx() as db:
            ids = [(r["id"], r["name"]) for r in db.execute(f"SELECT id, name FROM jobs WHERE {where}",
                                                            (done_before, failed_before))]
            for job_id, name in ids:
                mark_delivered(db, "d.batch_id IN (SELECT id FROM batches WHERE job_id = ?)", (job_id,))
                db.execute("DELETE FROM notifications WHERE job_id = ? AND state IN ('sent', 'gave_up')", (job_id,))
                db.execute("DELETE FROM jobs WHERE id = ?", (job_id,))
                db.execute("DELETE FROM web_owners WHERE job_name = ?", (name,))  # a later job may take the name
        return [name for _id, name in ids]


def mark_delivered(db: sqlite3.Connection, where: str, args: tuple[object, ...]) -> None:
    """Before delivery rows are forgotten: remember their paths (`delivered`), as the outputs rescan asks."""
    db.execute(f"INSERT OR IGNORE INTO delivered (path, size, marked_at) SELECT d.path, d.size, ?"
               f" FROM deliveries d WHERE {where}", (time.time(), *args))
