"""The database: one SQLite file in WAL mode, a connection per thread, versioned migrations.

`PRAGMA user_version` says which migrations a database has had. A database made before versioning
(user_version 0) already holds the tables of migrations 1 and 2; their `IF NOT EXISTS` makes them no-ops
there, so upgrading keeps every job. Add a migration by appending to MIGRATIONS: never edit one that shipped.

Each migration runs in one IMMEDIATE transaction with foreign keys off (SQLite's documented way to rebuild
a table, which is how a foreign key is added) and `PRAGMA foreign_key_check` before it commits: a crash
re-runs it whole, a second process waits and then finds it done, and a violation leaves the database as it was.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, NoReturn

from heygem_daemon.log import Reported

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

# Foreign keys with cascade where a row has a parent: a job's batch (ad-hoc batches have no job) and a
# delivery's task (kept as NULL when the task goes: the file was delivered all the same). Notifications
# have none: their subject is a job or an ad-hoc batch, so they go by age and with their job (cleanup).
# `delivered` remembers, by path, videos whose delivery rows were forgotten while the file is still in
# outputs/, so the outputs rescan never delivers them again; a marker goes once its file is gone.
# Rows that point at a parent an older row sweep deleted are kept and detached (job_id/task_id NULL).
V3_FOREIGN_KEYS = """
CREATE TABLE batches_v3 (
    id            TEXT PRIMARY KEY,
    name          TEXT NOT NULL,
    folder        TEXT NOT NULL,
    job_id        TEXT REFERENCES jobs(id) ON DELETE CASCADE,
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
INSERT INTO batches_v3 SELECT id, name, folder, (SELECT j.id FROM jobs j WHERE j.id = b.job_id), state, round_at,
    zip_name, zip_key, zip_upload_id, zip_size, attempts, not_before, last_error, created_at, updated_at, reported_at
    FROM batches b;
DROP TABLE batches;
ALTER TABLE batches_v3 RENAME TO batches;
CREATE INDEX batches_state ON batches(state, job_id);
CREATE INDEX batches_job ON batches(job_id);
CREATE TABLE deliveries_v3 (
    id          INTEGER PRIMARY KEY,
    batch_id    TEXT NOT NULL REFERENCES batches(id) ON DELETE CASCADE,
    task_id     INTEGER REFERENCES tasks(id) ON DELETE SET NULL,
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
INSERT INTO deliveries_v3 SELECT d.id, d.batch_id, (SELECT t.id FROM tasks t WHERE t.id = d.task_id), d.path, d.rel,
    d.state, d.size, d.key, d.upload_id, d.etag, d.sha256, d.attempts, d.not_before, d.last_error, d.created_at,
    d.updated_at FROM deliveries d WHERE d.batch_id IN (SELECT id FROM batches);
DROP TABLE deliveries;
ALTER TABLE deliveries_v3 RENAME TO deliveries;
CREATE INDEX deliveries_batch ON deliveries(batch_id);
CREATE INDEX deliveries_due ON deliveries(state, not_before);
CREATE INDEX deliveries_task ON deliveries(task_id);
DELETE FROM upload_parts WHERE delivery_id NOT IN (SELECT id FROM deliveries);
CREATE INDEX notifications_job ON notifications(job_id);
CREATE INDEX notifications_ended ON notifications(state, created_at);
CREATE TABLE delivered (
    path      TEXT PRIMARY KEY,
    size      INTEGER NOT NULL,
    marked_at REAL NOT NULL
);
"""

# Engine heygem: each code submitted (or staged) per data folder, until the service has forgotten it and
# `<temp>/<code>*` is gone. `service` is NULL while only staged, never submitted.
V4_HEYGEM_CODES = """
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
V5_ZIP_SHA256 = "ALTER TABLE batches ADD COLUMN zip_sha256 TEXT;"
# Web console: the jobs list pages newest first, all or by state, without sorting the whole table.
V6_JOBS_PAGING = """
CREATE INDEX IF NOT EXISTS jobs_created ON jobs(created_at);
CREATE INDEX IF NOT EXISTS jobs_state_created ON jobs(state, created_at);
"""
# Remote generation: the Celery id of an attempt sent to another host, so a restarted daemon picks the
# render up where it runs instead of sending it again.
V7_REMOTE_ATTEMPTS = "ALTER TABLE attempts ADD COLUMN remote_id TEXT;"
# Remote workers uploading straight to S3 (workers.remote.transfer: s3): each task's object key, fixed at its
# first send, so every attempt on any host writes the same object (one object, ever).
V8_TASK_OBJECT_KEY = "ALTER TABLE tasks ADD COLUMN object_key TEXT;"
# Web console: logged-in sessions, so a logout, a password change or `web sessions revoke` ends them on the
# server (the cookie holds the session id; only its sha256 is kept here), and who handed each job over from
# the web (by job name: the hand-over picks a name free in the store; the row goes with the job's row).
V9_WEB_SESSIONS = """
CREATE TABLE web_sessions (
    id_sha256  TEXT PRIMARY KEY,
    user       TEXT NOT NULL,
    password_tag TEXT NOT NULL,
    address    TEXT,
    created_at REAL NOT NULL,
    expires_at REAL NOT NULL
);
CREATE INDEX web_sessions_user ON web_sessions(user);
CREATE TABLE web_owners (
    job_name  TEXT PRIMARY KEY,
    user      TEXT NOT NULL,
    handed_at REAL NOT NULL
);
"""
# HTTP API (/api/v1): bearer tokens (only the sha256 of each token is kept; the token is shown once), and
# each Idempotency-Key a token used with the digest of its body and the job it made (24 h), so a client's
# retry returns the first job even after the web process restarts.
V10_API_TOKENS = """
CREATE TABLE api_tokens (
    name         TEXT PRIMARY KEY,
    user         TEXT NOT NULL,
    scopes       TEXT NOT NULL,
    token_sha256 TEXT NOT NULL UNIQUE,
    created_at   REAL NOT NULL,
    last_used_at REAL,
    revoked_at   REAL
);
CREATE TABLE api_idempotency (
    token_name  TEXT NOT NULL,
    key         TEXT NOT NULL,
    body_sha256 TEXT NOT NULL,
    job_name    TEXT,
    created_at  REAL NOT NULL,
    PRIMARY KEY (token_name, key)
);
CREATE INDEX api_idempotency_created ON api_idempotency(created_at);
"""
# Webhooks: a token's callback URL and signing secret (kept as is: it must sign; the previous one signs too until
# previous_until, for a rotation), and which token handed a job over (its callback is the job's).
V11_WEBHOOKS = """
ALTER TABLE api_tokens ADD COLUMN callback_url TEXT;
ALTER TABLE api_tokens ADD COLUMN webhook_secret TEXT;
ALTER TABLE api_tokens ADD COLUMN previous_secret TEXT;
ALTER TABLE api_tokens ADD COLUMN previous_until REAL;
ALTER TABLE web_owners ADD COLUMN token TEXT;
"""
MIGRATIONS: list[str] = [V1_CORE, V2_CLEANUP_RUNS, V3_FOREIGN_KEYS, V4_HEYGEM_CODES, V5_ZIP_SHA256, V6_JOBS_PAGING,
                         V7_REMOTE_ATTEMPTS, V8_TASK_OBJECT_KEY, V9_WEB_SESSIONS, V10_API_TOKENS, V11_WEBHOOKS]


BACKUP_SUFFIX = ".bak"
# SQLite's primary result codes for a damaged file (extended codes keep them in the low byte).
_DAMAGED = (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB)


class DatabaseDamaged(Reported, sqlite3.DatabaseError):
    """The state database cannot be read: one line that says what, where the backup is and how to recover."""

    def __init__(self, path: Path, cause: BaseException) -> None:
        backup = backup_path(path)
        if backup.is_file():
            made = time.strftime("%Y-%m-%d %H:%M", time.localtime(backup.stat().st_mtime))
            recover = (f"to recover, stop the daemon, move {path.name} (and {path.name}-wal, {path.name}-shm) aside"
                       f" and copy the backup {backup} (made {made}) to {path}; jobs claimed after the backup are"
                       f" not in it")
        else:
            recover = (f"there is no backup yet ({backup}); move {path.name} (and {path.name}-wal, {path.name}-shm)"
                       f" aside and start again with an empty database (the history of past jobs is lost)")
        super().__init__(f"the state database {path} is damaged ({cause}); {recover}")


class StateFull(Reported, sqlite3.OperationalError):
    """SQLite cannot write: the state folder's disk is full. Nothing was written; the same call succeeds
    once there is room again (`Database.full_since` says since when)."""


def _code(exc: BaseException) -> int | None:
    code = getattr(exc, "sqlite_errorcode", None)
    return code & 0xFF if isinstance(exc, sqlite3.DatabaseError) and code is not None else None


def damaged(exc: BaseException) -> bool:
    return _code(exc) in _DAMAGED


def backup_path(path: Path) -> Path:
    return path.with_name(path.name + BACKUP_SUFFIX)


def quick_check(path: Path) -> list[str]:
    """SQLite's `PRAGMA quick_check` on the file, read-only: [] when sound, else what it found."""
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30.0)
        try:
            rows = [r[0] for r in conn.execute("PRAGMA quick_check")]
        finally:
            conn.close()
    except sqlite3.DatabaseError as exc:
        return [str(exc)]
    return [] if rows == ["ok"] else rows


def _translating(method: Callable[..., Any]) -> Callable[..., Any]:
    """`method` of sqlite3.Cursor, its errors said as they matter to the daemon (`Database.translate`). A plain
    try block: a query costs next to nothing more when all is well."""
    def call(self: sqlite3.Cursor, *args: Any) -> Any:
        try:
            return method(self, *args)
        except sqlite3.DatabaseError as exc:
            _reraise(self, exc)
    return call


class _Cursor(sqlite3.Cursor):
    """Every statement and every fetch (SQLite reads pages while it steps) goes through `_translating`."""

    __slots__ = ()
    execute = _translating(sqlite3.Cursor.execute)
    executemany = _translating(sqlite3.Cursor.executemany)
    executescript = _translating(sqlite3.Cursor.executescript)
    fetchone = _translating(sqlite3.Cursor.fetchone)
    fetchmany = _translating(sqlite3.Cursor.fetchmany)
    fetchall = _translating(sqlite3.Cursor.fetchall)
    __next__ = _translating(sqlite3.Cursor.__next__)


class _Connection(sqlite3.Connection):
    """A connection whose cursors are `_Cursor`s. The C-level shortcuts would make plain ones, so they are
    routed here, through `Connection.cursor` (which hands the cursor the row factory)."""

    owner: "Database | None" = None

    def cursor(self, factory: Any = _Cursor) -> Any:
        return sqlite3.Connection.cursor(self, factory)

    def execute(self, *args: Any) -> Any:
        return sqlite3.Connection.cursor(self, _Cursor).execute(*args)

    def executemany(self, *args: Any) -> Any:
        return sqlite3.Connection.cursor(self, _Cursor).executemany(*args)

    def executescript(self, *args: Any) -> Any:
        return sqlite3.Connection.cursor(self, _Cursor).executescript(*args)


def _reraise(cursor: sqlite3.Cursor, exc: sqlite3.DatabaseError) -> NoReturn:
    owner = getattr(cursor.connection, "owner", None)
    meant = owner.translate(exc) if owner is not None else exc
    if meant is exc:
        raise exc
    raise meant from exc


class Database:
    """Connections for the calling thread, and IMMEDIATE transactions: readers never see half a change.

    Answers of SQLite that concern the whole daemon are translated wherever they come up, in any thread: a
    damaged page (SQLITE_CORRUPT, SQLITE_NOTADB) raises `DatabaseDamaged`, kept in `damage` (the daemon stops,
    exit 2); a full disk (SQLITE_FULL) raises `StateFull` and sets `full_since` (an outage the daemon waits
    out; `writable_again` clears it)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._local = threading.local()
        self.damage: DatabaseDamaged | None = None
        self.full_since: float | None = None
        try:
            migrate(self.conn())
        except DatabaseDamaged:
            self.close()
            raise

    def translate(self, exc: sqlite3.DatabaseError) -> sqlite3.DatabaseError:
        code = _code(exc)
        if code in _DAMAGED:
            return self._damaged(exc)
        if code == sqlite3.SQLITE_FULL:
            if self.full_since is None:
                self.full_since = time.time()
            return StateFull(str(exc))
        return exc

    def _damaged(self, cause: BaseException) -> DatabaseDamaged:
        found = DatabaseDamaged(self.path, cause)
        self.damage = self.damage or found
        return found

    def writable_again(self) -> None:
        """The daemon found room on the state disk again: writes go ahead."""
        self.full_since = None

    def backup(self) -> Path:
        """An online copy (SQLite's backup API, consistent while others write) beside the database, swapped
        in only once complete and checked, so a crash or a damaged source never costs the last good one. A
        copy that fails is removed at once (on a full state disk it would hold the space everyone needs);
        damage the copy reveals is the database's own: `DatabaseDamaged`."""
        target = backup_path(self.path)
        tmp = target.with_name(f".{target.name}.tmp")  # one daemon per state folder: a fixed name is ours
        tmp.unlink(missing_ok=True)
        try:
            dest = sqlite3.connect(tmp)
            try:
                self.conn().backup(dest)
                problems = [r[0] for r in dest.execute("PRAGMA quick_check")]
            finally:
                dest.close()
            if problems != ["ok"]:
                raise self._damaged(sqlite3.DatabaseError(f"a copy failed its quick_check: {problems[:3]}"))
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except BaseException as exc:
            tmp.unlink(missing_ok=True)
            if damaged(exc):
                raise self._damaged(exc) from exc
            raise
        os.replace(tmp, target)
        return target

    def conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=30.0, isolation_level=None, factory=_Connection)
            conn.owner = self
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
            db.execute("COMMIT")
        except BaseException:
            # SQLite may have rolled back by itself (a full disk), or left a failed COMMIT open: either way the
            # connection must come out of it without a transaction, or every later BEGIN fails.
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None


class MigrationError(sqlite3.DatabaseError):
    pass


def _statements(script: str) -> Iterator[str]:
    buf = ""
    for line in script.splitlines(keepends=True):
        buf += line
        if sqlite3.complete_statement(buf):
            yield buf
            buf = ""


def _version(conn: sqlite3.Connection) -> int:
    return int(conn.execute("PRAGMA user_version").fetchone()[0])


def migrate(conn: sqlite3.Connection) -> int:
    """Bring the schema up to date; returns the version it is at."""
    if _version(conn) >= len(MIGRATIONS):
        return _version(conn)
    conn.execute("PRAGMA foreign_keys=OFF")  # a no-op inside a transaction: set before BEGIN
    try:
        for number, script in enumerate(MIGRATIONS, start=1):
            conn.execute("BEGIN IMMEDIATE")
            try:
                if _version(conn) < number:  # another process may have run it while this one waited
                    for statement in _statements(script):
                        conn.execute(statement)
                    broken = conn.execute("PRAGMA foreign_key_check").fetchall()
                    if broken:
                        raise MigrationError(f"migration {number} would break {len(broken)} references "
                                             f"(first: {tuple(broken[0])})")
                    conn.execute(f"PRAGMA user_version = {number}")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
    finally:
        conn.execute("PRAGMA foreign_keys=ON")
    return _version(conn)


def decoded(row: sqlite3.Row, *json_columns: str) -> dict[str, Any]:
    """A row as a dict, its JSON columns parsed (NULL stays None)."""
    d = dict(row)
    for column in json_columns:
        d[column] = json.loads(d[column]) if d[column] else None
    return d


def job_and_states(sql: str, job_id: str | None, states: tuple[str, ...] | None) -> tuple[str, list[Any]]:
    """`sql` (ending in a WHERE clause) narrowed to one job and to some states, with its arguments."""
    args: list[Any] = []
    if job_id:
        sql += " AND job_id = ?"
        args.append(job_id)
    if states:
        sql += f" AND state IN ({','.join('?' * len(states))})"
        args.extend(states)
    return sql, args


class Repository:
    """Base of the repositories: each owns the SQL of one aggregate, over the shared Database."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def _conn(self) -> sqlite3.Connection:
        return self.db.conn()

    def tx(self):  # type: ignore[no-untyped-def]
        return self.db.tx()
