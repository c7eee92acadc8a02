"""SQLite (WAL) state: jobs, tasks, attempts, the notification outbox. The only module that writes SQL.

Job states:  detected -> queued -> running -> generated -> done   (or failed; retried when re-dropped)
Task states: queued -> running -> done | failed
Notification states: pending -> sent | retrying (next_at) -> sent | gave_up

Delivery is a second axis beside the job state, so `done`/`failed` keep their meaning for dedupe and retry:
Batch (one per job, or per folder of videos another tool left in outputs/): open -> zipped -> reported
Delivery (one per video file): pending -> uploading(upload_id, parts) -> uploaded(etag, sha256) -> linked
                               (or missing, when the file vanished before it could be sent)
"""

from __future__ import annotations

import json
import random
import sqlite3
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id           TEXT PRIMARY KEY,
    name         TEXT NOT NULL,
    state        TEXT NOT NULL,
    spec         TEXT NOT NULL,
    fingerprint  TEXT,
    duplicate_of TEXT,
    owner        TEXT,
    error        TEXT,
    created_at   REAL NOT NULL,
    updated_at   REAL NOT NULL,
    finished_at  REAL
);
CREATE UNIQUE INDEX IF NOT EXISTS jobs_live_name ON jobs(name) WHERE state != 'retried';
CREATE INDEX IF NOT EXISTS jobs_fingerprint ON jobs(fingerprint, created_at);
CREATE TABLE IF NOT EXISTS tasks (
    id          INTEGER PRIMARY KEY,
    job_id      TEXT NOT NULL REFERENCES jobs(id) ON DELETE CASCADE,
    name        TEXT NOT NULL,
    audio       TEXT NOT NULL,
    portrait    TEXT NOT NULL,
    output      TEXT NOT NULL,
    state       TEXT NOT NULL,
    attempts    INTEGER NOT NULL DEFAULT 0,
    progress    REAL NOT NULL DEFAULT 0,
    not_before  REAL NOT NULL DEFAULT 0,
    device      TEXT,
    last_error  TEXT,
    started_at  REAL,
    updated_at  REAL NOT NULL,
    finished_at REAL,
    UNIQUE (job_id, name)
);
CREATE INDEX IF NOT EXISTS tasks_queue ON tasks(state, not_before, id);
CREATE TABLE IF NOT EXISTS attempts (
    id         INTEGER PRIMARY KEY,
    task_id    INTEGER NOT NULL REFERENCES tasks(id) ON DELETE CASCADE,
    n          INTEGER NOT NULL,
    device     TEXT NOT NULL,
    started_at REAL NOT NULL,
    ended_at   REAL,
    outcome    TEXT,
    error      TEXT
);
CREATE INDEX IF NOT EXISTS attempts_task ON attempts(task_id);
-- One row per event and chat target, so a target that is down never makes another one hear twice.
-- `target` is a digest of the apprise URL: the URL holds tokens and is never stored.
CREATE TABLE IF NOT EXISTS notifications (
    id          INTEGER PRIMARY KEY,
    event_key   TEXT NOT NULL,
    target      TEXT NOT NULL,
    kind        TEXT NOT NULL,
    job_id      TEXT,
    title       TEXT NOT NULL,
    body        TEXT NOT NULL,
    body_format TEXT NOT NULL,
    notify_type TEXT NOT NULL,
    state       TEXT NOT NULL,
    attempts    INTEGER NOT NULL DEFAULT 0,
    next_at     REAL NOT NULL,
    last_error  TEXT,
    created_at  REAL NOT NULL,
    sent_at     REAL,
    UNIQUE (event_key, target)
);
CREATE INDEX IF NOT EXISTS notifications_due ON notifications(state, next_at);
CREATE TABLE IF NOT EXISTS batches (
    id            TEXT PRIMARY KEY,
    name          TEXT NOT NULL,
    folder        TEXT NOT NULL,
    job_id        TEXT,
    state         TEXT NOT NULL,
    round_at      REAL,
    zip_name      TEXT,
    zip_key       TEXT,
    zip_upload_id TEXT,
    zip_size      INTEGER,
    attempts      INTEGER NOT NULL DEFAULT 0,
    not_before    REAL NOT NULL DEFAULT 0,
    last_error    TEXT,
    created_at    REAL NOT NULL,
    updated_at    REAL NOT NULL,
    reported_at   REAL,
    zip_sha256    TEXT
);
CREATE INDEX IF NOT EXISTS batches_state ON batches(state, job_id);
CREATE TABLE IF NOT EXISTS deliveries (
    id          INTEGER PRIMARY KEY,
    batch_id    TEXT NOT NULL REFERENCES batches(id) ON DELETE CASCADE,
    task_id     INTEGER,
    path        TEXT NOT NULL UNIQUE,
    rel         TEXT NOT NULL,
    state       TEXT NOT NULL,
    size        INTEGER NOT NULL,
    key         TEXT NOT NULL,
    upload_id   TEXT,
    etag        TEXT,
    sha256      TEXT,
    attempts    INTEGER NOT NULL DEFAULT 0,
    not_before  REAL NOT NULL DEFAULT 0,
    last_error  TEXT,
    created_at  REAL NOT NULL,
    updated_at  REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS deliveries_batch ON deliveries(batch_id);
CREATE INDEX IF NOT EXISTS deliveries_due ON deliveries(state, not_before);
CREATE TABLE IF NOT EXISTS upload_parts (
    delivery_id INTEGER NOT NULL REFERENCES deliveries(id) ON DELETE CASCADE,
    part_number INTEGER NOT NULL,
    etag        TEXT NOT NULL,
    size        INTEGER NOT NULL,
    md5         TEXT NOT NULL,
    sent_at     REAL NOT NULL,
    PRIMARY KEY (delivery_id, part_number)
);
"""

# Operations (issue 3): when each cleanup sweep last ran, so a sweep missed while down runs once at start.
OPS_SCHEMA = """
CREATE TABLE IF NOT EXISTS cleanup_runs (
    name     TEXT PRIMARY KEY,
    last_run REAL NOT NULL,
    removed  INTEGER NOT NULL,
    bytes    INTEGER NOT NULL
);
"""

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
class Notification:
    id: int
    event_key: str
    target: str
    kind: str
    job_id: str | None
    title: str
    body: str
    body_format: str
    notify_type: str
    state: str
    attempts: int
    next_at: float
    last_error: str | None
    created_at: float
    sent_at: float | None


@dataclass(frozen=True)
class NewTask:
    name: str
    audio: str
    portrait: str
    output: str


@dataclass(frozen=True)
class Batch:
    id: str
    name: str
    folder: str
    """Folder under outputs/ holding the batch's videos ("" for loose files)."""
    job_id: str | None
    state: str
    round_at: float | None
    """job.finished_at this batch was reported for: a retried job that finishes again is reported again."""
    zip_name: str | None
    zip_key: str | None
    zip_upload_id: str | None
    zip_size: int | None
    attempts: int
    not_before: float
    last_error: dict[str, Any] | None
    created_at: float
    updated_at: float
    reported_at: float | None
    zip_sha256: str | None = None


@dataclass(frozen=True)
class Delivery:
    id: int
    batch_id: str
    task_id: int | None
    path: str
    rel: str
    """Path relative to the batch folder (the name people see and the zip entry)."""
    state: str
    size: int
    key: str
    upload_id: str | None
    etag: str | None
    sha256: str | None
    attempts: int
    not_before: float
    last_error: dict[str, Any] | None
    created_at: float
    updated_at: float


@dataclass(frozen=True)
class Part:
    number: int
    etag: str
    size: int
    md5: str
    sent_at: float


def _batch(row: sqlite3.Row) -> Batch:
    d = dict(row)
    d["last_error"] = json.loads(d["last_error"]) if d["last_error"] else None
    return Batch(**d)


def _delivery(row: sqlite3.Row) -> Delivery:
    d = dict(row)
    d["last_error"] = json.loads(d["last_error"]) if d["last_error"] else None
    return Delivery(**d)


def _job(row: sqlite3.Row) -> Job:
    d = dict(row)
    d["spec"] = json.loads(d["spec"])
    d["error"] = json.loads(d["error"]) if d["error"] else None
    return Job(**d)


def _task(row: sqlite3.Row) -> Task:
    d = dict(row)
    d["last_error"] = json.loads(d["last_error"]) if d["last_error"] else None
    return Task(**d)


def backoff_delay(attempt: int, base: float, cap: float) -> float:
    """Exponential backoff with full jitter: a crowd of retries does not come back in step."""
    return random.uniform(0.5, 1.0) * min(cap, base * (2 ** max(0, attempt - 1)))


class Store:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._local = threading.local()
        self._conn().executescript(SCHEMA)
        self._conn().executescript(OPS_SCHEMA)
        self._add_zip_sha256()

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA foreign_keys=ON")
            self._local.conn = conn
        return conn

    @contextmanager
    def tx(self) -> Iterator[sqlite3.Connection]:
        """One IMMEDIATE transaction: readers never see half a state change."""
        db = self._conn()
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    # --- jobs -------------------------------------------------------------------------------

    def create_job(self, name_hint: str, spec: dict[str, Any], fingerprint: str | None = None,
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
        return self.job(job_id)

    @staticmethod
    def _free_name(db: sqlite3.Connection, hint: str, taken: set[str]) -> str:
        n = 1
        while True:
            name = hint if n == 1 else f"{hint}-{n}"
            used = db.execute("SELECT 1 FROM jobs WHERE name = ? AND state != 'retried'", (name,)).fetchone()
            if not used and name not in taken:
                return name
            n += 1

    def job(self, job_id: str) -> Job:
        row = self._conn().execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise KeyError(job_id)
        return _job(row)

    def find_job(self, ref: str) -> Job | None:
        """A job by id, or the live job with that name."""
        db = self._conn()
        row = db.execute("SELECT * FROM jobs WHERE id = ?", (ref,)).fetchone() or db.execute(
            "SELECT * FROM jobs WHERE name = ? AND state != 'retried'", (ref,)).fetchone()
        return _job(row) if row else None

    def jobs(self, states: tuple[str, ...] | None = None, limit: int = 1000) -> list[Job]:
        db = self._conn()
        if states:
            marks = ",".join("?" * len(states))
            rows = db.execute(f"SELECT * FROM jobs WHERE state IN ({marks}) ORDER BY created_at DESC LIMIT ?",
                              (*states, limit))
        else:
            rows = db.execute("SELECT * FROM jobs ORDER BY created_at DESC LIMIT ?", (limit,))
        return [_job(r) for r in rows]

    def set_job_state(self, job_id: str, state: str, error: dict[str, Any] | None = None,
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

    def delete_job(self, job_id: str) -> None:
        with self.tx() as db:
            db.execute("DELETE FROM jobs WHERE id = ?", (job_id,))
            # A claim undone by recovery is taken again as a new job with its own messages.
            db.execute("DELETE FROM notifications WHERE job_id = ? AND state != 'sent'", (job_id,))

    def queue_job(self, job_id: str, tasks: list[NewTask]) -> None:
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

    # --- tasks ------------------------------------------------------------------------------

    def tasks(self, job_id: str | None = None, states: tuple[str, ...] | None = None) -> list[Task]:
        sql, args = "SELECT * FROM tasks WHERE 1=1", []
        if job_id:
            sql += " AND job_id = ?"
            args.append(job_id)
        if states:
            sql += f" AND state IN ({','.join('?' * len(states))})"
            args.extend(states)
        return [_task(r) for r in self._conn().execute(sql + " ORDER BY id", args)]

    def task(self, task_id: int) -> Task:
        return _task(self._conn().execute("SELECT * FROM tasks WHERE id = ?", (task_id,)).fetchone())

    def take_next_task(self, device: str) -> Task | None:
        """Atomically move the oldest runnable queued task to running on `device` and open an attempt."""
        now = time.time()
        with self.tx() as db:
            row = db.execute(
                "SELECT id FROM tasks WHERE state = 'queued' AND not_before <= ? ORDER BY id LIMIT 1", (now,)
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
        return self.task(tid)

    def next_wakeup(self) -> float | None:
        row = self._conn().execute("SELECT MIN(not_before) AS t FROM tasks WHERE state = 'queued'").fetchone()
        return row["t"]

    def set_progress(self, task_id: int, progress: float) -> None:
        with self.tx() as db:
            db.execute("UPDATE tasks SET progress = ?, updated_at = ? WHERE id = ? AND state = 'running'",
                       (progress, time.time(), task_id))

    def _end_attempt(self, db: sqlite3.Connection, task_id: int, outcome: str,
                     error: dict[str, Any] | None, now: float) -> None:
        db.execute(
            "UPDATE attempts SET ended_at = ?, outcome = ?, error = ? WHERE task_id = ? AND ended_at IS NULL",
            (now, outcome, json.dumps(error) if error else None, task_id))

    def finish_task(self, task_id: int) -> None:
        now = time.time()
        with self.tx() as db:
            self._end_attempt(db, task_id, "done", None, now)
            db.execute("UPDATE tasks SET state = 'done', progress = 1, updated_at = ?, finished_at = ?,"
                       " last_error = NULL WHERE id = ?", (now, now, task_id))

    def fail_attempt(self, task_id: int, error: dict[str, Any], retry_at: float | None) -> str:
        """Record a failed attempt; requeue at retry_at or fail for good when None. Returns the new state."""
        now = time.time()
        state = "queued" if retry_at is not None else "failed"
        with self.tx() as db:
            self._end_attempt(db, task_id, "retry" if retry_at is not None else "failed", error, now)
            db.execute(
                "UPDATE tasks SET state = ?, not_before = ?, last_error = ?, updated_at = ?, finished_at = ?"
                " WHERE id = ?",
                (state, retry_at or 0, json.dumps(error), now, None if retry_at is not None else now, task_id))
        return state

    def requeue_tasks(self, task_ids: list[int], reset_attempts: bool) -> None:
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

    # --- notification outbox ----------------------------------------------------------------

    def add_notifications(self, rows: list[NewNotification]) -> int:
        """Record messages to send; an (event, target) already recorded is left alone. Returns rows added."""
        now = time.time()
        with self.tx() as db:
            before = db.total_changes
            db.executemany(
                "INSERT OR IGNORE INTO notifications (event_key, target, kind, job_id, title, body, body_format,"
                " notify_type, state, next_at, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, 'pending', ?, ?)",
                [(r.event_key, r.target, r.kind, r.job_id, r.title, r.body, r.body_format, r.notify_type, now, now)
                 for r in rows])
            return db.total_changes - before

    def due_notifications(self, now: float, limit: int = 20) -> list[Notification]:
        rows = self._conn().execute(
            "SELECT * FROM notifications WHERE state IN ('pending', 'retrying') AND next_at <= ?"
            " ORDER BY next_at, id LIMIT ?", (now, limit))
        return [Notification(**dict(r)) for r in rows]

    def next_notification_at(self) -> float | None:
        row = self._conn().execute(
            "SELECT MIN(next_at) AS t FROM notifications WHERE state IN ('pending', 'retrying')").fetchone()
        return row["t"]

    def notifications(self, job_id: str | None = None, states: tuple[str, ...] | None = None) -> list[Notification]:
        sql, args = "SELECT * FROM notifications WHERE 1=1", []
        if job_id:
            sql += " AND job_id = ?"
            args.append(job_id)
        if states:
            sql += f" AND state IN ({','.join('?' * len(states))})"
            args.extend(states)
        return [Notification(**dict(r)) for r in self._conn().execute(sql + " ORDER BY id", args)]

    def notification_sent(self, notification_id: int) -> None:
        now = time.time()
        with self.tx() as db:
            db.execute("UPDATE notifications SET state = 'sent', attempts = attempts + 1, sent_at = ?,"
                       " last_error = NULL WHERE id = ?", (now, notification_id))

    def notification_failed(self, notification_id: int, error: str, retry_at: float | None) -> None:
        """A failed send: try again at retry_at, or give up for good when None."""
        with self.tx() as db:
            db.execute(
                "UPDATE notifications SET state = ?, attempts = attempts + 1, next_at = COALESCE(?, next_at),"
                " last_error = ? WHERE id = ?",
                ("retrying" if retry_at is not None else "gave_up", retry_at, error, notification_id))

    # --- operations: cancel, cleanup, metrics ---------------------------------------------------

    def cancel_job(self, job_id: str, error: dict[str, Any]) -> tuple[str, int]:
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
            db.execute("UPDATE jobs SET state = ?, updated_at = ? WHERE id = ?", (CANCELLING, now, job_id))
            db.execute("UPDATE tasks SET state = 'failed', last_error = ?, updated_at = ?, finished_at = ?"
                       " WHERE job_id = ? AND state = 'queued'", (json.dumps(error), now, now, job_id))
            running = db.execute("SELECT COUNT(*) AS n FROM tasks WHERE job_id = ? AND state = 'running'",
                                 (job_id,)).fetchone()["n"]
        return row["state"], running

    def job_state(self, job_id: str) -> str | None:
        row = self._conn().execute("SELECT state FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return row["state"] if row else None

    def job_counts(self) -> dict[str, int]:
        rows = self._conn().execute("SELECT state, COUNT(*) AS n FROM jobs GROUP BY state")
        return {r["state"]: r["n"] for r in rows}

    def delete_finished_jobs(self, done_before: float, failed_before: float) -> list[str]:
        """Forget finished jobs (their tasks and attempts go with them); failed ones have their own cut-off.
        Returns the names of the jobs forgotten."""
        where = "(state IN ('done', 'retried') AND finished_at < ?) OR (state = 'failed' AND finished_at < ?)"
        with self.tx() as db:
            names = [r["name"] for r in db.execute(f"SELECT name FROM jobs WHERE {where}",
                                                   (done_before, failed_before))]
            db.execute(f"DELETE FROM jobs WHERE {where}", (done_before, failed_before))
        return names

    def cleanup_runs(self) -> dict[str, float]:
        return {r["name"]: r["last_run"] for r in self._conn().execute("SELECT name, last_run FROM cleanup_runs")}

    def record_cleanup_run(self, name: str, at: float, removed: int, freed: int) -> None:
        with self.tx() as db:
            db.execute("INSERT INTO cleanup_runs (name, last_run, removed, bytes) VALUES (?, ?, ?, ?)"
                       " ON CONFLICT(name) DO UPDATE SET last_run = excluded.last_run,"
                       " removed = excluded.removed, bytes = excluded.bytes", (name, at, removed, freed))

    # --- delivery: batches ------------------------------------------------------------------

    def _add_zip_sha256(self) -> None:
        """Databases made before the zip's sha256 was kept get its column."""
        if "zip_sha256" not in {r[1] for r in self._conn().execute("PRAGMA table_info(batches)")}:
            self._conn().execute("ALTER TABLE batches ADD COLUMN zip_sha256 TEXT")

    def adhoc_batches(self, limit: int) -> list[Batch]:
        """Batches of videos other tools put into outputs/ (no job of ours), newest first."""
        rows = self._conn().execute("SELECT * FROM batches WHERE job_id IS NULL ORDER BY created_at DESC LIMIT ?",
                                    (limit,))
        return [_batch(r) for r in rows]

    def batch(self, batch_id: str) -> Batch | None:
        row = self._conn().execute("SELECT * FROM batches WHERE id = ?", (batch_id,)).fetchone()
        return _batch(row) if row else None

    def ensure_batch(self, batch_id: str, name: str, folder: str, job_id: str | None) -> Batch:
        existing = self.batch(batch_id)
        if existing is not None:
            return existing
        now = time.time()
        with self.tx() as db:
            db.execute("INSERT OR IGNORE INTO batches (id, name, folder, job_id, state, created_at, updated_at)"
                       " VALUES (?, ?, ?, ?, 'open', ?, ?)", (batch_id, name, folder, job_id, now, now))
        return self.batch(batch_id)  # type: ignore[return-value]

    def open_adhoc_batch(self, folder: str) -> Batch | None:
        row = self._conn().execute("SELECT * FROM batches WHERE folder = ? AND job_id IS NULL AND state = 'open'"
                                   " ORDER BY created_at DESC LIMIT 1", (folder,)).fetchone()
        return _batch(row) if row else None

    def open_adhoc_batches(self) -> list[Batch]:
        rows = self._conn().execute("SELECT * FROM batches WHERE job_id IS NULL AND state != 'reported'")
        return [_batch(r) for r in rows]

    def jobs_to_report(self) -> list[Job]:
        """Finished jobs (not duplicates) whose batch was not handed off yet for their latest finish."""
        rows = self._conn().execute(
            "SELECT j.* FROM jobs j LEFT JOIN batches b ON b.id = j.id WHERE j.state IN ('done', 'failed')"
            " AND j.duplicate_of IS NULL AND (b.id IS NULL OR b.state != 'reported' OR b.round_at < j.finished_at)"
            " ORDER BY j.finished_at")
        return [_job(r) for r in rows]

    def reopen_batch(self, batch_id: str) -> None:
        with self.tx() as db:
            db.execute("UPDATE batches SET state = 'open', zip_name = NULL, zip_key = NULL, zip_upload_id = NULL,"
                       " zip_size = NULL, zip_sha256 = NULL, attempts = 0, not_before = 0, updated_at = ? WHERE id = ?",
                       (time.time(), batch_id))

    def set_batch_zip(self, batch_id: str, zip_name: str, zip_key: str, upload_id: str | None) -> None:
        with self.tx() as db:
            db.execute("UPDATE batches SET zip_name = ?, zip_key = ?, zip_upload_id = ?, updated_at = ? WHERE id = ?",
                       (zip_name, zip_key, upload_id, time.time(), batch_id))

    def batch_zipped(self, batch_id: str, zip_size: int | None, zip_sha256: str | None = None) -> None:
        with self.tx() as db:
            db.execute("UPDATE batches SET state = 'zipped', zip_size = ?, zip_sha256 = ?, zip_upload_id = NULL,"
                       " last_error = NULL, updated_at = ? WHERE id = ?", (zip_size, zip_sha256, time.time(), batch_id))

    def batch_retry(self, batch_id: str, error: dict[str, Any], not_before: float) -> None:
        with self.tx() as db:
            db.execute("UPDATE batches SET attempts = attempts + 1, not_before = ?, last_error = ?, updated_at = ?"
                       " WHERE id = ?", (not_before, json.dumps(error), time.time(), batch_id))

    def mark_reported(self, batch_id: str, round_at: float | None) -> None:
        now = time.time()
        with self.tx() as db:
            db.execute("UPDATE batches SET state = 'reported', round_at = ?, reported_at = ?, updated_at = ?"
                       " WHERE id = ?", (round_at, now, now, batch_id))

    # --- delivery: files --------------------------------------------------------------------

    def task_by_output(self, path: str) -> Task | None:
        row = self._conn().execute("SELECT * FROM tasks WHERE output = ? ORDER BY id DESC LIMIT 1",
                                   (path,)).fetchone()
        return _task(row) if row else None

    def delivery_paths(self) -> set[str]:
        return {r["path"] for r in self._conn().execute("SELECT path FROM deliveries")}

    def add_delivery(self, batch_id: str, path: str, rel: str, size: int, key: str,
                     task_id: int | None) -> Delivery | None:
        """A new file to deliver; None when that path is already known (deliveries are per file, once)."""
        now = time.time()
        with self.tx() as db:
            cur = db.execute(
                "INSERT OR IGNORE INTO deliveries (batch_id, task_id, path, rel, state, size, key, created_at,"
                " updated_at) VALUES (?, ?, ?, ?, 'pending', ?, ?, ?, ?)",
                (batch_id, task_id, path, rel, size, key, now, now))
            if cur.rowcount == 0:
                return None
            db.execute("UPDATE batches SET updated_at = ? WHERE id = ?", (now, batch_id))
        return self.delivery_at(path)

    def delivery(self, delivery_id: int) -> Delivery:
        return _delivery(self._conn().execute("SELECT * FROM deliveries WHERE id = ?", (delivery_id,)).fetchone())

    def delivery_at(self, path: str) -> Delivery | None:
        row = self._conn().execute("SELECT * FROM deliveries WHERE path = ?", (path,)).fetchone()
        return _delivery(row) if row else None

    def deliveries(self, batch_id: str | None = None, folder: str | None = None) -> list[Delivery]:
        sql, args = "SELECT d.* FROM deliveries d JOIN batches b ON b.id = d.batch_id WHERE 1=1", []
        if batch_id is not None:
            sql += " AND d.batch_id = ?"
            args.append(batch_id)
        if folder is not None:
            sql += " AND b.folder = ?"
            args.append(folder)
        return [_delivery(r) for r in self._conn().execute(sql + " ORDER BY d.rel, d.id", args)]

    def due_deliveries(self, now: float) -> list[Delivery]:
        # 'uploaded': the object is in the bucket but a crash came before it was linked; linking is what is left.
        rows = self._conn().execute("SELECT * FROM deliveries WHERE state IN ('pending', 'uploading', 'uploaded')"
                                    " AND not_before <= ? ORDER BY id", (now,))
        return [_delivery(r) for r in rows]

    def wake_deliveries(self) -> None:
        """Start-up: whatever waited for a retry (endpoint down, bad credentials) is tried again now."""
        with self.tx() as db:
            db.execute("UPDATE deliveries SET not_before = 0 WHERE state IN ('pending', 'uploading')")
            db.execute("UPDATE batches SET not_before = 0 WHERE state != 'reported'")

    def start_upload(self, delivery_id: int, upload_id: str) -> None:
        """A fresh multipart upload: its id is recorded before any part is sent, old parts are forgotten."""
        with self.tx() as db:
            db.execute("DELETE FROM upload_parts WHERE delivery_id = ?", (delivery_id,))
            db.execute("UPDATE deliveries SET state = 'uploading', upload_id = ?, updated_at = ? WHERE id = ?",
                       (upload_id, time.time(), delivery_id))

    def add_parts(self, delivery_id: int, parts: list[Part]) -> None:
        """Parts the server confirmed, in one transaction (parts that land together cost one commit)."""
        with self.tx() as db:
            db.executemany("INSERT OR REPLACE INTO upload_parts (delivery_id, part_number, etag, size, md5, sent_at)"
                           " VALUES (?, ?, ?, ?, ?, ?)",
                           [(delivery_id, p.number, p.etag, p.size, p.md5, p.sent_at) for p in parts])

    def parts(self, delivery_id: int) -> list[Part]:
        rows = self._conn().execute("SELECT part_number, etag, size, md5, sent_at FROM upload_parts"
                                    " WHERE delivery_id = ? ORDER BY part_number", (delivery_id,))
        return [Part(r[0], r[1], r[2], r[3], r[4]) for r in rows]

    def forget_parts(self, delivery_id: int, numbers: list[int]) -> None:
        with self.tx() as db:
            db.executemany("DELETE FROM upload_parts WHERE delivery_id = ? AND part_number = ?",
                           [(delivery_id, n) for n in numbers])

    def finish_upload(self, delivery_id: int, etag: str | None, sha256: str) -> None:
        with self.tx() as db:
            db.execute("UPDATE deliveries SET state = 'uploaded', etag = ?, sha256 = ?, upload_id = NULL,"
                       " last_error = NULL, updated_at = ? WHERE id = ?", (etag, sha256, time.time(), delivery_id))

    def mark_linked(self, delivery_ids: list[int]) -> None:
        with self.tx() as db:
            db.executemany("UPDATE deliveries SET state = 'linked', updated_at = ? WHERE id = ?",
                           [(time.time(), i) for i in delivery_ids])

    def delivery_retry(self, delivery_id: int, error: dict[str, Any], not_before: float,
                       state: str | None = None) -> None:
        with self.tx() as db:
            db.execute("UPDATE deliveries SET attempts = attempts + 1, not_before = ?, last_error = ?,"
                       " state = COALESCE(?, state), updated_at = ? WHERE id = ?",
                       (not_before, json.dumps(error), state, time.time(), delivery_id))

    def uploaded_deliveries(self, updated_before: float) -> list[Delivery]:
        """Videos whose object is in the bucket (linked, with a key) and untouched since the cut-off."""
        rows = self._conn().execute("SELECT * FROM deliveries WHERE state = 'linked' AND key != ''"
                                    " AND updated_at < ? ORDER BY id", (updated_before,))
        return [_delivery(r) for r in rows]

    def zipped_batches(self, zipped_before: float) -> list[Batch]:
        rows = self._conn().execute("SELECT * FROM batches WHERE zip_name IS NOT NULL AND state != 'open'"
                                    " AND COALESCE(reported_at, updated_at) < ? ORDER BY created_at",
                                    (zipped_before,))
        return [_batch(r) for r in rows]

    def forget_zip(self, batch_id: str) -> None:
        with self.tx() as db:
            db.execute("UPDATE batches SET zip_name = NULL, zip_key = NULL, zip_size = NULL, zip_sha256 = NULL"
                       " WHERE id = ?",
                       (batch_id,))

    def known_upload_ids(self) -> set[str]:
        db = self._conn()
        ids = {r[0] for r in db.execute("SELECT upload_id FROM deliveries WHERE upload_id IS NOT NULL")}
        return ids | {r[0] for r in db.execute("SELECT zip_upload_id FROM batches WHERE zip_upload_id IS NOT NULL")}

    def delivery_summary(self, batch_id: str) -> dict[str, Any] | None:
        batch = self.batch(batch_id)
        if batch is None:
            return None
        rows = self._conn().execute("SELECT state, COUNT(*) AS n FROM deliveries WHERE batch_id = ? GROUP BY state",
                                    (batch_id,))
        return {"state": batch.state, "files": {r["state"]: r["n"] for r in rows}, "zip": batch.zip_name}
