"""`engine.name: wav2lip` through the real daemon on CPU, with random weights saved in the released format.

One daemon serves the working cases (module-scoped: the model loads once), another one the broken
checkpoints. Media are small (240 px, about a second) because CPU inference of the 36 M model is slow.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from daemon_harness import DaemonHarness  # noqa: E402
from heygem_daemon.engines.wav2lip.checkpoint import save_checkpoint  # noqa: E402
from heygem_daemon.engines.wav2lip.model import Wav2Lip  # noqa: E402
from heygem_daemon.media.faces import detect_face  # noqa: E402
from heygem_daemon.media.face_spec import scaled_edges  # noqa: E402
from heygem_daemon.media.frames import open_portrait  # noqa: E402
from media_factory import (  # noqa: E402
    FIXTURES,
    PORTRAIT_JPG,
    decoded_frames,
    video_facts,
    write_portrait_video,
    write_speech_wav,
)

pytestmark = pytest.mark.daemon  # starts the real daemon: left out of `make test-fast`

HEIGHT, FPS = 240, 25
PADS = (0, 10, 0, 0)  # the engine's default: top, bottom, left, right
FACE_BOX = (40, 200, 80, 240)  # top, bottom, left, right in no_face.jpg's own 320x213 pixels
SMALL = {"presets": {"small": {"height": HEIGHT, "fps": FPS, "video_bitrate": 400_000, "audio_bitrate": 64_000}}}


def _overrides(checkpoint: Path) -> dict:
    return {**SMALL, "engine": {"name": "wav2lip", "preset": "small"},
            "engines": {"wav2lip": {"checkpoint": str(checkpoint)}}}


def _error(daemon: DaemonHarness, name: str) -> dict:
    return json.loads((daemon.folder("failed") / name / "error.json").read_text())


def _mean_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


@pytest.fixture(scope="module")
def media(tmp_path_factory: pytest.TempPathFactory) -> Path:
    src = tmp_path_factory.mktemp("w2l-media")
    write_speech_wav(src / "voice.wav", 1.2)
    write_speech_wav(src / "one.wav", 1.0)
    write_speech_wav(src / "two.wav", 0.8)
    write_portrait_video(src / "face.mp4", 0.6)
    return src


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory, media: Path):
    """A daemon on a valid checkpoint, fed a still portrait, a portrait video with two audios, and no face."""
    base = tmp_path_factory.mktemp("w2l") / "base"
    checkpoint = save_checkpoint(Wav2Lip(), base.parent / "wav2lip.pth")
    harness = DaemonHarness(base, _overrides(checkpoint)).start()
    harness.drop(media / "voice.wav", "anna.wav")
    harness.drop(PORTRAIT_JPG, "anna.jpg")
    for name in ("one.wav", "two.wav", "face.mp4"):
        harness.drop(media / name, folder="clips")
    harness.drop(media / "voice.wav", "nobody.wav")
    harness.drop(FIXTURES / "no_face.jpg", "nobody.jpg")
    harness.drop(media / "one.wav", folder="boxed")
    harness.drop(FIXTURES / "no_face.jpg", "scene.jpg", folder="boxed")
    (harness.inbox / "boxed" / "job.yaml").write_text(f"face_box: {list(FACE_BOX)}\n")
    for job in ("anna", "clips", "nobody", "boxed"):
        harness.wait_job(job, timeout=180)
    yield harness
    harness.stop()


@pytest.fixture(scope="module")
def anna(daemon: DaemonHarness, tmp_path_factory: pytest.TempPathFactory) -> tuple[list[np.ndarray], np.ndarray, tuple]:
    """The still-portrait video's frames, the portrait as the engine sees it, and its padded face box."""
    base = np.array(open_portrait(PORTRAIT_JPG, HEIGHT, tmp_path_factory.mktemp("scratch")).frame(0))
    face = detect_face(base)
    assert face is not None
    top, bottom, left, right = PADS
    box = (face.x - left, face.y - top, face.x + face.w + right, face.y + face.h + bottom)
    return decoded_frames(daemon.folder("outputs") / "anna" / "anna.mp4"), base, box


def test_still_portrait_becomes_a_playable_mp4_as_long_as_the_audio(daemon: DaemonHarness) -> None:
    assert daemon.job("anna").state == "done"
    facts = video_facts(daemon.folder("outputs") / "anna" / "anna.mp4")
    assert facts.has_video and facts.has_audio and facts.height == HEIGHT
    assert abs(facts.video_duration - 1.2) <= 1 / FPS + 1e-6
    assert abs(facts.audio_duration - facts.video_duration) <= 1 / FPS + 0.03


def test_pixels_outside_the_padded_face_box_are_the_portraits(anna) -> None:
    frames, base, (x1, y1, x2, y2) = anna
    margin = 8  # H.264 blocks straddling the box edge may change a little
    outside = np.ones(base.shape[:2], bool)
    outside[max(0, y1 - margin) : y2 + margin, max(0, x1 - margin) : x2 + margin] = False
    for frame in frames[::5]:
        # what remains is the codec's own loss (yuv420p, bitrate ramp-up)
        assert _mean_diff(frame[outside], base[outside]) < 5


def test_the_mouth_half_of_the_face_box_is_generated(anna) -> None:
    frames, base, (x1, y1, x2, y2) = anna
    mouth = (slice((y1 + y2) // 2, y2), slice(x1, x2))
    assert all(_mean_diff(frame[mouth], base[mouth]) > 10 for frame in frames[::5])


def test_many_audios_on_one_portrait_video_detect_its_faces_once(daemon: DaemonHarness) -> None:
    assert daemon.job("clips").state == "done"
    for name, seconds in (("one", 1.0), ("two", 0.8)):
        facts = video_facts(daemon.folder("outputs") / "clips" / f"{name}.mp4")
        assert abs(facts.video_duration - seconds) <= 1 / FPS + 1e-6
    # The worker's log lines go to the daemon's console (its stdout).
    console = daemon.console.read_text(errors="replace")
    assert console.count("face boxes detected") == 1
    assert console.count("face boxes from cache") == 1
    assert len(list((daemon.folder("work") / ".cache" / "wav2lip-boxes").glob("*.npy"))) == 1


def test_a_portrait_without_a_face_fails_with_the_reason_and_a_hint(daemon: DaemonHarness) -> None:
    assert daemon.job("nobody").state == "failed"
    record = _error(daemon, "nobody")
    assert "no face" in record["reason"] and record["hint"]


def test_a_face_box_from_job_yaml_is_used_where_the_detector_finds_nothing(
        daemon: DaemonHarness, tmp_path: Path) -> None:
    assert daemon.job("boxed").state == "done"
    portrait = open_portrait(FIXTURES / "no_face.jpg", HEIGHT, tmp_path)
    base = np.array(portrait.frame(0))
    top, bottom, left, right = scaled_edges(FACE_BOX, (320, 213), portrait.size)
    assert (top, bottom, left, right) == (45, 225, 90, 270)
    frames = decoded_frames(daemon.folder("outputs") / "boxed" / "scene.mp4")
    outside = np.ones(base.shape[:2], bool)
    outside[top - 8 : bottom + 8, left - 8 : right + 8] = False
    mouth = (slice((top + bottom) // 2, bottom), slice(left, right))
    for frame in frames[::5]:
        assert _mean_diff(frame[outside], base[outside]) < 5
        assert _mean_diff(frame[mouth], base[mouth]) > 10


# --- broken checkpoints -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def broken(tmp_path_factory: pytest.TempPathFactory):
    """A daemon whose checkpoint path each test fills (or not) before it drops a job."""
    base = tmp_path_factory.mktemp("w2l-broken") / "base"
    models = base.parent / "models"
    models.mkdir()
    harness = DaemonHarness(base, _overrides(models / "wav2lip.pth")).start()
    yield harness
    harness.stop()


@pytest.fixture(scope="module")
def valid_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_checkpoint(Wav2Lip(), tmp_path_factory.mktemp("ckpt") / "valid.pth")


def _checkpoint_path(daemon: DaemonHarness) -> Path:
    return daemon.base.parent / "models" / "wav2lip.pth"


def _fails_at_once(daemon: DaemonHarness, media: Path, name: str) -> dict:
    daemon.drop(media / "two.wav", f"{name}.wav")
    daemon.drop(PORTRAIT_JPG, f"{name}.jpg")
    job = daemon.wait_job(name, timeout=120)
    assert job.state == "failed" and daemon.alive()
    assert [t.attempts for t in daemon.store().tasks.select(job.id)] == [1]  # not retried on a timer
    record = _error(daemon, name)
    assert record["stage"] == "generate"
    assert str(_checkpoint_path(daemon)) in record["reason"]
    assert "engines.wav2lip.checkpoint" in record["hint"]
    return record


def test_a_missing_checkpoint_fails_the_task_naming_the_file_and_the_fix(broken, media) -> None:
    _checkpoint_path(broken).unlink(missing_ok=True)
    assert "not found" in _fails_at_once(broken, media, "missing")["reason"]


def test_a_file_that_is_not_a_checkpoint_fails_the_task_clearly(broken, media) -> None:
    _checkpoint_path(broken).write_text("these are my notes, not weights\n")
    assert "not a" in _fails_at_once(broken, media, "notes")["reason"]


def test_a_truncated_checkpoint_fails_the_task_clearly(broken, media, valid_checkpoint) -> None:
    _checkpoint_path(broken).write_bytes(valid_checkpoint.read_bytes()[: 1 << 20])
    assert "corrupted or truncated" in _fails_at_once(broken, media, "cut")["reason"]


def test_retry_after_the_checkpoint_is_fixed_delivers_the_video_without_a_restart(broken, media,
                                                                                   valid_checkpoint) -> None:
    _checkpoint_path(broken).unlink(missing_ok=True)
    _fails_at_once(broken, media, "later")
    _checkpoint_path(broken).write_bytes(valid_checkpoint.read_bytes())
    retry = subprocess.run([sys.executable, "-m", "heygem_daemon.cli", "-c", str(broken.config_path), "retry", "later"],
                           capture_output=True, text=True)
    assert retry.returncode == 0, retry.stderr
    broken.wait_for(lambda: (broken.folder("outputs") / "later" / "later.mp4").is_file(), 120, "the retried video")
