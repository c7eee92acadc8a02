"""The real daemon turns a script and a photo into a talking video, with subtitles, using the offline speech
engine."""

from __future__ import annotations

import shutil

import pytest

from daemon_harness import DaemonHarness
from heygem_daemon.media.audio import load_clip
from media_factory import PORTRAIT_JPG, video_facts

pytestmark = [pytest.mark.daemon,
              pytest.mark.skipif(shutil.which("espeak-ng") is None,
                                 reason="espeak-ng is not installed (apt-get install espeak-ng)")]


def test_a_script_and_a_photo_become_a_video_whose_sound_is_the_spoken_script_with_subtitles(tmp_path):
    daemon = DaemonHarness(tmp_path / "base").start()
    try:
        (tmp_path / "hello.txt").write_bytes("Hello, and welcome to the team.".encode("utf-16"))
        daemon.drop(PORTRAIT_JPG, "hello.jpg")
        daemon.drop(tmp_path / "hello.txt", "hello.txt")
        job = daemon.wait_job("hello")
        assert job.state == "done", daemon.log_text()[-2000:]
        [speech] = (daemon.folder("work") / ".speech-cache").glob("[!.]*.wav")
        spoken = load_clip(speech).duration
        facts = video_facts(daemon.folder("outputs") / "hello" / "hello.mp4")
        assert spoken > 1.0 and facts.has_video
        assert abs(facts.audio_duration - spoken) <= 0.05
        assert list(daemon.folder("archive").glob("*/hello/hello.txt"))
        subtitles = (daemon.folder("outputs") / "hello" / "hello.srt").read_text(encoding="utf-8")
        assert subtitles.endswith("Hello, and welcome to the team.\n\n")
    finally:
        daemon.stop()
