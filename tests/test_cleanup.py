"""Cleanup sweeps on real folders and a real store, judged by a clock set in the future."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from heygem_daemon.ops.cleanup import (
    DAY, HOUR, SWEEPS, Cleanup, Sweep, sweep_archive, sweep_rows, sweep_temp, sweep_work,
)
from heygem_daemon.config import load_config
from heygem_daemon.state import NewNotification, NewTask, Part, Store

# Everything made now is this old as far as the sweeps can tell.
LATER = 100 * DAY


@pytest.fixture
def cfg(tmp_path):
    (tmp_path / "base").mkdir()
    path = tmp_path / "config.yaml"
    path.write_text("base_dir: base\ncleanup: {temp_hours: 2, archive_days: 7, rows_days: 30, failed_rows_days: 200}\n")
    return load_config(path, environ={})


@pytest.fixture
def store(cfg):
    return Store(cfg.folder("state") / "heygem.db")


def write(path: Path, size: int = 100, age_from_later: float | None = None) -> Path:
    """A real file; with age_from_later its mtime is that many seconds before the sweep's clock."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x" * size)
    if age_from_later is not None:
        t = time.time() + LATER - age_from_later
        os.utime(path, (t, t))
    return path


def sweep(cfg, store) -> Sweep:
    return Sweep(cfg, store, time.time() + LATER)


def queued_job(store: Store, name: str, output: Path) -> str:
    job = store.jobs.create(name, {"staging": "x"})
    store.jobs.queue(job.id, [NewTask(name, "a.wav", "p.jpg", str(output))])
    return job.id


def test_temp_sweep_removes_old_leftovers_and_keeps_everything_else(cfg, store):
    outputs, failed = cfg.folder("outputs"), cfg.folder("failed")
    old_part = write(outputs / "alice" / "alice.mp4.part", 1000)
    old_tmp = write(failed / "bob" / ".error.json.0123abcd.tmp", 20)
    fresh_part = write(outputs / "carol" / "carol.mp4.part", age_from_later=HOUR)
    video = write(outputs / "alice" / "old.mp4")
    inbox_part = write(cfg.folder("inbox") / "upload.wav.part")
    running_out = outputs / "dave" / "dave.mp4"
    running_part = write(Path(str(running_out) + ".part"))
    queued_job(store, "dave", running_out)
    store.tasks.take_next("cpu")

    s = sweep(cfg, store)
    sweep_temp(s)

    assert sorted(s.removed) == sorted([str(old_part), str(old_tmp)])
    assert s.freed == 1020
    for kept in (fresh_part, video, inbox_part, running_part):
        assert kept.exists(), kept


def test_temp_sweep_never_follows_a_symlink(cfg, store, tmp_path):
    outside = write(tmp_path / "precious" / "data.part", 50)
    link = cfg.folder("outputs") / "link.part"
    link.symlink_to(outside)
    (cfg.folder("outputs") / "linkdir").symlink_to(outside.parent)

    s = sweep(cfg, store)
    sweep_temp(s)

    assert s.removed == [] and outside.exists() and link.is_symlink()


def test_work_sweep_removes_folders_of_finished_and_unknown_jobs_only_and_never_unknown_inputs(cfg, store):
    work = cfg.folder("work")
    done = store.jobs.create("done", {})
    store.jobs.set_state(done.id, "done")
    failed = store.jobs.create("failed", {})
    store.jobs.set_state(failed.id, "failed")
    running = queued_job(store, "running", cfg.folder("outputs") / "running" / "running.mp4")
    write(work / done.id / "in" / "a.wav", 300)
    write(work / failed.id / "in" / "a.wav", 200)
    write(work / "0123456789ab" / "in" / "a.wav", 100)  # no row: the database lost it
    write(work / running / "in" / "a.wav")
    retried = store.jobs.create("retried-just-now", {})
    store.jobs.set_state(retried.id, "failed")
    fresh = write(work / retried.id / "in" / "a.wav").parent.parent
    t = time.time() + LATER - 60
    os.utime(fresh, (t, t))  # `retry` is moving inputs in right now

    s = sweep(cfg, store)
    sweep_work(s)

    assert sorted(Path(p).name for p in s.removed) == sorted([done.id, failed.id, "0123456789ab"])
    assert s.freed == 500
    assert (work / running).is_dir() and fresh.is_dir()
    assert (cfg.folder("inbox") / "recovered-0123456789ab" / "a.wav").stat().st_size == 100


def test_archive_sweep_removes_day_folders_older_than_the_retention(cfg, store):
    archive = cfg.folder("archive")
    now = time.time() + LATER
    old_day = time.strftime("%Y-%m-%d", time.localtime(now - 9 * DAY))
    recent_day = time.strftime("%Y-%m-%d", time.localtime(now - 3 * DAY))
    write(archive / old_day / "alice" / "alice.wav", 400)
    write(archive / recent_day / "bob" / "bob.wav")
    write(archive / "notes" / "keep.txt")
    (archive / "1999-01-01").symlink_to(archive / "notes")

    s = Sweep(cfg, store, now)
    sweep_archive(s)

    assert s.removed == [str(archive / old_day)] and s.freed == 400
    assert (archive / recent_day / "bob" / "bob.wav").exists()
    assert (archive / "notes" / "keep.txt").exists() and (archive / "1999-01-01").is_symlink()


def test_row_sweep_keeps_failed_jobs_longer_and_never_touches_live_ones(cfg, store):
    done = store.jobs.create("done", {})
    store.jobs.set_state(done.id, "done")
    failed = store.jobs.create("failed", {})
    store.jobs.set_state(failed.id, "failed")
    queued_job(store, "live", cfg.folder("outputs") / "live" / "live.mp4")

    s = sweep(cfg, store)  # 100 days on: past rows_days (30), not failed_rows_days (200)
    sweep_rows(s)

    assert s.removed == ["job row done"]
    assert sorted(j.name for j in store.jobs.select()) == ["failed", "live"]
    assert store.tasks.select(done.id) == []


def test_a_sweep_refuses_to_delete_outside_the_daemons_folders(cfg, store):
    victim = write(cfg.folder("inbox") / "alice.wav")
    with pytest.raises(ValueError, match="not inside"):
        sweep(cfg, store).remove(victim)
    with pytest.raises(ValueError, match="not inside"):
        sweep(cfg, store).remove(cfg.folder("outputs"))
    assert victim.exists() and cfg.folder("outputs").is_dir()


def test_runs_missed_while_down_happen_once_at_start(cfg, store):
    now = time.time()
    store.ops.record_cleanup_run("temp", now - 10 * HOUR, 0, 0)  # every hour: ten runs missed
    store.ops.record_cleanup_run("work", now - 10 * HOUR, 0, 0)
    for job in SWEEPS:
        if job.name not in ("temp", "work"):
            store.ops.record_cleanup_run(job.name, now - HOUR / 2, 0, 0)  # hourly or less often: not due yet
    old_part = write(cfg.folder("outputs") / "x" / "x.mp4.part", age_from_later=LATER + 3 * HOUR)
    runs: list[str] = []
    cleanup = Cleanup(cfg, store, clock=lambda: now)
    original = cleanup.run
    cleanup.run = lambda job: runs.append(job.name) or original(job)  # type: ignore[method-assign]
    cleanup.start()
    try:
        recorded = store.ops.cleanup_runs
        wait_until(lambda: recorded()["temp"] == recorded()["work"] == now, "the missed runs")
        # Nothing is due for the next minute: every run the scheduler took has begun, and stop() waits for it.
        wait_until(lambda: all(j.next_run_time.timestamp() > now + 60 for j in cleanup.scheduler.get_jobs()),
                   "no sweep to be due")
    finally:
        cleanup.stop()
    assert sorted(runs) == ["temp", "work"]
    assert not old_part.exists()
    last = store.ops.cleanup_runs()
    assert last["temp"] == last["work"] == now and last["archive"] == last["rows"] == now - HOUR / 2


def wait_until(cond, what: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_a_first_start_runs_every_sweep_once_and_reload_drops_a_switched_off_one(cfg, store):
    cleanup = Cleanup(cfg, store)
    cleanup.start()
    try:
        names = sorted(job.name for job in SWEEPS)
        wait_until(lambda: sorted(store.ops.cleanup_runs()) == names, "every sweep to run")
        assert sorted(j.id for j in cleanup.scheduler.get_jobs()) == names
        cleanup.apply(cfg.model_copy(update={"cleanup": cfg.cleanup.model_copy(update={"rows_every_hours": 0})}))
        assert sorted(j.id for j in cleanup.scheduler.get_jobs()) == [n for n in names if n != "rows"]
    finally:
        cleanup.stop()


def test_work_sweep_keeps_engine_caches(cfg, store):
    cache = write(cfg.folder("work") / ".cache" / "wav2lip-boxes" / "0123.npy", age_from_later=LATER)
    orphan = write(cfg.folder("work") / "unknown-job" / "a.wav", age_from_later=LATER)
    os.utime(orphan.parent, (time.time() - DAY, time.time() - DAY))
    os.utime(cache.parent.parent, (time.time() - DAY, time.time() - DAY))
    sweep_work(sweep(cfg, store))
    assert cache.exists() and not orphan.exists()


def delivered_job(store: Store, name: str, video: Path) -> str:
    """A finished job whose video was delivered (batch reported, the file linked, its parts recorded)."""
    job_id = queued_job(store, name, video)
    task = store.tasks.take_next("cpu")
    store.tasks.finish(task.id)
    store.jobs.set_state(job_id, "done")
    store.deliveries.ensure_batch(job_id, name, name, job_id)
    d = store.deliveries.add(job_id, str(video), video.name, 100, f"k/{video.name}", task.id)
    store.deliveries.start_upload(d.id, "u1")
    store.deliveries.add_parts(d.id, [Part(1, '"e"', 100, "m", 0.0)])
    store.deliveries.finish_upload(d.id, '"e"', "sha")
    store.deliveries.mark_linked([d.id])
    store.deliveries.mark_reported(job_id, None)
    return job_id


def count(store: Store, table: str) -> int:
    return store.db.conn().execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]


def test_row_sweep_forgets_a_finished_job_with_everything_that_hangs_off_it(cfg, store):
    video = write(cfg.folder("outputs") / "alice" / "alice.mp4")
    delivered_job(store, "alice", video)
    s = sweep(cfg, store)
    sweep_rows(s)
    assert s.removed == ["job row alice"]
    assert {t: count(store, t) for t in ("jobs", "tasks", "attempts", "batches", "deliveries", "upload_parts")} == \
        dict.fromkeys(("jobs", "tasks", "attempts", "batches", "deliveries", "upload_parts"), 0)


def test_a_forgotten_delivery_whose_video_is_still_in_outputs_is_never_delivered_again(cfg, store):
    video = write(cfg.folder("outputs") / "alice" / "alice.mp4")
    delivered_job(store, "alice", video)
    sweep_rows(sweep(cfg, store))
    assert store.deliveries.at(str(video)) is None and store.deliveries.known(str(video))


def test_a_delivered_marker_goes_once_its_file_is_gone(cfg, store):
    video = write(cfg.folder("outputs") / "alice" / "alice.mp4")
    delivered_job(store, "alice", video)
    sweep_rows(sweep(cfg, store))
    video.unlink()
    s = sweep(cfg, store)
    sweep_rows(s)
    assert s.removed == ["1 delivered markers of removed files"] and not store.deliveries.known(str(video))


def test_row_sweep_forgets_reported_adhoc_batches_and_keeps_open_ones(cfg, store):
    outputs = cfg.folder("outputs")
    for name, reported in (("old", True), ("open", False)):
        video = write(outputs / name / "v.mp4")
        store.deliveries.ensure_batch(f"adhoc-{name}", name, name, None)
        d = store.deliveries.add(f"adhoc-{name}", str(video), "v.mp4", 100, "k", None)
        store.deliveries.mark_linked([d.id])
        if reported:
            store.deliveries.mark_reported(f"adhoc-{name}", None)
    s = sweep(cfg, store)
    sweep_rows(s)
    assert s.removed == ["ad-hoc batch row old"]
    assert store.deliveries.batch("adhoc-old") is None and store.deliveries.batch("adhoc-open") is not None
    assert store.deliveries.known(str(outputs / "old" / "v.mp4"))


def test_row_sweep_forgets_old_sent_notifications_and_keeps_pending_ones(cfg, store):
    rows = [NewNotification(f"alert:{n}", "t", "alert", None, "title", "body", "text", "info")
            for n in ("sent", "pending")]
    store.outbox.add(rows)
    store.outbox.sent(store.outbox.select()[0].id)
    s = sweep(cfg, store)
    sweep_rows(s)
    assert s.removed == ["1 notification rows"]
    assert [n.event_key for n in store.outbox.select()] == ["alert:pending"]


def test_upload_parts_of_a_delivered_file_go_after_a_day_while_the_job_stays(cfg, store):
    video = write(cfg.folder("outputs") / "alice" / "alice.mp4")
    job_id = delivered_job(store, "alice", video)
    store.jobs.set_state(job_id, "running")  # a live job: its rows stay, its used-up parts do not
    s = sweep(cfg, store)
    sweep_rows(s)
    assert s.removed == ["1 upload part rows"] and count(store, "deliveries") == 1
def test_temp_sweep_removes_our_own_cut_short_temps_after_minutes_unless_a_process_holds_them_open(cfg, store):
    outputs = cfg.folder("outputs")
    zip_tmp = write(outputs / "alice" / ".alice.zip.0123abcd.tmp", 300, age_from_later=20 * 60)
    moving = write(cfg.folder("work") / "0123456789ab" / "in" / ".alice.wav.89abcdef.moving", 50,
                   age_from_later=20 * 60)
    fresh = write(outputs / "carol" / ".links.json.0123abcd.tmp", age_from_later=60)
    held = write(outputs / "bob" / ".links.json.0123abcd.tmp", age_from_later=20 * 60)
    writer = subprocess.Popen([sys.executable, "-c", "import sys; f = open(sys.argv[1], 'ab'); print(1, flush=True); "
                               "sys.stdin.read()", str(held)], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        writer.stdout.readline()  # the other process holds it open now
        s = sweep(cfg, store)
        sweep_temp(s)
    finally:
        writer.kill()
        writer.wait()
    assert sorted(s.removed) == sorted([str(zip_tmp), str(moving)])
    assert fresh.exists() and held.exists()


def test_speech_cache_sweep_removes_parts_unused_for_cache_days_and_keeps_the_rest(cfg, store):
    from heygem_daemon.speech.sweep import sweep_speech_cache

    cache = cfg.folder("work") / ".speech-cache"
    old = write(cache / "aa.wav", age_from_later=31 * DAY)
    used = write(cache / "bb.wav", age_from_later=29 * DAY)
    lock = write(cache / ".heygem-daemon-locks" / "x.lock", age_from_later=LATER)
    sweep_speech_cache(sweep(cfg, store))
    assert not old.exists() and used.exists() and lock.exists()
