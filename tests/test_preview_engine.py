from __future__ import annotations

import dataclasses

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

import av

from heygem_daemon.config import DEFAULT_PRESETS, Preset
from heygem_daemon.engines.base import BadInputError, TaskSpec
from heygem_daemon.engines.preview import PreviewEngine
from heygem_daemon.engines.preview_render import MouthRig, mouth_openness
from heygem_daemon.media.audio import load_mono
from heygem_daemon.media.faces import Box, detect_face
from heygem_daemon.media.frames import open_portrait
from media_factory import (
    PORTRAIT_JPG,
    VideoFacts,
    decoded_frames,
    speech,
    video_facts,
    write_portrait_video,
    write_speech_wav,
    write_wav,
)

PRESET = Preset(height=240, fps=25, video_bitrate=400_000, audio_bitrate=64_000)
SPEECH_S, SILENCE_S = 1.2, 0.8


def _task(tmp: Path, audio: Path, portrait: Path, preset: Preset = PRESET) -> TaskSpec:
    work = tmp / "work"
    work.mkdir(exist_ok=True)
    return TaskSpec(1, "job", "clip", audio, portrait, tmp / "out.mp4.part", work, preset)


@dataclass(frozen=True)
class StillRun:
    task: TaskSpec
    facts: VideoFacts
    frames: list[np.ndarray]
    base: np.ndarray
    box: Box
    openness: np.ndarray
    progress: list[float]


@pytest.fixture(scope="module")
def still_run(tmp_path_factory: pytest.TempPathFactory) -> StillRun:
    """One generation shared by the output checks: speech, then silence, over the still portrait."""
    tmp = tmp_path_factory.mktemp("still")
    audio = write_wav(tmp / "voice.wav", np.concatenate([speech(SPEECH_S), np.zeros(int(SILENCE_S * 16000))]))
    task = _task(tmp, audio, PORTRAIT_JPG)
    progress: list[float] = []
    PreviewEngine(PreviewEngine.Settings()).generate(task, progress.append)
    base = np.array(open_portrait(PORTRAIT_JPG, PRESET.height, tmp).frame(0))
    box = detect_face(base)
    assert box is not None
    frames = decoded_frames(task.output)
    openness = mouth_openness(load_mono(audio), len(frames), PRESET.fps, 1.0)
    return StillRun(task, video_facts(task.output), frames, base, box, openness, progress)


def _mean_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


def test_output_decodes_with_video_and_audio(still_run: StillRun) -> None:
    assert still_run.facts.has_video and still_run.facts.has_audio
    assert still_run.facts.frames == len(still_run.frames) > 0


def test_duration_matches_audio_within_one_frame(still_run: StillRun) -> None:
    frame = 1 / PRESET.fps
    assert abs(still_run.facts.video_duration - (SPEECH_S + SILENCE_S)) <= frame
    assert abs(still_run.facts.audio_duration - still_run.facts.video_duration) <= frame


def test_output_height_follows_the_preset(still_run: StillRun) -> None:
    assert (still_run.facts.width, still_run.facts.height) == (240, 240)


def test_mouth_opens_on_speech_and_rests_in_silence(still_run: StillRun) -> None:
    box = still_run.box
    mouth = (slice(box.y + box.h * 3 // 4, box.y + box.h), slice(box.x + box.w // 4, box.x + box.w * 3 // 4))
    loud = int(np.argmax(still_run.openness))
    silent = len(still_run.frames) - 3
    assert still_run.openness[loud] > 0.8 and still_run.openness[silent] == 0.0
    assert _mean_diff(still_run.frames[loud][mouth], still_run.base[mouth]) > 10
    assert _mean_diff(still_run.frames[silent][mouth], still_run.base[mouth]) < 3


def test_pixels_outside_the_face_box_stay_unchanged(still_run: StillRun) -> None:
    box, margin = still_run.box, 6  # H.264 blocks straddling the box edge may change a little
    outside = np.ones(still_run.base.shape[:2], bool)
    outside[box.y - margin : box.y + box.h + margin, box.x - margin : box.x + box.w + margin] = False
    for frame in still_run.frames[::5]:
        # What remains is the codec's own loss (yuv420p, bitrate ramp-up), the same in every frame.
        assert _mean_diff(frame[outside], still_run.base[outside]) < 5


def test_progress_is_reported_every_two_percent(still_run: StillRun) -> None:
    steps = still_run.progress
    assert steps[0] == 0.0 and steps[-1] == 1.0
    assert all(b >= a for a, b in zip(steps, steps[1:]))
    assert max(b - a for a, b in zip(steps, steps[1:])) <= 0.021


def test_mouth_rig_only_draws_inside_the_face_box(still_run: StillRun) -> None:
    base, box = still_run.base, still_run.box
    canvas = base.copy()
    MouthRig(box, (base.shape[1], base.shape[0])).draw(canvas, base, 1.0)
    changed = np.argwhere(np.any(canvas != base, axis=2))
    assert len(changed) > 50
    assert changed[:, 0].min() >= box.y and changed[:, 0].max() < box.y + box.h
    assert changed[:, 1].min() >= box.x and changed[:, 1].max() < box.x + box.w


def test_mouth_openness_is_zero_for_silence() -> None:
    assert not mouth_openness(np.zeros(16000, np.float32), 25, 25, 1.0).any()


def test_mouth_openness_follows_syllables() -> None:
    openness = mouth_openness(speech(2.0), 50, 25, 1.0)
    assert openness.max() > 0.8 and (openness < 0.2).sum() >= 5  # opens wide and closes between syllables


def test_video_portrait_gives_full_length_output(tmp_path: Path) -> None:
    video = write_portrait_video(tmp_path / "face.mp4", 0.6)
    task = _task(tmp_path, write_speech_wav(tmp_path / "voice.wav", 1.5), video)
    PreviewEngine(PreviewEngine.Settings(detect_every=3)).generate(task, lambda _f: None)
    facts = video_facts(task.output)
    assert facts.has_audio and facts.frames == round(1.5 * PRESET.fps)
    assert (facts.width, facts.height) == (240, 240)


def test_the_1080p_preset_writes_hevc_tagged_hvc1_at_30_fps(tmp_path: Path) -> None:
    task = _task(tmp_path, write_speech_wav(tmp_path / "voice.wav", 0.5), PORTRAIT_JPG, DEFAULT_PRESETS["1080p"])
    PreviewEngine(PreviewEngine.Settings()).generate(task, lambda _f: None)
    with av.open(str(task.output)) as container:
        video = container.streams.video[0]
        assert (video.codec_context.name, video.codec_tag) == ("hevc", "hvc1")
        assert video.codec_context.height == 1080
    facts = video_facts(task.output)
    assert facts.has_audio and facts.fps == 30 and facts.frames == 15


def test_a_face_box_from_job_yaml_places_the_mouth_where_the_detector_finds_nothing(
        tmp_path: Path, no_face_jpg: Path) -> None:
    task = _task(tmp_path, write_wav(tmp_path / "voice.wav", speech(1.0)), no_face_jpg)
    task = dataclasses.replace(task, options={"face_box": [40, 200, 80, 240]})  # no_face.jpg is 320x213
    PreviewEngine(PreviewEngine.Settings()).generate(task, lambda _f: None)
    base = np.array(open_portrait(no_face_jpg, PRESET.height, tmp_path).frame(0))
    diff = np.abs(np.stack(decoded_frames(task.output)).astype(np.int16) - base).mean(axis=3)
    # 240/213 scale: the box is rows 45..225, columns 90..270 of the output; the mouth is in its lower part.
    widest = diff[int(diff[:, 171:225, 144:216].mean(axis=(1, 2)).argmax())]
    rows, cols = np.nonzero(widest > 60)
    assert rows.size > 100
    assert 45 + 0.6 * 180 <= rows.min() and rows.max() < 225 and 90 <= cols.min() and cols.max() < 270


def test_no_face_portrait_raises_bad_input(tmp_path: Path, no_face_jpg: Path) -> None:
    task = _task(tmp_path, write_speech_wav(tmp_path / "voice.wav", 0.5), no_face_jpg)
    with pytest.raises(BadInputError, match="no face found in no_face.jpg") as err:
        PreviewEngine(PreviewEngine.Settings()).generate(task, lambda _f: None)
    assert err.value.hint and not err.value.kind.retried
    assert not task.output.exists()


def test_undecodable_audio_raises_bad_input(tmp_path: Path) -> None:
    fake = tmp_path / "voice.wav"
    fake.write_text("not audio")
    with pytest.raises(BadInputError, match="voice.wav") as err:
        PreviewEngine(PreviewEngine.Settings()).generate(_task(tmp_path, fake, PORTRAIT_JPG), lambda _f: None)
    assert err.value.hint


def test_failure_mid_run_leaves_no_partial_output(tmp_path: Path) -> None:
    task = _task(tmp_path, write_speech_wav(tmp_path / "voice.wav", 1.0), PORTRAIT_JPG)

    def cancel(fraction: float) -> None:
        if fraction > 0.5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        PreviewEngine(PreviewEngine.Settings()).generate(task, cancel)
    assert not task.output.exists()
