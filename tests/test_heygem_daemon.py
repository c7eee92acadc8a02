"""The real daemon with engine `heygem`, delivering through two stand-in services on 127.0.0.1."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from daemon_harness import DaemonHarness
from heygem_standin import Group, HeygemStandin
from media_factory import PORTRAIT_JPG, video_facts, write_portrait_video

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
def daemon(tmp_path_factory, services):
    harness = DaemonHarness(tmp_path_factory.mktemp("heygem-daemon"), {
        "engine": {"name": "heygem"},
        "engines": {"heygem": {"services": [s.url for s in services], "data_dir": str(services[0].data_dir),
                               "poll_interval": 0.1, "stall_seconds": 4, "busy_retry_interval": 0.2}},
        "workers": {"per_device": 2},  # one slot per service
        "dedupe": {"window_hours": 0},  # every test drops the same voice
    })
    yield harness.start()
    harness.stop()


def data_files(services: list[HeygemStandin]) -> list[Path]:
    return list((services[0].data_dir / "temp").iterdir())


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
    staging = tmp_path / "duo"
    staging.mkdir()
    shutil.copy(voice, staging / "speech.wav")
    shutil.copy(PORTRAIT_JPG, staging / "anna.jpg")
    write_portrait_video(staging / "ben.mp4", 1.0)
    try:
        shutil.move(staging, daemon.inbox / "duo")
        assert daemon.wait_job("duo").state == "done"
    finally:
        group.expect_peers(1)
    assert group.max_running(since) == 2
    assert sorted(e[1] for e in group.events("submit")[-2:]) == ["a", "b"]
    assert sorted(p.name for p in (daemon.folder("outputs") / "duo").iterdir()) == ["anna.mp4", "ben.mp4"]


def test_busy_services_are_waited_for_without_failing_the_task(daemon, services, group, voice):
    busy_before = len(group.events("busy"))
    for s in services:
        s.occupy()
    try:
        daemon.drop_pair(voice, PORTRAIT_JPG, "patient")
        daemon.wait_for(lambda: len(group.events("busy")) >= busy_before + 2, 60, "the daemon to meet busy services")
    finally:
        for s in services:
            s.occupy(False)
    job = daemon.wait_job("patient")
    assert job.state == "done"
    assert [t.attempts for t in daemon.store().tasks.select(job.id)] == [1]


def test_a_stalled_service_fails_the_attempt_and_the_retry_delivers(daemon, services, group, voice):
    group.behaviours.append("stall")
    daemon.drop_pair(voice, PORTRAIT_JPG, "stuck")
    try:
        job = daemon.wait_job("stuck")
    finally:
        for s in services:
            s.unstick()
    assert job.state == "done"
    (task,) = daemon.store().tasks.select(job.id)
    first, second = daemon.store().tasks.attempts(task.id)
    assert first["outcome"] == "retry" and "stalled at 20% for 4 s" in json.loads(first["error"])["reason"]
    assert second["outcome"] == "done"
    assert data_files(services) == []


def test_a_failure_answer_ends_in_error_json_with_the_services_message(daemon, services, group, voice):
    group.behaviours.extend(["fail:no face found in the video"] * 2)
    daemon.drop_pair(voice, PORTRAIT_JPG, "faceless")
    job = daemon.wait_job("faceless")
    assert job.state == "failed"
    record = json.loads((daemon.folder("failed") / "faceless" / "error.json").read_text())
    assert record["stage"] == "generate"
    assert "heygem service at http://127.0.0.1" in record["reason"]
    assert record["reason"].endswith("failed: no face found in the video")
    assert data_files(services) == []


def test_a_daemon_killed_mid_job_finishes_it_after_restart_and_cleans_the_data_folder(
        daemon, services, group, voice):
    submitted = len(group.events("submit"))
    group.behaviours.append("stall")  # the first attempt stays running on its service until we kill
    daemon.drop_pair(voice, PORTRAIT_JPG, "restarted")
    daemon.wait_for(lambda: len(group.events("submit")) > submitted, 60, "the job to reach a service")
    daemon.kill()
    assert data_files(services)  # the killed attempt's inputs are still in the data folder
    try:
        daemon.start()
        job = daemon.wait_job("restarted")
    finally:
        for s in services:
            s.unstick()
    assert job.state == "done"
    assert video_facts(daemon.folder("outputs") / "restarted" / "restarted.mp4").has_audio
    assert data_files(services) == []
