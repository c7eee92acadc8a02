"""A full state disk (the database's own filesystem, a real small tmpfs here): an outage of the whole daemon —
found, waited out without losing or misplacing an outcome, and left by itself once there is room."""

from __future__ import annotations

import errno
import json
import os
import threading
import time
from pathlib import Path

import pytest

from heygem_daemon.config import load_config
from heygem_daemon.generation.lifecycle import LifeCycle
from heygem_daemon.ops.daemon_state import read_state, write_state
from heygem_daemon.ops.sdnotify import Notifier
from heygem_daemon.ops.statedisk import StateDisk, wait_for_room
from heygem_daemon.service import acquire_lock
from heygem_daemon.state import Store
from heygem_daemon.state.db import StateFull
from test_job_lifecycle import FakeClock, PreviewInProcess, claimed, slot


def fill(folder: Path) -> Path:
    """Write a file until the disk says no more (ENOSPC): what a runaway log or a copy does to a disk."""
    filler = folder / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while True:
            os.write(fd, b"\0" * 65536)
    except OSError as exc:
        assert exc.errno == errno.ENOSPC
    finally:
        os.close(fd)
    return filler


@pytest.fixture
def life(tmp_path, tmpfs):
    state = tmpfs("state", "size=12m")  # room to go on: statedisk.RESUME_FREE (8 MiB)
    (tmp_path / "config.yaml").write_text(json.dumps({"base_dir": str(tmp_path), "folders": {"state": str(state)}}))
    cfg = load_config(tmp_path / "config.yaml", environ={})
    store = Store(state / "heygem.db")
    yield LifeCycle(cfg, store, clock=FakeClock())
    store.close()


def test_a_write_on_a_full_state_disk_raises_state_full_and_the_same_write_succeeds_once_there_is_room(life):
    filler = fill(life.cfg.folder("state"))
    with pytest.raises(StateFull):
        for n in range(100):  # the WAL file may still have room for a few pages
            life.store.jobs.create(f"job{n}", {"pad": "x" * 4000})
    assert life.store.db.full_since is not None
    filler.unlink()
    assert life.store.jobs.create("after", {}).name == "after"


def test_an_idle_daemon_finds_its_state_disk_full_alerts_once_and_goes_on_when_there_is_room(life):
    alerts: list[tuple[str, str]] = []
    disk = StateDisk(life.cfg.folder("state"), life.store.db, lambda k, m: alerts.append((k, m)))
    assert not disk.check() and disk.full is None
    filler = fill(life.cfg.folder("state"))
    assert disk.check() and "state disk full" in (disk.full or "")  # no write had to fail first
    assert not disk.check() and not disk.check()  # said once
    assert [k for k, _ in alerts] == ["state-disk-full"] and "The state disk is full" in alerts[0][1]
    assert life.store.db.full_since is not None  # the sender and delivery wait meanwhile
    filler.unlink()
    assert disk.check() and disk.full is None and life.store.db.full_since is None


def test_a_daemon_starting_on_a_full_state_disk_waits_alerted_until_a_stop_or_room(life):
    folder = life.cfg.folder("state")
    alerts: list[tuple[str, str]] = []
    filler = fill(folder)
    stops = iter([False, False, True])  # SQLite could not even open the store now: nothing is tried
    assert not wait_for_room(folder, lambda: next(stops), lambda k, m: alerts.append((k, m)), Notifier({}))
    assert [k for k, _ in alerts] == ["state-disk-full"]
    filler.unlink()
    assert wait_for_room(folder, lambda: False, lambda k, m: alerts.append((k, m)), Notifier({}))
    assert len(alerts) == 1


def test_status_says_why_the_daemon_waits_even_when_the_state_disk_has_no_room_for_a_new_copy(life):
    folder = life.cfg.folder("state")
    lock = acquire_lock(folder)  # read_state reads the file only while a daemon holds the lock
    try:
        write_state(folder, state_full=None)
        filler = fill(folder)
        write_state(folder, state_full="state disk full: here")  # no room for a temp to rename
        assert read_state(folder)["state_full"] == "state disk full: here"
        filler.unlink()
    finally:
        lock.close()


def test_a_render_that_ends_on_a_full_state_disk_is_held_and_recorded_for_its_own_task_once_there_is_room(life):
    first = claimed(life, "alice", media=True)
    second = claimed(life, "bob", media=True)
    filled: list[Path] = []

    class FillsTheDiskWhileRendering(PreviewInProcess):
        def _attempt(self, engine, spec):
            if not filled:
                filled.append(fill(life.cfg.folder("state")))
            return super()._attempt(engine, spec)

    s = slot(life, life.clock, FillsTheDiskWhileRendering)
    runner = threading.Thread(target=s.step)
    runner.start()
    deadline = time.monotonic() + 30
    while not s.holding:
        assert runner.is_alive() and time.monotonic() < deadline
        time.sleep(0.01)
    (task,) = life.store.tasks.select(first.id)
    assert task.state == "running" and s.current is not None and s.current.id == task.id
    filled[0].unlink()
    runner.join(30)
    assert not runner.is_alive() and not s.holding
    assert life.store.jobs.get(first.id).state == "done"
    assert [t.state for t in life.store.tasks.select(second.id)] == ["queued"]  # nothing recorded against bob
    assert s.step() and life.store.jobs.get(second.id).state == "done"


@pytest.mark.daemon
def test_the_daemon_waits_out_a_state_disk_that_fills_mid_render_and_every_pair_ends_right(tmp_path, tmpfs, voice):
    from daemon_harness import DaemonHarness
    from media_factory import PORTRAIT_JPG
    from notify_receiver import Receiver
    from test_command_engine import ARGS

    state = tmpfs("state", "size=12m")
    receiver = Receiver().start()
    release = tmp_path / "release"
    harness = DaemonHarness(tmp_path / "base", {
        "folders": {"state": str(state)},
        "engine": {"name": "command"},
        "engines": {"command": {"args": ARGS, "timeout": 120, "progress_regex": r"(\d+)%"}},
        "notify": {"urls": [f"json://127.0.0.1:{receiver.port}/hook"]},
        "dedupe": {"window_hours": 0},
    })
    try:
        harness.store = lambda: Store(state / "heygem.db")  # type: ignore[method-assign]
        harness.start(env={"FAKE_RELEASE_FILE": str(release), "FAKE_SLOW_SECONDS": "120"})
        harness.drop_pair(voice, PORTRAIT_JPG, "slow-first")  # the tool renders until `release` exists
        harness.wait_for(lambda: [t for t in harness.store().tasks.select(states=("running",))], 60, "a render")
        filler = fill(state)
        harness.wait_for(lambda: read_state(state).get("state_full"), 30, "status to say the state disk is full")
        harness.drop_pair(voice, PORTRAIT_JPG, "second")  # arrives while nothing can be recorded
        release.touch()
        harness.wait_for(lambda: any("The state disk is full" in p.text for p in receiver.posts), 30, "the alert")
        # The render ends while nothing can be recorded: its slot holds the outcome.
        harness.wait_for(lambda: '"event": "task done"' in harness.log_text(), 60, "the render to end")
        assert (harness.inbox / "second.wav").exists()  # not claimed meanwhile
        filler.unlink()
        first, second = harness.wait_job("slow-first"), harness.wait_job("second")
        assert (first.state, second.state) == ("done", "done")
        tasks = harness.store().tasks.select()
        assert [t.attempts for t in tasks] == [1, 1]  # no outcome of one task was taken for another's
        assert all(Path(t.output).stat().st_size > 0 for t in tasks)
        events = [json.loads(line)["event"] for line in harness.log_text().splitlines()]
        assert events.count("state disk full; the daemon waits until there is room (nothing is claimed, no task "
                            "starts, finished renders are held)") == 1
        assert events.count("state disk has room again; the daemon goes on") == 1
        assert "Traceback" not in harness.log_text()
        assert read_state(state).get("state_full") is None
    finally:
        harness.stop()
        receiver.stop()
