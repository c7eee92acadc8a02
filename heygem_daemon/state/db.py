"""The database: one SQLite file in WAL mode, a connection per thread, versioned migrations.

`PRAGMA user_version` says which migrations a database has had. A database made before versioning
(user_version 0) already holds the tables of migrations 1 and 2; their `IF NOT EXISTS` makes them no-ops
there, so upgrading keeps every job. Add a migration by appending to MIGRATIONS: never edit one that shipped.
"""

from __future__ import annotations

import sqlite3
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

V1_CORE = """
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
    reported_at   REAL
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

# Operations: when each cleanup sweep last ran, so a sweep missed while down runs once at start.
V2_CLEANUP_RUNS = """
CREATE TABLE IF NOT EXISTS cleanup_runs (
    name     TEXT PRIMARY KEY,
    last_run REAL NOT NULL,
    removed  INTEGER NOT NULL,
    bytes    INTEGER NOT NULL
);
"""

# Engine heygem: each code submitted (or staged) per data folder, until the service has forgotten it and
# `<temp>/<code>*` is gone. `service` is NULL while only staged, never submitted.
V3_HEYGEM_CODES = """
CREATE TABLE IF NOT EXISTS heygem_codes (
    code       TEXT NOT NULL,
    temp       TEXT NOT NULL,
    task_id    INTEGER NOT NULL,
    service    TEXT,
    created_at REAL NOT NULL,
    PRIMARY KEY (code, temp)
);
"""
# Delivery: the batch zip's sha256, computed while it is written (links.json lists it).
V4_ZIP_SHA256 = "ALTER TABLE batches ADD COLUMN zip_sha256 TEXT;"
MIGRATIONS: list[str] = [V1_CORE, V2_CLEANUP_RUNS, V3_HEYGEM_CODES, V4_ZIP_SHA256]


class Database:
    """Connections for the calling thread, and IMMEDIATE transactions: readers never see half a change."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._local = threading.local()
        migrate(self.conn())

    def conn(self) -> sqlite3.Connection:
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
        db = self.conn()
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


def migrate(conn: sqlite3.Connection) -> int:
    """Bring the schema up to date; returns the version it is at."""
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
        # executescript commits first; the version is bumped in the same script so a crash re-runs it whole.
        conn.executescript(f"BEGIN;\n{script}\nPRAGMA user_version = {number};\nCOMMIT;")
    return len(MIGRATIONS)


class Repository:
    """Base of the repositories: each owns the SQL of one aggregate, over the shared Database."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def _conn(self) -> sqlite3.Connection:
        return self.db.conn()

    def tx(self):  # type: ignore[no-untyped-def]
        return self.db.tx()
