"""The schema is versioned: a database made by an earlier release is upgraded in place and keeps its rows."""

import hashlib
import sqlite3
from pathlib import Path

import pytest

from heygem_daemon.state import Store
from heygem_daemon.state.db import MIGRATIONS, V1_CORE, V2_CLEANUP_RUNS, MigrationError, migrate

V0_ROWS = Path(__file__).parent / "fixtures" / "store_v0_rows.sql"
# The release before versioning (c7f2554, store.py SCHEMA + OPS_SCHEMA) is, character for character,
# migrations 1 and 2: shipped migrations are never edited, and this digest says so.
SHIPPED_V1_V2_SHA256 = "f1bb3171d5be8bc671d506604a11873db9a98300a33260f6459ad582f73f8853"


def v0_database(path: Path) -> Path:
    """A database as that release made it: its schema, no user_version, and rows it held."""
    conn = sqlite3.connect(path)
    conn.executescript(V1_CORE + V2_CLEANUP_RUNS + V0_ROWS.read_text())
    conn.close()
    return path


def test_shipped_migrations_are_never_edited():
    assert hashlib.sha256((V1_CORE + V2_CLEANUP_RUNS).encode()).hexdigest() == SHIPPED_V1_V2_SHA256


def test_database_of_the_release_before_versioning_is_upgraded_and_keeps_its_jobs(tmp_path):
    store = Store(v0_database(tmp_path / "heygem.db"))
    assert store.db.conn().execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
    assert {j.name: j.state for j in store.jobs.select()} == {"alice": "done", "bob": "queued"}
    assert [t.name for t in store.tasks.select(states=("queued",))] == ["b__q"]
    assert store.deliveries.at("/srv/outputs/alice/a__p.mp4").state == "linked"
    assert [p.number for p in store.deliveries.parts(1)] == [1]
    assert store.outbox.select()[0].state == "sent"
    assert store.ops.cleanup_runs() == {"rows": 1700000000.0}


def test_upgraded_database_keeps_rows_whose_parent_an_old_sweep_deleted_detached(tmp_path):
    store = Store(v0_database(tmp_path / "heygem.db"))
    orphan = store.deliveries.batch("999999999999")
    assert orphan is not None and orphan.job_id is None
    assert store.deliveries.at("/srv/outputs/gone/old.mp4").task_id is None


def test_deleting_a_job_cascades_to_its_batch_deliveries_and_parts(tmp_path):
    store = Store(v0_database(tmp_path / "heygem.db"))
    store.jobs.delete("a1b2c3d4e5f6")
    db = store.db.conn()
    assert store.deliveries.batch("a1b2c3d4e5f6") is None
    assert db.execute("SELECT COUNT(*) FROM deliveries WHERE batch_id = 'a1b2c3d4e5f6'").fetchone()[0] == 0
    assert db.execute("SELECT COUNT(*) FROM upload_parts").fetchone()[0] == 0
    assert db.execute("SELECT COUNT(*) FROM attempts").fetchone()[0] == 0


def test_a_batch_for_a_job_that_does_not_exist_is_refused(tmp_path):
    store = Store(tmp_path / "heygem.db")
    with pytest.raises(sqlite3.IntegrityError):
        store.deliveries.ensure_batch("nojob", "x", "x", "nojob")


def test_upgrade_is_done_once_when_several_connections_open_the_old_database(tmp_path):
    path = v0_database(tmp_path / "heygem.db")
    first, second = Store(path), Store(path)
    assert [j.name for j in second.jobs.select()] == [j.name for j in first.jobs.select()]
    assert migrate(second.db.conn()) == len(MIGRATIONS)


def test_a_migration_that_would_break_references_leaves_the_database_as_it_was(tmp_path, monkeypatch):
    path = v0_database(tmp_path / "heygem.db")
    monkeypatch.setattr("heygem_daemon.state.db.MIGRATIONS",
                        [*MIGRATIONS, "INSERT INTO tasks (job_id, name, audio, portrait, output, state, updated_at)"
                                      " VALUES ('nojob', 'x', 'a', 'p', 'o', 'queued', 0);"])
    with pytest.raises(MigrationError):
        Store(path)
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
    assert conn.execute("SELECT COUNT(*) FROM tasks WHERE job_id = 'nojob'").fetchone()[0] == 0
