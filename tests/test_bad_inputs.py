"""Bad input ends in failed/<job>/error.json with a reason and a hint, nothing is lost, and the same
daemon keeps serving everyone else (one daemon runs through this whole module)."""

import json
import os
import shutil

import numpy as np
import pytest

from daemon_harness import DaemonHarness
from media_factory import (
    FIXTURES, PORTRAIT_JPG, speech, truncate, write_float_wav, write_png_header, write_speech_wav,
)

pytestmark = pytest.mark.daemon  # starts the real daemon: left out of `make test-fast`


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    base = tmp_path_factory.mktemp("bad") / "base"
    harness = DaemonHarness(base, {"limits": {"max_audio_seconds": 5}, "watcher": {"pair_timeout": 2}})
    harness.start()
    yield harness
    harness.stop()


def rejected(daemon: DaemonHarness, name: str) -> dict:
    job = daemon.wait_job(name, timeout=60)
    assert job.state == "failed"
    record = json.loads((daemon.folder("failed") / name / "error.json").read_text())
    assert record["stage"] and record["reason"] and record["hint"]
    assert daemon.alive()
    return record


def test_zero_byte_audio(daemon, voice):
    (daemon.inbox / "empty.wav").write_bytes(b"")
    daemon.drop(PORTRAIT_JPG, "empty.jpg")
    record = rejected(daemon, "empty")
    assert "empty" in record["reason"]
    assert (daemon.folder("failed") / "empty" / "empty.jpg").is_file()


def test_truncated_wav(daemon, voice, tmp_path):
    shutil.copy(voice, tmp_path / "cut.wav")
    daemon.drop(truncate(tmp_path / "cut.wav", 0.5), "cut.wav")
    daemon.drop(PORTRAIT_JPG, "cut.jpg")
    assert "cut short" in rejected(daemon, "cut")["reason"]


def test_float_wav_with_nan_samples_is_refused_at_intake_leaving_no_outputs_folder(daemon, tmp_path):
    samples = speech(1.0)
    samples[8000:8400] = np.nan
    daemon.drop(write_float_wav(tmp_path / "nan.wav", samples), "nan.wav")
    daemon.drop(PORTRAIT_JPG, "nan.jpg")
    record = rejected(daemon, "nan")
    assert "NaN or infinite" in record["reason"] and "export it again" in record["hint"]
    assert not (daemon.folder("outputs") / "nan").exists()


def test_text_file_named_png(daemon, voice):
    (daemon.inbox / "fake.png").write_text("this is not an image\n")
    daemon.drop(voice, "fake.wav")
    assert "not a valid image" in rejected(daemon, "fake")["reason"]


def test_image_without_a_face(daemon, voice):
    daemon.drop(voice, "coffee.wav")
    daemon.drop(FIXTURES / "no_face.jpg", "coffee.jpg")
    record = rejected(daemon, "coffee")
    assert "no face" in record["reason"]


def test_audio_over_the_duration_limit(daemon, tmp_path):
    daemon.drop(write_speech_wav(tmp_path / "long.wav", 6.0), "long.wav")
    daemon.drop(PORTRAIT_JPG, "long.jpg")
    record = rejected(daemon, "long")
    assert "5" in record["reason"] and "6" in record["reason"]


def test_huge_dimension_image(daemon, voice, tmp_path):
    daemon.drop(write_png_header(tmp_path / "bomb.png", 30000, 30000), "bomb.png")
    daemon.drop(voice, "bomb.wav")
    assert "pixels" in rejected(daemon, "bomb")["reason"]


def test_symlink_to_a_file_outside_the_inbox(daemon, voice, tmp_path):
    secret = tmp_path / "secret.jpg"
    shutil.copy(PORTRAIT_JPG, secret)
    os.symlink(secret, daemon.inbox / "linked.jpg")
    daemon.drop(voice, "linked.wav")
    assert "symbolic link" in rejected(daemon, "linked")["reason"]
    assert secret.is_file()
    assert (daemon.folder("failed") / "linked" / "linked.jpg").is_symlink()


def test_fifo(daemon, voice):
    os.mkfifo(daemon.inbox / "pipe.wav")
    daemon.drop(PORTRAIT_JPG, "pipe.jpg")
    assert "not a regular file" in rejected(daemon, "pipe")["reason"]


def test_job_yaml_naming_a_path_out_of_the_folder(daemon, voice):
    daemon.drop(voice, "a.wav", folder="escape")
    daemon.drop(PORTRAIT_JPG, "p.jpg", folder="escape")
    (daemon.inbox / "escape" / "job.yaml").write_text("pairs:\n  - {audio: ../../etc/passwd, portrait: p.jpg}\n")
    assert "not a file in this folder" in rejected(daemon, "escape")["reason"]


def test_invalid_job_yaml(daemon, voice):
    daemon.drop(voice, "a.wav", folder="broken")
    daemon.drop(PORTRAIT_JPG, "p.jpg", folder="broken")
    (daemon.inbox / "broken" / "job.yaml").write_text("pairs: [unclosed\n")
    assert "not valid YAML" in rejected(daemon, "broken")["reason"]


def test_non_utf8_file_name(daemon, voice):
    raw = os.fsencode(daemon.inbox) + b"/caf\xe9.wav"
    shutil.copyfile(voice, raw)
    job = daemon.wait_for(lambda: next((j for j in daemon.store().jobs.select(("failed",)) if j.name.startswith("caf")),
                                       None), 30, "non-UTF-8 name to be refused")
    assert "not valid UTF-8" in job.error["reason"]
    assert os.listdir(os.fsencode(daemon.folder("failed") / job.name)) != []


def test_unpaired_file_goes_to_failed_after_the_pair_timeout(daemon, voice):
    daemon.drop(voice, "lonely.wav")
    record = rejected(daemon, "lonely")
    assert "no portrait" in record["reason"] and "lonely" in record["hint"]


def test_daemon_still_serves_a_good_job_after_all_that(daemon, voice):
    daemon.drop(voice, "good.wav")
    daemon.drop(PORTRAIT_JPG, "good.jpg")
    assert daemon.wait_job("good").state == "done"
    assert (daemon.folder("outputs") / "good" / "good.mp4").is_file()
    assert os.listdir(daemon.inbox) == []
