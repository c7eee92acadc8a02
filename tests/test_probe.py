from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pytest

from heygem_daemon.config import Limits
from heygem_daemon.intake.probe import AudioProbe, PortraitProbe, ProbeError, probe_audio, probe_portrait
from heygem_daemon.media import faces
from heygem_daemon.media.face_spec import FaceRule
from media_factory import (
    truncate,
    speech,
    write_audio,
    write_float_wav,
    write_png_header,
    write_portrait_video,
    write_speech_wav,
)

LIMITS = Limits()


def refused(check: Callable[[], object], *words: str) -> ProbeError:
    """The check fails with a ProbeError whose reason names every word and which carries a hint."""
    with pytest.raises(ProbeError) as err:
        check()
    for word in words:
        assert word in err.value.reason
    assert err.value.hint
    return err.value


@pytest.mark.parametrize("ext", [".wav", ".mp3", ".m4a", ".aac", ".flac", ".ogg", ".opus"])
def test_good_audio_of_every_format_passes(tmp_path: Path, ext: str) -> None:
    path = tmp_path / f"voice{ext}"
    write_speech_wav(path, 1.5) if ext == ".wav" else write_audio(path, 1.5)
    found = probe_audio(path, LIMITS)
    assert isinstance(found, AudioProbe)
    assert found.duration == pytest.approx(1.5, abs=0.06)
    assert found.channels == 1 and found.sample_rate > 0 and found.codec


def test_zero_byte_audio_is_refused(tmp_path: Path) -> None:
    empty = tmp_path / "voice.wav"
    empty.touch()
    refused(lambda: probe_audio(empty, LIMITS), "voice.wav", "empty")


def test_truncated_wav_is_refused_with_both_lengths(tmp_path: Path) -> None:
    wav = truncate(write_speech_wav(tmp_path / "voice.wav", 2.0), 0.5)
    refused(lambda: probe_audio(wav, LIMITS), "cut short", "2.0 s", "1.0 s")


def test_truncated_mp3_is_refused_by_declared_duration(tmp_path: Path) -> None:
    mp3 = truncate(write_audio(tmp_path / "voice.mp3", 2.0), 0.5)
    refused(lambda: probe_audio(mp3, LIMITS), "cut short", "declares 2.0 s")


@pytest.mark.parametrize("ext", [".flac", ".ogg"])
def test_truncated_compressed_audio_is_refused(tmp_path: Path, ext: str) -> None:
    path = truncate(write_audio(tmp_path / f"voice{ext}", 2.0), 0.5)
    refused(lambda: probe_audio(path, LIMITS), "cut short")


def test_float_wav_with_nan_samples_is_refused_with_where_they_start(tmp_path: Path) -> None:
    samples = speech(2.0)
    samples[24000:24100] = np.nan
    wav = write_float_wav(tmp_path / "voice.wav", samples)
    refused(lambda: probe_audio(wav, LIMITS), "voice.wav", "NaN or infinite", "from 1.")


def test_float_wav_with_infinite_samples_is_refused(tmp_path: Path) -> None:
    samples = np.stack([speech(1.0), speech(1.0, seed=1)])
    samples[1, 100] = np.inf
    wav = write_float_wav(tmp_path / "voice.wav", samples)
    refused(lambda: probe_audio(wav, LIMITS), "NaN or infinite", "from 0.0 s")


def test_finite_float_wav_passes(tmp_path: Path) -> None:
    wav = write_float_wav(tmp_path / "voice.wav", speech(1.0))
    assert probe_audio(wav, LIMITS).duration == pytest.approx(1.0, abs=0.01)


def test_text_file_named_mp3_is_not_decodable(tmp_path: Path) -> None:
    fake = tmp_path / "voice.mp3"
    fake.write_text("this is not audio\n" * 20)
    refused(lambda: probe_audio(fake, LIMITS), "not decodable audio")


def test_video_without_audio_track_is_refused(tmp_path: Path) -> None:
    path = write_portrait_video(tmp_path / "voice.mp4", 0.2).rename(tmp_path / "voice.m4a")
    refused(lambda: probe_audio(path, LIMITS), "no audio track")


def test_audio_over_the_duration_limit_names_limit_and_length(tmp_path: Path) -> None:
    wav = write_speech_wav(tmp_path / "voice.wav", 1.5)
    refused(lambda: probe_audio(wav, Limits(max_audio_seconds=1.0)), "1.5 s", "at most 1 s")


def test_audio_under_the_minimum_is_refused(tmp_path: Path) -> None:
    wav = write_speech_wav(tmp_path / "voice.wav", 0.2)
    refused(lambda: probe_audio(wav, Limits(min_audio_seconds=0.5)), "0.20 s", "at least 0.5 s")


def test_file_over_the_size_limit_is_refused(tmp_path: Path) -> None:
    wav = write_speech_wav(tmp_path / "voice.wav", 1.0)
    refused(lambda: probe_audio(wav, Limits(max_file_mb=0.01)), "MB", "0.01 MB limit")


def test_fifo_is_refused_without_opening_it(tmp_path: Path) -> None:
    fifo = tmp_path / "voice.wav"
    os.mkfifo(fifo)
    refused(lambda: probe_audio(fifo, LIMITS), "not a regular file")
    refused(lambda: probe_portrait(fifo.rename(tmp_path / "face.jpg"), LIMITS, True), "not a regular file")


def test_symlink_is_refused(tmp_path: Path, portrait_jpg: Path) -> None:
    link = tmp_path / "face.jpg"
    link.symlink_to(portrait_jpg)
    refused(lambda: probe_portrait(link, LIMITS, True), "not a regular file")


def test_good_photo_passes_with_its_size(portrait_jpg: Path) -> None:
    assert probe_portrait(portrait_jpg, LIMITS, need_face=True) == PortraitProbe("image", 320, 320, None, None)


def test_zero_byte_photo_is_refused(tmp_path: Path) -> None:
    empty = tmp_path / "face.jpg"
    empty.touch()
    refused(lambda: probe_portrait(empty, LIMITS, True), "empty")


def test_text_file_named_png_is_not_a_valid_image(tmp_path: Path) -> None:
    fake = tmp_path / "face.png"
    fake.write_text("definitely not a PNG\n")
    refused(lambda: probe_portrait(fake, LIMITS, True), "face.png", "not a valid image")


def test_truncated_jpeg_is_refused(tmp_path: Path, portrait_jpg: Path) -> None:
    cut = truncate(Path(shutil.copy(portrait_jpg, tmp_path / "face.jpg")), 0.5)
    refused(lambda: probe_portrait(cut, LIMITS, True), "damaged")


def test_image_without_a_face_is_refused(no_face_jpg: Path) -> None:
    refused(lambda: probe_portrait(no_face_jpg, LIMITS, need_face=True), "no face found", "no_face.jpg")


def test_a_face_box_stands_in_for_the_detector(no_face_jpg: Path) -> None:
    found = probe_portrait(no_face_jpg, LIMITS, need_face=True, face_box=(20, 200, 10, 300))
    assert (found.width, found.height) == (320, 213)


def test_a_face_box_reaching_outside_the_portrait_is_refused_with_its_size(no_face_jpg: Path) -> None:
    refused(lambda: probe_portrait(no_face_jpg, LIMITS, need_face=True, face_box=(20, 214, 10, 300)),
            "face_box [20, 214, 10, 300]", "no_face.jpg", "320x213")


def test_a_face_box_is_checked_against_a_portrait_video_as_shown(tmp_path: Path) -> None:
    video = write_portrait_video(tmp_path / "face.mp4", 0.3)
    side = probe_portrait(video, LIMITS, need_face=False).width
    outside = (0, side, 0, side + 2)
    refused(lambda: probe_portrait(video, LIMITS, need_face=False, face_box=outside), "reaches outside")


class CascadeSpy:
    """The real Haar cascade, counting the detection passes made with it."""

    def __init__(self, real: cv2.CascadeClassifier) -> None:
        self.real = real
        self.passes = 0

    def detectMultiScale3(self, *args: object, **kwargs: object) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        self.passes += 1
        return self.real.detectMultiScale3(*args, **kwargs)


def test_one_cascade_pass_answers_both_face_questions_for_an_image(
    portrait_jpg: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spy = CascadeSpy(faces._cascade())
    monkeypatch.setattr(faces, "_cascade", lambda: spy)
    assert probe_portrait(portrait_jpg, LIMITS, FaceRule.ONE).kind == "image"
    assert spy.passes == 1


def test_face_check_is_skipped_when_not_needed(no_face_jpg: Path) -> None:
    assert probe_portrait(no_face_jpg, LIMITS, need_face=False).kind == "image"


def test_image_over_the_pixel_limit_is_refused_from_its_header(tmp_path: Path) -> None:
    big = write_png_header(tmp_path / "face.png", 8000, 6000)
    refused(lambda: probe_portrait(big, LIMITS, True), "8000x6000", "48 megapixels", "40 megapixel limit")


def test_decompression_bomb_is_refused(tmp_path: Path) -> None:
    bomb = write_png_header(tmp_path / "face.png", 20000, 20000)
    refused(lambda: probe_portrait(bomb, LIMITS, True), "too many pixels")


def test_good_portrait_video_passes(tmp_path: Path) -> None:
    video = write_portrait_video(tmp_path / "face.mp4", 1.0)
    assert probe_portrait(video, LIMITS, need_face=True) == PortraitProbe("video", 288, 288, 1.0, 25.0)


def test_sideways_phone_video_is_turned_upright_for_the_face_check(tmp_path: Path) -> None:
    video = write_portrait_video(tmp_path / "face.mov", 0.5, rotation=-90)
    assert probe_portrait(video, LIMITS, need_face=True).kind == "video"


def test_webm_portrait_video_passes(tmp_path: Path) -> None:
    video = write_portrait_video(tmp_path / "face.webm", 0.5)
    assert probe_portrait(video, LIMITS, need_face=True).duration == pytest.approx(0.5, abs=0.05)


def test_video_over_the_pixel_limit_is_refused(tmp_path: Path) -> None:
    video = write_portrait_video(tmp_path / "face.mp4", 0.2)
    refused(lambda: probe_portrait(video, Limits(max_video_pixels=10_000), True), "288x288", "megapixel limit")


def test_video_over_the_duration_limit_is_refused(tmp_path: Path) -> None:
    video = write_portrait_video(tmp_path / "face.mp4", 1.0)
    refused(lambda: probe_portrait(video, Limits(max_portrait_seconds=0.5), True), "1.0 s", "at most 0.5 s")


def test_audio_named_mp4_has_no_video_track(tmp_path: Path) -> None:
    fake = write_audio(tmp_path / "face.m4a", 0.5).rename(tmp_path / "face.mp4")
    refused(lambda: probe_portrait(fake, LIMITS, True), "no video track")


def test_truncated_video_is_refused(tmp_path: Path) -> None:
    cut = truncate(write_portrait_video(tmp_path / "face.mp4", 1.0), 0.5)
    refused(lambda: probe_portrait(cut, LIMITS, True), "not a decodable video")


def test_video_without_a_face_is_refused(tmp_path: Path, no_face_jpg: Path) -> None:
    video = write_portrait_video(tmp_path / "face.mp4", 0.5, source=no_face_jpg)
    refused(lambda: probe_portrait(video, LIMITS, need_face=True), "no face found")


def test_unknown_portrait_type_is_refused(tmp_path: Path) -> None:
    other = tmp_path / "face.gif"
    other.write_bytes(b"GIF89a")
    refused(lambda: probe_portrait(other, LIMITS, True), "not a portrait image or video")
