"""The job life cycle, the slots' decisions and the fair queue, in-process with an injected clock: no sleeps,
a real SQLite store, real folders, and the real preview engine where a video must be made."""

from __future__ import annotations

import errno
import json
import shutil
import subprocess
import threading
from pathlib import Path

import pytest

from heygem_daemon.cli import main as cli
from heygem_daemon.config import Config, load_config
from heygem_daemon.failures import ERROR_FILE, Kind, Problem
from heygem_daemon.generation import outages
from heygem_daemon.generation.lifecycle import (
    IllegalTransition, JobFinished, JobQueued, JobRefused, JobState, LifeCycle, TaskFailed, TaskFinished,
    TaskState, request_cancel, request_retry,
)
from heygem_daemon.generation.workers import Attempt, Slot, crash_error
from heygem_daemon.engines.base import TaskSpec
from heygem_daemon.engines.registry import build_engine
from heygem_daemon.notify.announce import Announcer
from heygem_daemon.ops.diskguard import wake_folder_waiters
from heygem_daemon.notify.outbox import Outbox
from heygem_daemon.state import Job, NewTask, Store
from media_factory import PORTRAIT_JPG, write_speech_wav

MAX_ATTEMPTS = 3
BACKOFF = 10.0


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def time(self) -> float:
        return self.now

    def monotonic(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class Recorder:
    """Subscribes to every event type and keeps them in order."""

    def __init__(self, life: LifeCycle) -> None:
        self.seen: list[object] = []
        for kind in (JobQueued, TaskFinished, TaskFailed, JobFinished, JobRefused):
            life.events.subscribe(kind, self.seen.append)

    def of(self, kind: type) -> list:
        return [e for e in self.seen if isinstance(e, kind)]


@pytest.fixture
def cfg(tmp_path) -> Config:
    (tmp_path / "config.yaml").write_text(json.dumps({
        "base_dir": str(tmp_path),
        "workers": {"max_attempts": MAX_ATTEMPTS, "backoff_seconds": BACKOFF, "backoff_max_seconds": 60,
                    "outage_alert_seconds": 600},
        "notify": {"urls": ["json://127.0.0.1:9/hook"]},
    }))
    return load_config(tmp_path / "config.yaml", environ={})


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def life(cfg, clock):
    store = Store(cfg.folder("state") / "heygem.db")
    yield LifeCycle(cfg, store, clock=clock)
    store.close()


def claimed(life: LifeCycle, name: str, pairs: int = 1, media: bool = False, **spec) -> Job:
    """A job as intake leaves it: inputs in work/<id>/in, tasks queued (what Claimer does, without probing)."""
    job = life.store.jobs.create(name, {"sources": [name], "folder": True, **spec})
    staging = life.cfg.folder("work") / job.id / "in"
    staging.mkdir(parents=True)
    if media:
        write_speech_wav(staging / "voice.wav", 0.5)
        shutil.copy(PORTRAIT_JPG, staging / "face.jpg")
    life.store.jobs.set_state(job.id, "detected", spec={**job.spec, "staging": str(staging)})
    out = life.cfg.folder("outputs") / job.name
    tasks = [NewTask(f"v{i}", "voice.wav", "face.jpg", str(out / f"v{i}.mp4")) for i in range(pairs)]
    return life.queue(life.store.jobs.get(job.id), tasks)


def slot(life: LifeCycle, clock: FakeClock, cls: type[Slot] = Slot) -> Slot:
    return cls(life.cfg, life, "cpu", 0, threading.Event(), threading.Event(), {}, threading.Event(), clock)


class PreviewInProcess(Slot):
    """Runs the real preview engine in this process instead of a worker process (same TaskSpec, same files)."""

    def _attempt(self, engine: str, spec: TaskSpec) -> Attempt:
        class Reporter:
            def __call__(self, fraction: float) -> None: ...

            def heartbeat(self) -> None: ...

        build_engine("preview", {}).generate(spec, Reporter())
        return Attempt(True)


class DependencyOut(Slot):
    """An engine whose service is unreachable: the engine answers with an outage, as the HeyGem client does."""

    def _attempt(self, engine: str, spec: TaskSpec) -> Attempt:
        return Attempt(False, "HeyGem service unreachable", "start it", Kind.OUTAGE, dependency="heygem service")


def run_until_settled(s: Slot, clock: FakeClock, limit: int = 50) -> tuple[int, int]:
    """Step the slot, moving the clock past each backoff. Returns (steps that ran a task, idle steps)."""
    ran = idle = 0
    for _ in range(limit):
        if s.step():
            ran += 1
            continue
        idle += 1
        nxt = s.store.tasks.next_wakeup()
        if nxt is None:
            break
        clock.now = max(clock.now, nxt)
    return ran, idle


# --- the state machine -----------------------------------------------------------------------------------

def test_an_illegal_job_transition_raises_and_changes_nothing(life):
    job = claimed(life, "alice")
    with pytest.raises(IllegalTransition):
        life._move(job, JobState.DONE)
    assert life.store.jobs.get(job.id).state == "queued"


def test_a_transition_from_a_state_the_job_has_left_raises(life):
    job = claimed(life, "alice")
    request_cancel(life.store, "alice")  # the CLI moved it meanwhile
    with pytest.raises(IllegalTransition, match="cancelling"):
        life._move(job, JobState.RUNNING)


def test_a_finished_task_cannot_be_failed_afterwards(life, clock):
    claimed(life, "alice")
    task = life.take("cpu")
    life.store.tasks.finish(task.id)
    with pytest.raises(IllegalTransition):
        life.attempt_failed(task, Problem(Kind.ENGINE, "generate", "late"), "cpu")
    assert life.store.tasks.get(task.id).state == "done"


# --- slots: every failure is a counted attempt with backoff, never a tight loop ----------------------------

def assert_failed_after_counted_attempts(life: LifeCycle, job: Job, ran: int, idle: int, reason: str) -> None:
    (task,) = life.store.tasks.select(job.id)
    assert task.state == "failed"
    assert ran == MAX_ATTEMPTS and len(life.store.tasks.attempts(task.id)) == MAX_ATTEMPTS
    assert idle >= MAX_ATTEMPTS - 1  # each retry waited for its backoff
    assert reason in task.last_error["reason"]
    record = json.loads((life.cfg.folder("failed") / job.name / ERROR_FILE).read_text())
    assert life.store.jobs.get(job.id).state == "failed" and reason in record["reason"]


def test_a_preset_removed_by_a_reload_fails_the_task_after_counted_attempts(life, clock):
    job = claimed(life, "alice", preset="gone")
    ran, idle = run_until_settled(slot(life, clock), clock)
    assert_failed_after_counted_attempts(life, job, ran, idle, "preset 'gone' is no longer in the config")


def test_an_unusable_work_folder_fails_the_task_after_counted_attempts(life, clock):
    job = claimed(life, "alice")
    (life.cfg.folder("work") / job.id / "task-1").write_text("not a folder")  # mkdir fails (as root too)
    ran, idle = run_until_settled(slot(life, clock), clock)
    assert_failed_after_counted_attempts(life, job, ran, idle, "FileExistsError")


def test_an_unusable_outputs_folder_fails_the_task_after_counted_attempts(life, clock):
    job = claimed(life, "alice")
    (life.cfg.folder("outputs") / "alice").write_text("not a folder")
    ran, idle = run_until_settled(slot(life, clock), clock)
    assert_failed_after_counted_attempts(life, job, ran, idle, "FileExistsError")


def test_a_part_file_that_cannot_be_renamed_fails_after_counted_attempts(life, clock):
    job = claimed(life, "alice", media=True)
    (life.cfg.folder("outputs") / "alice" / "v0.mp4").mkdir(parents=True)  # the rename target is in the way
    ran, idle = run_until_settled(slot(life, clock, PreviewInProcess), clock)
    assert_failed_after_counted_attempts(life, job, ran, idle, "IsADirectoryError")


def test_no_attempt_is_taken_before_its_backoff_is_over(life, clock):
    claimed(life, "alice", preset="gone")
    s = slot(life, clock)
    assert s.step()
    clock.advance(BACKOFF / 2 - 0.01)  # the shortest backoff with jitter is half the base
    assert not s.step()
    clock.advance(BACKOFF / 2 + 0.02)
    assert s.step()


def test_a_made_video_finishes_the_job_archives_inputs_and_emits_events(life, clock):
    seen = Recorder(life)
    job = claimed(life, "alice", media=True)
    assert slot(life, clock, PreviewInProcess).step()
    assert life.store.jobs.get(job.id).state == "done"
    assert (life.cfg.folder("outputs") / "alice" / "v0.mp4").stat().st_size > 0
    assert not (life.cfg.folder("work") / job.id).exists()
    (finished,) = seen.of(JobFinished)
    assert finished.outcome is JobState.DONE and finished.videos == [str(life.cfg.folder("outputs") / "alice/v0.mp4")]
    assert [type(e) for e in seen.seen] == [JobQueued, TaskFinished, JobFinished]


# --- outages: wait without attempts, alert after a while, shown in status ----------------------------------

def test_a_dependency_out_waits_without_using_attempts(life, clock):
    job = claimed(life, "alice")
    s = slot(life, clock, DependencyOut)
    for _ in range(10):
        run_until_settled(s, clock, limit=2)
    (task,) = life.store.tasks.select(job.id)
    assert task.state == "queued" and task.attempts == 0
    assert task.last_error["kind"] == "outage" and task.last_error["dependency"] == "heygem service"


def test_an_outage_alerts_the_operator_once_after_the_configured_time(life, clock):
    claimed(life, "alice")
    alerts: list[tuple[str, str]] = []
    watch = outages.OutageWatch(life.cfg, life.store, lambda k, m: alerts.append((k, m)), clock)
    s = slot(life, clock, DependencyOut)
    started = clock.now
    while clock.now - started < 1000:
        run_until_settled(s, clock, limit=2)
        watch.check()
        if not alerts:
            assert clock.now - started < 600 + outages.CHECK_SECONDS + 60
    ((key, text),) = alerts
    assert key.startswith("outage:heygem service@")
    assert "waiting for heygem service since" in text


class BrokerOut(Slot):
    """A send the broker did not take: the task waits, as the remote dispatcher's does."""

    def _attempt(self, engine: str, spec: TaskSpec) -> Attempt:
        return Attempt(False, "cannot reach the task broker", "start Redis", Kind.OUTAGE, dependency=BROKER)


BROKER = "task broker 127.0.0.1:6379"


def test_tasks_waiting_for_the_broker_go_when_the_dispatcher_sees_it_back_not_when_their_backoff_ends(life, clock):
    claimed(life, "alice")
    out, woken = [{"dependency": BROKER, "since": clock.now, "tasks": 0, "reason": "cannot reach Redis"}], []
    watch = outages.OutageWatch(life.cfg, life.store, lambda *a: None, clock, others=lambda: list(out),
                                wake=lambda: woken.append(1))
    run_until_settled(slot(life, clock, BrokerOut), clock, limit=1)
    watch.probe()
    out.clear()  # the dispatcher reached Redis again
    watch.probe()
    (task,) = life.store.tasks.select()
    assert woken == [1] and task.state == "queued" and task.not_before <= clock.now


def test_status_shows_what_tasks_wait_for_and_since_when(life, clock, capsys):
    claimed(life, "alice")
    run_until_settled(slot(life, clock, DependencyOut), clock, limit=1)
    assert cli(["-c", str(life.cfg.base_dir / "config.yaml"), "status"]) == 0
    assert "waiting for heygem service since" in capsys.readouterr().out
    assert cli(["-c", str(life.cfg.base_dir / "config.yaml"), "status", "--json"]) == 0
    (waiting,) = json.loads(capsys.readouterr().out)["waiting_for"]
    assert waiting["dependency"] == "heygem service" and waiting["tasks"] == 1


class OutAfterProgress(Slot):
    """An attempt that made some progress before its dependency went out: heygem staged its inputs (5 %) and
    found every service down; a render at 14 % hit a full disk (the worker's ENOSPC outage)."""

    made = 0.05
    error: tuple[str, ...] = ("error", Kind.OUTAGE.value, "no heygem service can take the job", "start it",
                              "heygem service")

    def _attempt(self, engine: str, spec: TaskSpec) -> Attempt:
        self.store.tasks.set_progress(spec.task_id, self.made)
        _, kind, reason, hint, dependency = self.error
        return Attempt(False, reason, hint, Kind(kind), dependency=dependency)


@pytest.mark.parametrize("made, error", [
    (0.05, OutAfterProgress.error),
    (0.14, crash_error(OSError(errno.ENOSPC, "No space left on device"))),
], ids=["service down", "disk full"])
def test_status_shows_a_job_whose_tasks_all_wait_as_waiting_for_the_dependency_not_running(
        life, clock, capsys, made, error):
    job = claimed(life, "alice", pairs=2)
    s = slot(life, clock, OutAfterProgress)
    s.made, s.error = made, error
    assert s.step() and s.step()
    assert cli(["-c", str(life.cfg.base_dir / "config.yaml"), "status"]) == 0
    (line,) = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("alice")]
    assert line.split()[1:5] == ["waiting", "0/2", "videos", "0.0%"]
    assert f"(waiting for {error[4]} since " in line
    assert life.store.jobs.get(job.id).state == "running"  # the store's state is unchanged: only shown truly


def test_a_read_only_outputs_folder_is_an_outage_that_uses_no_attempt_alerts_once_and_ends_by_itself(
        tmp_path, tmpfs, clock):
    outputs = tmpfs("outputs", "size=4m")
    (tmp_path / "config.yaml").write_text(json.dumps({
        "base_dir": str(tmp_path), "folders": {"outputs": str(outputs)},
        "workers": {"max_attempts": MAX_ATTEMPTS, "backoff_seconds": BACKOFF, "backoff_max_seconds": 60,
                    "outage_alert_seconds": 600}}))
    cfg = load_config(tmp_path / "config.yaml", environ={})
    life = LifeCycle(cfg, Store(cfg.folder("state") / "heygem.db"), clock=clock)
    job = claimed(life, "alice", media=True)
    subprocess.run(["mount", "-o", "remount,ro", str(outputs)], check=True)
    alerts: list[tuple[str, str]] = []
    watch = outages.OutageWatch(cfg, life.store, lambda k, m: alerts.append((k, m)), clock)
    s = slot(life, clock, PreviewInProcess)
    for _ in range(30):  # far more tries than max_attempts, and longer than outage_alert_seconds
        run_until_settled(s, clock, limit=2)
        watch.check()
    s.step()  # the task tried again, and waits out its backoff
    (task,) = life.store.tasks.select(job.id)
    assert task.state == "queued" and task.attempts == 0 and task.last_error["dependency"] == "outputs/"
    assert task.not_before > clock.now
    assert "Read-only file system" in task.last_error["reason"]
    assert len(alerts) == 1 and alerts[0][0].startswith("outage:outputs/") and "Read-only" in alerts[0][1]
    subprocess.run(["mount", "-o", "remount,rw", str(outputs)], check=True)
    # The daemon's main loop wakes the waiting tasks when the folder takes a file again: no backoff to wait out.
    assert wake_folder_waiters(cfg, life.store, clock.now) == ["outputs/"]
    assert s.step()
    assert life.store.jobs.get(job.id).state == "done" and (outputs / "alice" / "v0.mp4").stat().st_size > 0


# --- fair queue ----------------------------------------------------------------------------------------

def test_a_one_video_job_is_not_stuck_behind_a_big_batch(life, clock):
    big = claimed(life, "batch", pairs=500)
    life.take("cpu")
    small = claimed(life, "single")
    assert life.take("cpu").job_id == small.id
    assert life.take("cpu").job_id == big.id


def test_jobs_take_turns_within_a_priority(life, clock):
    a = claimed(life, "a", pairs=3)
    b = claimed(life, "b", pairs=3)
    assert [life.take("cpu").job_id for _ in range(4)] == [a.id, b.id, a.id, b.id]


def test_high_priority_goes_first_and_low_last(life, clock):
    low = claimed(life, "low", priority="low")
    normal = claimed(life, "normal")
    high = claimed(life, "high", priority="high")
    assert [life.take("cpu").job_id for _ in range(3)] == [high.id, normal.id, low.id]


# --- who is told what, once ------------------------------------------------------------------------------

@pytest.fixture
def outbox(life) -> Outbox:
    box = Outbox(life.cfg, life.store)
    Announcer(box, life.store).subscribe(life.events)
    return box


def fail_task(life: LifeCycle, task) -> None:
    life.attempt_failed(task, Problem(Kind.BAD_INPUT, "generate", "no face in frame 1", "use a front photo"), "cpu")


def test_a_job_that_made_nothing_is_told_by_one_failure_message_even_after_recovery(life, outbox):
    job = claimed(life, "alice")
    fail_task(life, life.take("cpu"))
    life.store.jobs.set_state(job.id, "running")  # as if the crash came before `failed` was recorded
    life.recover()
    (row,) = life.store.outbox.select()
    assert row.kind == "failure" and "no face in frame 1" in row.body
    assert life.store.jobs.get(job.id).state == "failed"


def test_a_job_that_made_some_videos_is_left_to_its_delivery_report(life, outbox, clock):
    seen = Recorder(life)
    job = claimed(life, "promo", pairs=2)
    done = life.take("cpu")
    Path(done.output).parent.mkdir(parents=True)
    Path(done.output).write_bytes(b"video")
    life.task_done(done)
    fail_task(life, life.take("cpu"))
    assert life.store.outbox.select() == []
    (finished,) = seen.of(JobFinished)
    assert finished.outcome is JobState.FAILED and finished.videos == [done.output]
    assert [p.reason for p in finished.problems] == ["no face in frame 1"]
    assert [p["file"] for p in life.store.jobs.get(job.id).error["problems"]] == ["v1 (face.jpg + voice.wav)"]


# --- operator requests ---------------------------------------------------------------------------------

def test_retry_is_a_request_the_daemon_carries_out(life, clock):
    job = claimed(life, "alice")
    fail_task(life, life.take("cpu"))
    failed_dir = life.cfg.folder("failed") / "alice"
    assert request_retry(life.store, "alice") == "alice: retry asked; its 1 failed task(s) are queued again."
    assert failed_dir.is_dir() and life.store.jobs.get(job.id).state == "retrying"  # nothing moved yet
    seen = Recorder(life)
    life.settle_requests()
    assert not failed_dir.exists() and (life.cfg.folder("work") / job.id / "in").is_dir()
    (task,) = life.store.tasks.select(job.id)
    assert (task.state, task.attempts) == ("queued", 0)
    assert life.store.jobs.get(job.id).state == "queued" and seen.of(JobQueued)


def test_the_cli_says_a_request_waits_when_no_daemon_runs(life, capsys):
    claimed(life, "alice")
    assert cli(["-c", str(life.cfg.base_dir / "config.yaml"), "cancel", "alice"]) == 0
    assert "The daemon is not running: the request waits until it starts." in capsys.readouterr().out
    assert life.store.jobs.get(life.store.jobs.find("alice").id).state == "cancelling"


def test_a_cancelled_job_ends_failed_when_the_daemon_settles_it(life, outbox):
    job = claimed(life, "alice", pairs=2)
    request_cancel(life.store, "alice")
    life.settle_requests()
    assert life.store.jobs.get(job.id).state == "failed"
    assert all(t.state == TaskState.FAILED for t in life.store.tasks.select(job.id))
    assert "cancelled by the operator" in (life.cfg.folder("failed") / "alice" / ERROR_FILE).read_text()


class EngineFails(Slot):
    """An engine that fails every attempt the way heygem's does, promising the next one in its hint."""

    def _attempt(self, engine: str, spec: TaskSpec) -> Attempt:
        return Attempt(False, "heygem service failed: boom", "see the container's log; the task will be retried")


def test_a_task_that_failed_for_good_promises_no_retry_in_error_json_or_the_chat_message(life, clock, outbox):
    job = claimed(life, "alice")
    run_until_settled(slot(life, clock, EngineFails), clock)
    record = json.loads((life.cfg.folder("failed") / "alice" / ERROR_FILE).read_text())
    assert record["hint"] == f"see the container's log; gave up after {MAX_ATTEMPTS} attempt(s)"
    (row,) = life.store.outbox.select()
    assert row.job_id == job.id and "gave up after" in row.body and "will be retried" not in row.body


def test_the_cancel_hint_names_the_job_to_retry(life, outbox):
    claimed(life, "alice")
    request_cancel(life.store, "alice")
    life.settle_requests()
    record = json.loads((life.cfg.folder("failed") / "alice" / ERROR_FILE).read_text())
    assert "`heygem-daemon retry alice`" in record["hint"] and "JOB" not in json.dumps(record)


def test_an_intake_refusal_is_told_once_and_recorded(life, outbox):
    seen = Recorder(life)
    job = life.store.jobs.create("coffee", {"sources": ["coffee.jpg"], "folder": False})
    problem = Problem.of_input("coffee.jpg", "no face found", "use a front photo")
    from heygem_daemon.failures import error_record

    life.refuse(job, [problem], error_record("coffee", "intake", [problem]))
    assert life.store.jobs.get(job.id).state == "failed" and seen.of(JobRefused)
    (row,) = life.store.outbox.select()
    assert row.kind == "failure" and "no face found" in row.body


def test_a_job_that_could_not_be_finished_is_finished_again_later_not_at_every_turn(life, clock):
    job = claimed(life, "alice")
    in_the_way = life.cfg.folder("failed") / "alice"
    in_the_way.write_text("a file where the failed/ folder goes")
    life.settle_requests()  # the periodic finishing runs once now; the job is not ready yet
    fail_task(life, life.take("cpu"))
    assert life.store.jobs.get(job.id).state == "running"  # error.json could not be written
    in_the_way.unlink()
    life.settle_requests()
    assert life.store.jobs.get(job.id).state == "running"  # not before its time
    clock.advance(60)
    life.settle_requests()
    assert life.store.jobs.get(job.id).state == "failed"
    assert (in_the_way / ERROR_FILE).is_file()
