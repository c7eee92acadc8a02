from __future__ import annotations

from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from heygem_daemon.media.audio import AudioClip, load_clip, load_mono
from heygem_daemon.media.errors import MediaError
from heygem_daemon.media.frames import open_portrait, output_size, ping_pong_index, read_image
from heygem_daemon.media.verify import add_audio
from heygem_daemon.media.writer import Mp4Writer
from media_factory import speech, video_facts, write_audio, write_portrait_video, write_wav


def test_load_mono_resamples_to_16k_mono(tmp_path: Path) -> None:
    samples = load_mono(write_audio(tmp_path / "a.flac", 1.0))
    assert samples.dtype == np.float32 and samples.ndim == 1
    assert abs(len(samples) - 16000) <= 32
    assert 0.3 < np.abs(samples).max() <= 1.0


def test_loud_stereo_with_equal_channels_is_read_at_its_own_level_without_clipping(tmp_path: Path) -> None:
    voice = speech(1.0, 44100)
    voice = 0.9 * voice / np.abs(voice).max()
    mono = load_mono(write_wav(tmp_path / "s.wav", np.stack([voice, voice]), 44100))
    assert np.abs(mono).max() == pytest.approx(0.9, abs=0.01)
    assert not (np.abs(mono) >= 1.0).any()


def test_stereo_is_averaged_so_one_silent_channel_halves_the_level(tmp_path: Path) -> None:
    voice = speech(1.0)
    mono = load_mono(write_wav(tmp_path / "s.wav", np.stack([voice, np.zeros_like(voice)])))
    assert np.abs(mono).max() == pytest.approx(0.5 * np.abs(voice).max(), abs=0.005)


def test_load_clip_keeps_source_rate_and_stereo(tmp_path: Path) -> None:
    wav = write_wav(tmp_path / "s.wav", np.stack([speech(0.5, 22050), np.zeros(11025, np.float32)]), 22050)
    clip = load_clip(wav)
    assert clip.rate == 22050 and clip.samples.shape == (2, 11025)
    assert clip.samples.dtype == np.float32
    assert np.abs(clip.samples[1]).max() == 0.0


def test_load_clip_downmixes_to_max_channels(tmp_path: Path) -> None:
    wav = write_wav(tmp_path / "s.wav", np.stack([speech(0.5), speech(0.5)]))
    assert load_clip(wav, max_channels=1).channels == 1


def test_text_file_named_mp3_raises_media_error(tmp_path: Path) -> None:
    fake = tmp_path / "voice.mp3"
    fake.write_text("not audio")
    with pytest.raises(MediaError, match="voice.mp3 is not decodable audio") as err:
        load_mono(fake)
    assert err.value.hint


@pytest.mark.parametrize(
    ("src", "height", "expected"),
    [((1920, 1080), 480, (854, 480)), ((320, 320), 480, (480, 480)), ((1080, 1920), 480, (270, 480)),
     ((333, 500), 240, (160, 240))],
)
def test_output_size_keeps_aspect_with_even_sides(
    src: tuple[int, int], height: int, expected: tuple[int, int]
) -> None:
    assert output_size(*src, height) == expected


def test_ping_pong_index_walks_back_and_forth() -> None:
    assert [ping_pong_index(i, 4) for i in range(10)] == [0, 1, 2, 3, 2, 1, 0, 1, 2, 3]
    assert [ping_pong_index(i, 2) for i in range(4)] == [0, 1, 0, 1]
    assert ping_pong_index(7, 1) == 0


def test_still_portrait_is_one_read_only_frame_at_output_size(portrait_jpg: Path, tmp_path: Path) -> None:
    frames = open_portrait(portrait_jpg, 240, tmp_path)
    assert (frames.size, frames.count, frames.source_fps) == ((240, 240), 1, None)
    assert frames.frame(0).shape == (240, 240, 3)
    assert not frames.frame(0).flags.writeable
    assert frames.for_output(99) is not None


def test_still_portrait_honours_exif_orientation(portrait_jpg: Path, tmp_path: Path) -> None:
    sideways = tmp_path / "sideways.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display": stored 320x200, shown 200x320
    Image.open(portrait_jpg).crop((0, 60, 320, 260)).save(sideways, exif=exif)
    assert read_image(sideways).shape == (320, 200, 3)
    assert open_portrait(sideways, 240, tmp_path).size == (150, 240)


def test_text_file_named_png_is_not_a_valid_image(tmp_path: Path) -> None:
    fake = tmp_path / "face.png"
    fake.write_text("hello")
    with pytest.raises(MediaError, match="not a valid image"):
        open_portrait(fake, 240, tmp_path)


def test_video_portrait_is_spooled_to_a_memmap_in_scratch(tmp_path: Path) -> None:
    video = write_portrait_video(tmp_path / "p.mp4", 1.0)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    frames = open_portrait(video, 240, scratch)
    assert (frames.size, frames.count, frames.source_fps) == ((240, 240), 25, 25.0)
    assert isinstance(frames.frames, np.memmap)
    assert len(list(scratch.iterdir())) == 1
    assert np.abs(frames.frame(0).astype(int) - frames.frame(24)).mean() > 5  # the pan moved


def test_sideways_phone_video_is_turned_upright(tmp_path: Path) -> None:
    plain = open_portrait(write_portrait_video(tmp_path / "plain.mp4", 0.2), 240, tmp_path)
    turned = open_portrait(write_portrait_video(tmp_path / "turned.mp4", 0.2, rotation=90), 240, tmp_path)
    difference = np.abs(turned.frame(0).astype(int) - plain.frame(0)).mean()
    assert difference < 6  # only coding noise; a wrong turn differs by tens


def test_video_portrait_loops_ping_pong(tmp_path: Path) -> None:
    frames = open_portrait(write_portrait_video(tmp_path / "p.mp4", 0.4, fps=25), 120, tmp_path)
    assert frames.count == 10
    assert np.array_equal(frames.for_output(12), frames.frame(6))


def test_video_portrait_keeps_source_timing_at_another_fps(tmp_path: Path) -> None:
    frames = open_portrait(write_portrait_video(tmp_path / "p.mp4", 0.4, fps=25), 120, tmp_path)
    assert np.array_equal(frames.for_output(4, fps=50), frames.frame(2))


def test_undecodable_video_leaves_no_spool_file(tmp_path: Path) -> None:
    fake = tmp_path / "p.mp4"
    fake.write_text("not a video")
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    with pytest.raises(MediaError, match="not a decodable video"):
        open_portrait(fake, 240, scratch)
    assert list(scratch.iterdir()) == []


def _clip(seconds: float, rate: int = 16000) -> AudioClip:
    return AudioClip(speech(seconds, rate)[np.newaxis], rate)


def _write_frames(path: Path, count: int, audio: AudioClip | None, codec: str = "libx264") -> None:
    with Mp4Writer(path, 64, 48, 25, 200_000, audio, 64_000, codec=codec) as writer:
        for i in range(count):
            writer.write(np.full((48, 64, 3), i * 4, np.uint8))


def test_writer_trims_longer_audio_to_the_video(tmp_path: Path) -> None:
    out = tmp_path / "o.mp4.part"
    _write_frames(out, 25, _clip(2.0))
    facts = video_facts(out)
    assert facts.has_video and facts.has_audio and facts.frames == 25
    assert abs(facts.audio_duration - 1.0) < 1 / 25


def test_writer_pads_shorter_audio_with_silence(tmp_path: Path) -> None:
    out = tmp_path / "o.mp4"
    _write_frames(out, 50, _clip(0.5, 44100))
    assert abs(video_facts(out).audio_duration - 2.0) < 1 / 25


def test_writer_without_audio_writes_video_only(tmp_path: Path) -> None:
    out = tmp_path / "o.mp4"
    _write_frames(out, 5, None)
    facts = video_facts(out)
    assert facts.frames == 5 and not facts.has_audio


def test_writer_puts_the_index_first_for_streaming(tmp_path: Path) -> None:
    out = tmp_path / "o.mp4.part"
    _write_frames(out, 5, _clip(0.2))
    data = out.read_bytes()
    assert 0 <= data.find(b"moov") < data.find(b"mdat")


def test_writer_deletes_partial_file_on_error(tmp_path: Path) -> None:
    out = tmp_path / "o.mp4.part"
    with pytest.raises(RuntimeError, match="boom"):
        with Mp4Writer(out, 64, 48, 25, 200_000, _clip(1.0), 64_000) as writer:
            writer.write(np.zeros((48, 64, 3), np.uint8))
            raise RuntimeError("boom")
    assert not out.exists()



def _video_codec(path: Path) -> tuple[str, str]:
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        return stream.codec_context.name, stream.codec_tag


def test_hevc_from_the_writer_is_tagged_hvc1_for_apple_players(tmp_path: Path) -> None:
    out = tmp_path / "o.mp4.part"
    _write_frames(out, 10, _clip(0.4), codec="libx265")
    assert _video_codec(out) == ("hevc", "hvc1")
    assert video_facts(out).frames == 10


def test_sound_added_to_an_hevc_video_keeps_the_hvc1_tag(tmp_path: Path) -> None:
    silent, out = tmp_path / "silent.mp4", tmp_path / "out.mp4"
    _write_frames(silent, 10, None, codec="libx265")
    add_audio(silent, _clip(0.4), out, 64_000)
    assert _video_codec(out) == ("hevc", "hvc1")
    facts = video_facts(out)
    assert facts.has_audio and facts.frames == 10
