"""Remote generation end to end: the real daemon drives two `heygem-daemon worker` processes (two "hosts")
through a real redis-server, with the `command` engine running the fake lip-sync tool."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from daemon_harness import REPO, DaemonHarness
from media_factory import PORTRAIT_JPG
from remote_rig import CLI, RedisServer, RemoteWorker, assert_bad_input_fails_once, failed_remotely, stop_all
from test_command_engine import ARGS

from heygem_daemon.ops.daemon_state import read_state

pytestmark = pytest.mark.daemon  # real daemon, Redis and workers: left out of `make test-fast`
SLOW_SECONDS = 2.5  # how long a task whose audio is named `slow…` takes, so it can be caught running
UNMOUNTED = "w3@unmounted"


@pytest.fixture(scope="module")
def rig(tmp_path_factory):
    root = tmp_path_factory.mktemp("remote")
    redis = RedisServer(root / "redis").start()
    base = root / "daemon"
    base.mkdir()
    share = root / "mnt-share"  # the daemon's folders as the worker hosts mount them
    share.symlink_to(base)
    engine = {"args": ARGS, "timeout": 60, "bad_input_exit_codes": [3], "progress_regex": r"(\d+)%"}
    remote = {"broker_url": redis.url, "queues": {"gpu": 4}, "beat_seconds": 0.3, "poll_seconds": 0.1}
    workers = [RemoteWorker(root / f"host{i}", f"w{i}@host{i}", {
        "engine": {"name": "command"}, "engines": {"command": {**engine, "cwd": str(root / f"host{i}")}},
        "workers": {"devices": ["cpu"], "remote": remote}}, {"FAKE_SLOW_SECONDS": str(SLOW_SECONDS)})
        for i in (1, 2)]
    # A third host whose share is not mounted: the folder its path map names is an empty mount point.
    (root / "unmounted").mkdir()
    unmounted = RemoteWorker(root / "host3", UNMOUNTED, {
        "engine": {"name": "command"}, "engines": {"command": engine},
        "workers": {"devices": ["cpu"], "remote": {**remote, "path_map": {str(base): str(root / "unmounted")}}}}, {})
    for w in (*workers, unmounted):
        w.launch("worker set-up problem" if w is unmounted else "ready.")
    for w in (*workers, unmounted):
        w.wait_started()
    daemon = DaemonHarness(base, {
        "engine": {"name": "command"},
        "engines": {"command": {**engine, "cwd": str(base)}},
        "dedupe": {"window_hours": 0},
        "workers": {"devices": [], "stall_seconds": 8, "outage_alert_seconds": 1, "backoff_seconds": 0.5,
                    "remote": {**remote, "path_map": {str(base): str(share)}}},
    }).start()
    yield daemon, redis, workers
    daemon.stop()
    stop_all([*workers, unmounted])
    redis.stop()


def outputs(daemon: DaemonHarness, job: str) -> list[str]:
    """The videos and the parts of videos in the job's outputs folder (delivery adds links and a zip)."""
    return sorted(p.name for p in (daemon.folder("outputs") / job).iterdir() if p.suffix in (".mp4", ".part"))


def running_on(daemon: DaemonHarness, task: str) -> str:
    """The remote worker the daemon says runs `task` (from the state `status` reads)."""
    def host() -> str | None:
        remote = read_state(daemon.folder("state")).get("remote") or {}
        return next((w["host"] for w in remote.get("workers", []) if task in w["tasks"].values()), None)
    return daemon.wait_for(host, 30, f"{task} to run on a remote worker")


def status_text(daemon: DaemonHarness) -> str:
    return subprocess.run([sys.executable, "-c", CLI, "-c", str(daemon.config_path), "status"], cwd=REPO,
                          capture_output=True, text=True, timeout=30).stdout


def test_a_worker_whose_share_is_not_mounted_takes_no_task_and_status_and_doctor_say_why(rig):
    daemon, _, _ = rig
    status = daemon.wait_for(lambda: "QUARANTINED" in (text := status_text(daemon)) and text, 30,
                             "status to name the worker without its share")
    (line,) = [ln for ln in status.splitlines() if UNMOUNTED in ln]
    assert "QUARANTINED" in status.split(line, 1)[1].splitlines()[1] and "the share is not mounted" in status
    shown = subprocess.run([sys.executable, "-c", CLI, "-c", str(daemon.config_path), "doctor"], cwd=REPO,
                           capture_output=True, text=True, timeout=60).stdout
    (failed,) = [ln for ln in shown.splitlines() if f"remote worker {UNMOUNTED}" in ln]
    assert "FAIL" in failed and "not mounted" in failed


def test_twenty_tasks_spread_over_both_workers_each_output_once(rig, voice):
    daemon, _, workers = rig
    before = [w.succeeded() for w in workers]
    for i in range(20):
        daemon.drop(voice, f"a{i:02}.wav", folder="twenty")
    daemon.drop(PORTRAIT_JPG, "face.jpg", folder="twenty")
    assert daemon.wait_job("twenty", timeout=180).state == "done"
    assert outputs(daemon, "twenty") == [f"a{i:02}.mp4" for i in range(20)]
    ran = [w.succeeded() - b for w, b in zip(workers, before)]
    assert sum(ran) == 20 and min(ran) > 0, ran
    shown = status_text(daemon)
    for w in workers:
        assert f"remote worker {w.name} [cpu]" in shown and "last heartbeat" in shown


def test_doctor_finds_the_broker_and_both_workers(rig):
    daemon, _, workers = rig
    shown = subprocess.run([sys.executable, "-c", CLI, "-c", str(daemon.config_path), "doctor"], cwd=REPO,
                           capture_output=True, text=True, timeout=60).stdout
    (broker,) = [line for line in shown.splitlines() if "task broker" in line]
    (answered,) = [line for line in shown.splitlines() if "remote workers" in line]
    assert "FAIL" not in broker and "FAIL" not in answered
    assert all(w.name in answered for w in workers)


def test_celerys_own_inspect_finds_the_workers_through_the_app_the_config_names(rig):
    daemon, _, workers = rig
    env = {**os.environ, "PYTHONPATH": str(REPO), "HEYGEM_CONFIG": str(daemon.config_path)}
    shown = subprocess.run([sys.executable, "-m", "celery", "-A", "heygem_daemon.generation.celery_app", "inspect",
                            "ping", "--timeout", "2"], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0, shown.stderr
    assert all(w.name in shown.stdout for w in workers)


def test_a_worker_killed_mid_task_finishes_on_the_other_with_one_output(rig, voice):
    daemon, _, workers = rig
    daemon.drop_pair(voice, PORTRAIT_JPG, "slow-kill")
    host = running_on(daemon, "slow-kill")
    (victim,) = [w for w in workers if w.name == host]
    victim.kill()
    try:
        assert daemon.wait_job("slow-kill", timeout=60).state == "done"
        assert outputs(daemon, "slow-kill") == ["slow-kill.mp4"]
        (task,) = daemon.store().tasks.select(daemon.job("slow-kill").id)
        assert task.attempts == 2  # the first ended when its worker fell silent
    finally:
        victim.start()


def test_broker_down_tasks_wait_with_an_alert_and_a_restart_loses_and_duplicates_nothing(rig, voice):
    daemon, redis, workers = rig
    for i in range(4):
        daemon.drop(voice, f"slow{i}.wav", folder="restart")
    daemon.drop(PORTRAIT_JPG, "face.jpg", folder="restart")
    running_on(daemon, "slow0")
    redis.stop()
    daemon.drop_pair(voice, PORTRAIT_JPG, "during-outage")
    daemon.wait_for(lambda: "task broker" in status_text(daemon) and "UNREACHABLE" in status_text(daemon), 30,
                    "status to show the outage")
    daemon.wait_for(lambda: "operator alert" in daemon.log_text() and "task broker" in daemon.log_text(), 30,
                    "the operator alert")
    redis.start()
    assert daemon.wait_job("restart", timeout=90).state == "done"
    assert daemon.wait_job("during-outage", timeout=60).state == "done"
    assert outputs(daemon, "restart") == [f"slow{i}.mp4" for i in range(4)]
    assert outputs(daemon, "during-outage") == ["during-outage.mp4"]
    for job in ("restart", "during-outage"):
        assert [t.attempts for t in daemon.store().tasks.select(daemon.job(job).id)] == [1] * (4 if job == "restart"
                                                                                            else 1)


def test_the_daemon_killed_while_a_remote_task_runs_adopts_the_render_instead_of_sending_it_again(rig, voice):
    daemon, redis, _ = rig
    daemon.drop_pair(voice, PORTRAIT_JPG, "slow-restart")
    running_on(daemon, "slow-restart")
    # Followed by polling: no result channel is subscribed to (its heartbeats would pile up unread in Redis).
    assert redis.result_channels_listened_to() == []
    daemon.kill()
    daemon.start()
    assert daemon.wait_job("slow-restart", timeout=60).state == "done"
    assert outputs(daemon, "slow-restart") == ["slow-restart.mp4"]
    (task,) = daemon.store().tasks.select(daemon.job("slow-restart").id)
    assert task.attempts == 1 and len(daemon.store().tasks.attempts(task.id)) == 1
    assert "remote task adopted after a restart" in daemon.log_text()


def test_a_cancel_stops_the_remote_render_and_files_the_inputs_in_failed(rig, voice):
    daemon, _, workers = rig
    daemon.drop_pair(voice, PORTRAIT_JPG, "slow-cancel")
    running_on(daemon, "slow-cancel")
    said = subprocess.run([sys.executable, "-c", CLI, "-c", str(daemon.config_path), "cancel", "slow-cancel"],
                          cwd=REPO, capture_output=True, text=True, timeout=30)
    assert said.returncode == 0, said.stderr
    job = daemon.wait_job("slow-cancel", timeout=30)
    assert job.state == "failed" and "cancelled" in job.error["reason"]
    (task,) = daemon.store().tasks.select(job.id)
    assert task.attempts == 1
    # Revoked with its child killed: the render cannot go on to leave a video behind.
    daemon.wait_for(lambda: any(f"Terminating heygem-{task.id}-1-" in w.text() for w in workers), 15,
                    "the worker to kill the render")
    assert not (daemon.folder("outputs") / "slow-cancel").exists()


def test_a_remote_bad_input_fails_once_with_its_reason_and_hint(rig, voice):
    daemon, _, _ = rig
    assert_bad_input_fails_once(daemon, voice, "badinput-remote")


def test_a_render_whose_worker_process_dies_is_a_counted_attempt_and_never_loops(rig, voice):
    daemon, _, workers = rig
    _, (task,) = failed_remotely(daemon, voice, "diehost")
    assert task.attempts == 2  # workers.max_attempts (2 in these tests), as for a crashed local worker
    for attempt in daemon.store().tasks.attempts(task.id):
        error = json.loads(attempt["error"])
        assert "worker process rendering the task died" in error["reason"] and "CUDA" in error["hint"]
    assert all(w.proc.poll() is None for w in workers)  # each worker replaced its pool child and serves on
