"""Files are taken only when completely written: slow writers, mv without close events, .ready markers."""

import os
import time

import pytest

from daemon_harness import DaemonHarness
from heygem_daemon.fs.files import sha256_file
from media_factory import PORTRAIT_JPG, write_speech_wav

pytestmark = pytest.mark.daemon  # starts the real daemon: left out of `make test-fast`


@pytest.fixture
def daemon(tmp_path):
    harness = DaemonHarness(tmp_path / "base", {"watcher": {"settle_seconds": 2.0}})
    yield harness.start()
    harness.stop()


def test_a_writer_that_pauses_longer_than_the_settle_window_is_never_taken_early(daemon, tmp_path):
    src = write_speech_wav(tmp_path / "long.wav", 3.0)
    data = src.read_bytes()
    daemon.drop(PORTRAIT_JPG, "slow.jpg")
    with open(daemon.inbox / "slow.wav", "wb") as fh:  # the handle stays open, as an SMB client's does
        fh.write(data[: len(data) // 2])
        fh.flush()
        pause_ends = time.monotonic() + 3.0  # past the 2 s settle window and the 1 s cut-short grace
        while time.monotonic() < pause_ends:
            assert daemon.job("slow") is None, "taken while its writer paused"
            time.sleep(0.2)
        fh.write(data[len(data) // 2:])
    job = daemon.wait_job("slow")
    assert job.state == "done"
    archived = next(daemon.folder("archive").glob("*/slow/slow.wav"))
    assert sha256_file(archived) == sha256_file(src)


def test_file_moved_in_without_a_close_event_is_taken(daemon, tmp_path):
    outside = daemon.base / "elsewhere"
    outside.mkdir()
    write_speech_wav(outside / "moved.wav", 1.0)
    daemon.drop(PORTRAIT_JPG, "moved.jpg")
    os.rename(outside / "moved.wav", daemon.inbox / "moved.wav")
    assert daemon.wait_job("moved").state == "done"


def test_ready_marker_takes_a_folder_at_once(tmp_path):
    harness = DaemonHarness(tmp_path / "base", {"watcher": {"settle_seconds": 120}}).start()
    try:
        write_speech_wav(tmp_path / "v.wav", 1.0)
        harness.drop(tmp_path / "v.wav", "v.wav", folder="now")
        harness.drop(PORTRAIT_JPG, "p.jpg", folder="now")
        time.sleep(1.0)
        assert harness.job("now") is None  # without the marker it would wait the 120 s settle window
        (harness.inbox / "now" / ".ready").touch()
        harness.wait_for(lambda: harness.job("now"), 15, "folder with .ready to be claimed")
    finally:
        harness.stop()


def test_polling_mode_takes_files_too(tmp_path):
    harness = DaemonHarness(tmp_path / "base", {"watcher": {"mode": "polling"}}).start()
    try:
        assert "mode=polling" in harness.log_text() or '"mode": "polling"' in harness.log_text()
        write_speech_wav(tmp_path / "p.wav", 1.0)
        harness.drop(tmp_path / "p.wav", "polled.wav")
        harness.drop(PORTRAIT_JPG, "polled.jpg")
        assert harness.wait_job("polled").state == "done"
    finally:
        harness.stop()
