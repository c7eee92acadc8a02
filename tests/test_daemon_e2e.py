"""The real daemon process, real files: drop inputs, get playable MP4s."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from daemon_harness import DaemonHarness
from heygem_daemon.fs.files import sha256_file
from media_factory import PORTRAIT_JPG, video_facts, write_portrait_video, write_speech_wav

pytestmark = pytest.mark.daemon  # starts the real daemon: left out of `make test-fast`

FPS = 25


@pytest.fixture
def daemon(tmp_path):
    harness = DaemonHarness(tmp_path / "base")
    yield harness.start()
    harness.stop()


@pytest.fixture
def media(tmp_path) -> Path:
    src = tmp_path / "src"
    src.mkdir()
    write_speech_wav(src / "voice.wav", 2.0)
    write_speech_wav(src / "voice2.wav", 1.2)
    return src


def assert_playable(path: Path, audio_seconds: float, height: int = 480) -> None:
    facts = video_facts(path)
    assert facts.has_video and facts.has_audio
    assert facts.height == height
    assert abs(facts.video_duration - audio_seconds) <= 1 / FPS + 1e-6
    assert abs(facts.audio_duration - facts.video_duration) <= 1 / FPS + 0.03


def test_loose_pair_becomes_a_playable_mp4_and_the_job_is_done(daemon, media):
    daemon.drop(media / "voice.wav", "alice.wav")
    daemon.drop(PORTRAIT_JPG, "alice.jpg")
    job = daemon.wait_job("alice")
    assert job.state == "done"
    out = daemon.folder("outputs") / "alice" / "alice.mp4"
    assert_playable(out, 2.0)
    assert [t.state for t in daemon.store().tasks.select(job.id)] == ["done"]
    assert not list(daemon.folder("outputs").rglob("*.part"))
    archived = list(daemon.folder("archive").glob("*/alice/alice.wav"))
    assert len(archived) == 1 and sha256_file(archived[0]) == sha256_file(media / "voice.wav")
    assert not os.listdir(daemon.inbox) and not os.listdir(daemon.folder("work"))


def test_one_audio_and_three_portraits_make_three_videos(daemon, media, tmp_path):
    write_portrait_video(tmp_path / "moving.mp4", 1.0)
    staging = tmp_path / "batch"
    staging.mkdir()
    shutil.copy(media / "voice.wav", staging / "speech.wav")
    shutil.copy(PORTRAIT_JPG, staging / "anna.jpg")
    shutil.copy(PORTRAIT_JPG, staging / "ben.png")
    shutil.copy(tmp_path / "moving.mp4", staging / "carl.mp4")
    os.rename(staging, daemon.inbox / "batch")
    job = daemon.wait_job("batch")
    assert job.state == "done"
    outs = sorted(p.name for p in (daemon.folder("outputs") / "batch").glob("*.mp4"))
    assert outs == ["anna.mp4", "ben.mp4", "carl.mp4"]
    for name in outs:
        assert_playable(daemon.folder("outputs") / "batch" / name, 2.0)


def test_many_audios_and_one_portrait_make_one_video_per_audio(daemon, media):
    daemon.drop(media / "voice.wav", "intro.wav", folder="lessons")
    daemon.drop(media / "voice2.wav", "outro.wav", folder="lessons")
    daemon.drop(PORTRAIT_JPG, "teacher.jpg", folder="lessons")
    (daemon.inbox / "lessons" / ".ready").touch()
    assert daemon.wait_job("lessons").state == "done"
    assert_playable(daemon.folder("outputs") / "lessons" / "intro.mp4", 2.0)
    assert_playable(daemon.folder("outputs") / "lessons" / "outro.mp4", 1.2)


def test_status_command_shows_the_finished_job(daemon, media):
    daemon.drop(media / "voice2.wav", "bob.wav")
    daemon.drop(PORTRAIT_JPG, "bob.jpg")
    daemon.wait_job("bob")
    out = subprocess.run([sys.executable, "-m", "heygem_daemon.cli", "-c", str(daemon.config_path), "status",
                          "--json"], capture_output=True, text=True, check=True).stdout
    job = next(j for j in json.loads(out)["jobs"] if j["name"] == "bob")
    assert job["state"] == "done" and job["done"] == 1 and job["outputs"].endswith("outputs/bob")


def test_identical_drop_is_not_generated_twice(daemon, media):
    daemon.drop(media / "voice2.wav", "carol.wav")
    daemon.drop(PORTRAIT_JPG, "carol.jpg")
    first = daemon.wait_job("carol")
    daemon.drop(media / "voice2.wav", "carol.wav")
    daemon.drop(PORTRAIT_JPG, "carol.jpg")
    second = daemon.wait_job("carol-2")
    assert second.duplicate_of == first.id and second.state == "done"
    assert daemon.store().tasks.select(second.id) == []
    assert not (daemon.folder("outputs") / "carol-2").exists()
    # Logged right after the job turns done: the test may read the log first.
    daemon.wait_for(lambda: "duplicate drop" in daemon.log_text(), 10, "the duplicate drop's log line")


def test_a_second_daemon_on_the_same_state_refuses_to_start(daemon):
    proc = subprocess.run([sys.executable, "daemon.py", "-c", str(daemon.config_path)],
                          cwd=Path(__file__).resolve().parent.parent, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "already serving" in proc.stderr
    assert daemon.alive()


def test_sigterm_on_an_idle_daemon_exits_0_without_waiting_for_the_drain(daemon):
    # With tasks running, SIGTERM drains first: see tests/test_lifecycle.py.
    assert daemon.stop() == 0
    assert "stopped" in daemon.log_text() and "draining" not in daemon.log_text()


def cli(daemon: DaemonHarness, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "heygem_daemon.cli", "-c", str(daemon.config_path), *args],
                          capture_output=True, text=True)


def test_failed_job_is_listed_with_its_hint_and_retry_after_a_fix_delivers_it(daemon, media):
    from media_factory import FIXTURES

    daemon.drop(media / "voice2.wav", "dave.wav")
    daemon.drop(FIXTURES / "no_face.jpg", "dave.jpg")
    assert daemon.wait_job("dave").state == "failed"
    listed = cli(daemon, "jobs", "--failed").stdout
    assert "dave" in listed and "no face" in listed and "hint:" in listed
    shutil.copy(PORTRAIT_JPG, daemon.folder("failed") / "dave" / "dave.jpg")  # the person fixes the photo
    done = cli(daemon, "retry", "dave")
    assert done.returncode == 0, done.stderr
    job = daemon.wait_for(lambda: next((j for j in daemon.store().jobs.select(("done",)) if j.name == "dave"), None),
                          60, "the retried job to finish")
    assert (daemon.folder("outputs") / job.name / "dave.mp4").is_file()


def test_retry_of_an_unknown_job_says_how_to_find_jobs(daemon):
    result = cli(daemon, "retry", "nobody")
    assert result.returncode == 1 and "jobs --failed" in result.stderr


def test_sigterms_in_quick_succession_still_stop_the_daemon(daemon):
    """The second SIGTERM cuts any drain short; the rest must do no harm."""
    import signal

    for _ in range(5):
        daemon.proc.send_signal(signal.SIGTERM)
        time.sleep(0.01)
    assert daemon.proc.wait(30) == 0
