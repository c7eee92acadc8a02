"""The real daemon with engine `heygem`, delivering through two stand-in services on 127.0.0.1 that behave
like HeyGem's: the behaviours that need the real process (supervisor heartbeats, outage waits without
attempts, cancel and crash leftovers)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from daemon_harness import DaemonHarness
from heygem_daemon.generation.lifecycle import request_cancel
from heygem_standin import Group, HeygemStandin
from media_factory import PORTRAIT_JPG, video_facts, write_portrait_video
from notify_receiver import Receiver

pytestmark = pytest.mark.daemon  # starts the real daemon: left out of `make test-fast`


@pytest.fixture(scope="module")
def group() -> Group:
    return Group()


@pytest.fixture(scope="module")
def services(tmp_path_factory, group):
    data = tmp_path_factory.mktemp("face2face")
    pair = [HeygemStandin("a", data, group), HeygemStandin("b", data, group)]
    yield pair
    for s in pair:
        s.stop()


@pytest.fixture(scope="module")
def operator():
    """The operator's chat: where alerts go."""
    receiver = Receiver().start()
    yield receiver
    receiver.stop()


@pytest.fixture(scope="module")
def daemon(tmp_path_factory, services, operator):
    harness = DaemonHarness(tmp_path_factory.mktemp("heygem-daemon"), {
        "engine": {"name": "heygem"},
        "engines": {"heygem": {"services": [s.url for s in services], "data_dir": str(services[0].data_dir),
                               "poll_interval": 0.1, "busy_retry_interval": 0.2}},
        # One slot per service; a hang is 2 s without a heartbeat; outages come back within a second.
        "workers": {"per_device": 2, "stall_seconds": 2, "backoff_seconds": 0.3, "backoff_max_seconds": 1,
                    "outage_alert_seconds": 1},
        "notify": {"operator_urls": [operator.url("/ops")], "retry_base_seconds": 0.2, "retry_max_seconds": 0.5},
        "cleanup": {"temp_every_hours": 0.0005},  # the leftovers sweep every 1.8 s
        "dedupe": {"window_hours": 0},  # every test drops the same voice
    })
    yield harness.start()
    harness.stop()


@pytest.fixture
def released(services):
    """Hanging jobs end with the test, whatever happens in it."""
    yield
    for s in services:
        s.release()


def data_files(services: list[HeygemStandin]) -> list[Path]:
    temp = services[0].data_dir / "temp"
    return list(temp.iterdir()) if temp.is_dir() else []


def drop_duo(daemon: DaemonHarness, voice: Path, staging: Path, name: str) -> None:
    """One voice, two portraits: a job of two tasks."""
    staging.mkdir()
    shutil.copy(voice, staging / "speech.wav")
    shutil.copy(PORTRAIT_JPG, staging / "anna.jpg")
    write_portrait_video(staging / "ben.mp4", 1.0)
    shutil.move(staging, daemon.inbox / name)


def test_a_pair_is_delivered_through_the_service_and_the_data_folder_is_left_clean(daemon, services, voice):
    daemon.drop_pair(voice, PORTRAIT_JPG, "alice")
    job = daemon.wait_job("alice")
    assert job.state == "done"
    facts = video_facts(daemon.folder("outputs") / "alice" / "alice.mp4")
    assert facts.has_video and facts.has_audio and abs(facts.audio_duration - 1.0) < 0.1
    assert data_files(services) == []


def test_two_services_serve_two_tasks_at_once(daemon, services, group, voice, tmp_path):
    since = len(group.journal)
    group.expect_peers(2)
    try:
        drop_duo(daemon, voice, tmp_path / "duo", "duo")
        assert daemon.wait_job("duo").state == "done"
    finally:
        group.expect_peers(1)
    assert group.max_running(since) == 2
    assert sorted(e[1] for e in group.events("submit")[-2:]) == ["a", "b"]
    assert sorted(p.name for p in (daemon.folder("outputs") / "duo").glob("*.mp4")) == ["anna.mp4", "ben.mp4"]


def test_a_render_at_constant_progress_longer_than_the_stall_window_finishes_in_one_attempt(
        daemon, services, group, voice):
    group.render_seconds = 4  # twice workers.stall_seconds, at 20 % all along
    try:
        daemon.drop_pair(voice, PORTRAIT_JPG, "slow")
        job = daemon.wait_job("slow")
    finally:
        group.render_seconds = 0
    assert job.state == "done"
    (task,) = daemon.store().tasks.select(job.id)
    assert [a["outcome"] for a in daemon.store().tasks.attempts(task.id)] == ["done"]


def test_an_outage_of_every_service_makes_two_jobs_wait_without_using_attempts_and_alerts_the_operator_once(
        daemon, services, voice, tmp_path, operator):
    for s in services:
        s.down()
    try:
        drop_duo(daemon, voice, tmp_path / "duo", "during-outage")

        def both_waiting() -> bool:
            job = daemon.job("during-outage")
            tasks = daemon.store().tasks.select(job.id) if job else []
            return len(tasks) == 2 and all(
                sum(a["outcome"] == "outage" for a in daemon.store().tasks.attempts(t.id)) >= 2 for t in tasks)

        daemon.wait_for(both_waiting, 60, "both tasks to wait on the outage")
        waiting = daemon.store().tasks.select(daemon.job("during-outage").id)
        names = {f"heygem service {s.url}" for s in services}
        assert all(t.last_error["kind"] == "outage" and t.last_error["dependency"] in names for t in waiting)
        (alert,) = operator.wait_delivered(1, "/ops", "is down", timeout=30)
        assert all(f"{name} is down" in alert.text for name in names)  # both services, one message
    finally:
        for s in services:
            s.up()
    job = daemon.wait_job("during-outage")
    assert job.state == "done"
    assert [t.attempts for t in daemon.store().tasks.select(job.id)] == [1, 1]
    (back,) = operator.wait_delivered(1, "/ops", "is back (out since", timeout=30)
    assert all(f"{name} is back" in back.text for name in names)
    assert len(operator.delivered("/ops", "is down")) == 1


def test_a_cancelled_job_leaves_nothing_in_the_data_folder_once_the_service_let_go(
        daemon, services, group, voice, released):
    submitted = len(group.events("submit"))
    group.behaviours.append("hang")
    daemon.drop_pair(voice, PORTRAIT_JPG, "cancelled")
    daemon.wait_for(lambda: len(group.events("submit")) > submitted, 60, "the job to reach a service")
    request_cancel(daemon.store(), "cancelled")
    assert daemon.wait_job("cancelled").state == "failed"
    assert data_files(services)  # the service still renders: its inputs must stay
    for s in services:
        s.release()
    daemon.wait_for(lambda: data_files(services) == [], 30, "the sweep to remove the cancelled job's files")


def test_a_render_left_running_by_a_killed_daemon_is_followed_after_restart_not_rendered_again(
        daemon, services, group, voice, released):
    submitted = len(group.events("submit"))
    group.behaviours.append("hang")  # the render stays running on its service until released
    daemon.drop_pair(voice, PORTRAIT_JPG, "restarted")
    daemon.wait_for(lambda: len(group.events("submit")) > submitted, 60, "the job to reach a service")
    code = group.events("submit")[-1][2].split()[0]
    daemon.kill()
    since = len(group.journal)
    daemon.start()
    daemon.wait_for(lambda: ("status1", group.events("submit")[-1][1], code) in group.journal[since:], 60,
                    "the restarted daemon to ask the service about the render left running")
    for s in services:
        s.release()
    job = daemon.wait_job("restarted")
    assert job.state == "done"
    assert len(group.events("submit")) == submitted + 1  # rendered once
    assert video_facts(daemon.folder("outputs") / "restarted" / "restarted.mp4").has_audio
    daemon.wait_for(lambda: data_files(services) == [], 30, "the data folder to be clean")


def test_several_faces_seen_by_the_service_end_the_job_at_once_as_bad_input(daemon, services, group, voice):
    group.behaviours.append("fail:存在多人脸")  # the service's face detector saw a second person
    daemon.drop_pair(voice, PORTRAIT_JPG, "crowd")
    job = daemon.wait_job("crowd")
    assert job.state == "failed"
    (task,) = daemon.store().tasks.select(job.id)
    assert len(daemon.store().tasks.attempts(task.id)) == 1
    record = json.loads((daemon.folder("failed") / "crowd" / "error.json").read_text())
    assert record["reason"].endswith("the portrait shows more than one face (存在多人脸)")
    assert "exactly one person" in record["hint"] and "retried" not in record["hint"]
    assert data_files(services) == []
