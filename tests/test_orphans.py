"""Inputs under work/ that the store does not know (a database restored without its WAL) are never deleted."""

from __future__ import annotations

import json
import shutil
import time

import pytest

from heygem_daemon.config import load_config
from heygem_daemon.log import LOG_FILE, setup_logging
from heygem_daemon.ops.cleanup import DAY, Sweep, sweep_work
from heygem_daemon.ops.orphans import rescue_unknown_inputs
from heygem_daemon.state import NewTask, Store


@pytest.fixture
def cfg(tmp_path):
    (tmp_path / "base").mkdir()
    path = tmp_path / "config.yaml"
    path.write_text("base_dir: base\n")
    cfg = load_config(path, environ={})
    setup_logging(cfg.folder("logs"), "info", console=False)
    yield cfg
    setup_logging(None, "info", console=False)


def claimed_then_db_restored_alone(cfg, folder_files: dict[str, bytes]) -> tuple[str, Store]:
    """A job claimed (row in the WAL only), then heygem.db copied back without heygem.db-wal."""
    db = cfg.folder("state") / "heygem.db"
    store = Store(db)
    job = store.jobs.create("alice", {"sources": list(folder_files)})
    staging = cfg.folder("work") / job.id / "in"
    staging.mkdir(parents=True)
    for name, data in folder_files.items():
        (staging / name).write_bytes(data)
    store.jobs.queue(job.id, [NewTask("alice", "alice.wav", "alice.jpg", "out.mp4")])
    backup = cfg.folder("state") / "backup.db"
    shutil.copyfile(db, backup)  # the main file alone: the WAL still holds the job
    store.close()
    for leftover in cfg.folder("state").glob("heygem.db*"):
        leftover.unlink()
    backup.rename(db)
    restored = Store(db)
    assert restored.jobs.state(job.id) is None
    return job.id, restored


def errors(cfg) -> list[dict]:
    lines = (cfg.folder("logs") / LOG_FILE).read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["level"] == "error"]


def test_start_up_sends_a_lost_jobs_loose_pair_back_to_the_inbox_and_says_so(cfg):
    job_id, store = claimed_then_db_restored_alone(cfg, {"alice.wav": b"RIFF" * 100, "alice.jpg": b"\xff\xd8" * 50})
    went = rescue_unknown_inputs(cfg, store)
    inbox = cfg.folder("inbox")
    assert went == [inbox]
    assert (inbox / "alice.wav").read_bytes() == b"RIFF" * 100 and (inbox / "alice.jpg").exists()
    [line] = errors(cfg)
    assert line["job_id"] == job_id and line["files"] == ["alice.jpg", "alice.wav"] and line["moved_to"] == str(inbox)


def test_the_work_sweep_never_deletes_a_lost_jobs_inputs(cfg):
    files = {"a.wav": b"RIFF" * 10, "b.wav": b"RIFF" * 20, "p.jpg": b"\xff\xd8"}
    job_id, store = claimed_then_db_restored_alone(cfg, files)
    sweep = Sweep(cfg, store, time.time() + 100 * DAY)
    sweep_work(sweep)
    back = cfg.folder("inbox") / f"recovered-{job_id}"
    assert {p.name: p.read_bytes() for p in back.iterdir()} == files
    assert not (cfg.folder("work") / job_id).exists()
    assert len(errors(cfg)) == 1


def test_lost_inputs_whose_names_the_inbox_already_holds_go_to_failed_with_a_reason(cfg):
    job_id, store = claimed_then_db_restored_alone(cfg, {"a.wav": b"1", "b.wav": b"2", "p.jpg": b"3"})
    (cfg.folder("inbox") / f"recovered-{job_id}").mkdir()
    [went] = rescue_unknown_inputs(cfg, store)
    assert went == cfg.folder("failed") / f"recovered-{job_id}"
    record = json.loads((went / "error.json").read_text())
    assert "database did not know" in record["reason"] and "inbox" in record["hint"]
    assert sorted(p.name for p in went.iterdir()) == ["a.wav", "b.wav", "error.json", "p.jpg"]
