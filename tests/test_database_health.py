"""A damaged state database stops the daemon with one line naming the backup; doctor checks the database."""

from __future__ import annotations

import json
import signal
import sqlite3

import pytest

from heygem_daemon.cli import EXIT_CONFIG, main
from heygem_daemon.config import load_config
from heygem_daemon.ops.cleanup import SWEEPS, Cleanup
from heygem_daemon.ops.doctor import database_checks
from heygem_daemon.state import Store
from heygem_daemon.state.db import DatabaseDamaged, backup_path


@pytest.fixture
def config(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("base_dir: .\nlogging: {console: false}\n")
    return path


def db_path(config):
    return load_config(config, environ={}).folder("state") / "heygem.db"


def damage(path):
    path.write_bytes(b"this is not an SQLite file " * 200)
    for suffix in ("-wal", "-shm"):
        path.with_name(path.name + suffix).unlink(missing_ok=True)


def damage_page(path, table):
    """Overwrite the root page of one table (found through sqlite_master) of a database with some rows."""
    store = Store(path)
    for n in range(50):
        store.jobs.create(f"job{n}", {"pad": "x" * 300})
    store.close()
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    (root,) = conn.execute("SELECT rootpage FROM sqlite_master WHERE name = ?", (table,)).fetchone()
    (page_size,) = conn.execute("PRAGMA page_size").fetchone()
    conn.close()
    with open(path, "r+b") as fh:
        fh.seek((root - 1) * page_size)
        fh.write(b"\xa5" * page_size)


def test_backup_sweep_makes_a_consistent_copy_that_opens_with_its_jobs(config):
    cfg = load_config(config, environ={})
    store = Store(db_path(config))
    store.jobs.create("alice", {})
    Cleanup(cfg, store).run(next(s for s in SWEEPS if s.name == "backup"))
    copy = Store(backup_path(db_path(config)))
    assert [j.name for j in copy.jobs.select()] == ["alice"]


def test_a_damaged_database_says_what_where_the_backup_is_and_how_to_restore(config):
    store = Store(db_path(config))
    store.db.backup()
    store.close()
    damage(db_path(config))
    with pytest.raises(DatabaseDamaged) as caught:
        Store(db_path(config))
    message = str(caught.value)
    assert str(db_path(config)) in message and "damaged" in message
    assert f"copy the backup {backup_path(db_path(config))}" in message


def test_without_a_backup_the_message_says_how_to_start_afresh(config):
    db_path(config).parent.mkdir(parents=True, exist_ok=True)
    damage(db_path(config))
    with pytest.raises(DatabaseDamaged, match="no backup yet"):
        Store(db_path(config))


@pytest.fixture
def keep_signal_handlers():
    """`run` installs the daemon's handlers in this process: put pytest's back afterwards."""
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


def test_status_on_a_damaged_database_exits_2_without_a_traceback(config, capsys):
    db_path(config).parent.mkdir(parents=True, exist_ok=True)
    damage(db_path(config))
    assert main(["-c", str(config), "status"]) == EXIT_CONFIG
    assert capsys.readouterr().err.startswith("error: the state database")


def test_doctor_fails_the_database_check_on_a_damaged_file_and_passes_a_sound_one(config):
    cfg = load_config(config, environ={})
    Store(db_path(config)).close()
    (ok,) = database_checks(cfg)
    assert ok.ok and "quick_check ok" in ok.detail
    damage(db_path(config))
    (bad,) = database_checks(cfg)
    assert not bad.ok and "not a database" in bad.detail and "aside" in bad.fix


def test_the_backup_is_not_replaced_by_a_copy_of_a_database_damaged_in_use(config):
    store = Store(db_path(config))
    for n in range(300):
        store.jobs.create(f"job{n}", {"pad": "x" * 200})
    good = store.db.backup().read_bytes()
    store.close()
    with open(db_path(config), "r+b") as fh:  # a page in the middle goes bad; the header still reads
        fh.seek(4096 * 5)
        fh.write(b"\xff" * 4096)
    with pytest.raises(sqlite3.DatabaseError):
        Store(db_path(config)).db.backup()
    assert backup_path(db_path(config)).read_bytes() == good


def test_status_on_a_database_with_a_damaged_jobs_page_exits_2_with_one_line(config, capsys):
    db_path(config).parent.mkdir(parents=True, exist_ok=True)
    damage_page(db_path(config), "jobs")
    assert main(["-c", str(config), "status"]) == EXIT_CONFIG
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: the state database") and "no backup yet" in err[0]


@pytest.mark.parametrize("damaged, when", [
    (damage, "cannot start"),  # the whole file: opening it fails
    (lambda path: damage_page(path, "jobs"), "cannot start"),  # jobs' root page, read by recovery
    (lambda path: damage_page(path, "notifications"), "stopping"),  # found later, by the backup's check
], ids=["whole file", "jobs page", "another table's page"])
def test_run_on_a_damaged_database_exits_2_with_one_line_in_the_log_and_on_stderr(config, capsys,
                                                                                  keep_signal_handlers, damaged, when):
    db_path(config).parent.mkdir(parents=True, exist_ok=True)
    damaged(db_path(config))
    assert main(["-c", str(config), "run"]) == EXIT_CONFIG
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: the state database") and "Traceback" not in err[0]
    log = load_config(config, environ={}).folder("logs") / "heygem.log"
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert [line["event"] for line in lines if line["level"] == "error"] == [f"{when}: the state database is damaged"]
