"""Make real media files for tests (speech-like audio, portrait videos, damaged copies) and inspect outputs."""

from __future__ import annotations

import struct
import wave
import zlib
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np

FIXTURES = Path(__file__).parent / "fixtures"
PORTRAIT_JPG = FIXTURES / "portrait.jpg"

# extension -> (container format, codec, sample rate the codec is happy with)
_AUDIO_FORMATS = {
    ".wav": ("wav", "pcm_s16le", 16000),
    ".mp3": ("mp3", "libmp3lame", 44100),
    ".m4a": ("ipod", "aac", 44100),
    ".aac": ("adts", "aac", 44100),
    ".flac": ("flac", "flac", 44100),
    ".ogg": ("ogg", "libopus", 48000),
    ".opus": ("opus", "libopus", 48000),
}
# extension -> (container format, codec, options that keep test encodes fast)
_VIDEO_FORMATS = {
    ".mp4": ("mp4", "libx264", {"preset": "ultrafast"}),
    ".mov": ("mov", "libx264", {"preset": "ultrafast"}),
    ".webm": ("webm", "libvpx", {"deadline": "realtime", "cpu-used": "8"}),
}


def speech(seconds: float, rate: int = 16000, seed: int = 0) -> np.ndarray:
    """Speech-like float32 mono: voiced harmonic syllables (~4/s) on a pitch contour, phrase pauses, noise."""
    rng = np.random.default_rng(seed)
    n = int(round(seconds * rate))
    t = np.arange(n) / rate
    f0 = 140 + 30 * np.sin(2 * np.pi * 0.6 * t) + 12 * np.sin(2 * np.pi * 3.3 * t)
    phase = 2 * np.pi * np.cumsum(f0) / rate
    envelope = np.zeros(n)
    tilt = np.ones(n)
    start, in_phrase = 0.05, 0
    while start < seconds:
        length = rng.uniform(0.12, 0.2)
        a, b = int(start * rate), min(n, int((start + length) * rate))
        envelope[a:b] = rng.uniform(0.5, 1.0) * np.hanning(b - a) if b > a else 0
        tilt[a:b] = rng.uniform(0.5, 1.5)  # a different vowel colour per syllable
        in_phrase += 1
        gap = rng.uniform(0.3, 0.45) if in_phrase % 6 == 0 else rng.uniform(0.04, 0.1)
        start += length + gap
    voiced = sum(np.sin(k * phase) / k**tilt for k in range(1, 16))
    signal = voiced * envelope + 0.003 * rng.standard_normal(n)
    return (0.6 * signal / np.max(np.abs(signal))).astype(np.float32)


def write_wav(path: Path, samples: np.ndarray, rate: int = 16000) -> Path:
    """16-bit WAV from float samples in [-1, 1], shape (n,) for mono or (channels, n)."""
    planar = np.atleast_2d(samples)
    pcm = (np.clip(planar.T, -1, 1) * 32767).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(planar.shape[0])
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm.tobytes())
    return Path(path)


def write_float_wav(path: Path, samples: np.ndarray, rate: int = 16000) -> Path:
    """32-bit float WAV (what DAWs export), written by FFmpeg as is: NaN and out-of-range values survive."""
    return _encode_audio(path, "wav", "pcm_f32le", rate, samples)


def _encode_audio(path: Path, fmt: str, codec: str, rate: int, samples: np.ndarray) -> Path:
    """Float samples, shape (n,) or (channels, n), encoded by PyAV into one audio stream."""
    planar = np.ascontiguousarray(np.atleast_2d(samples), dtype=np.float32)
    layout = "mono" if planar.shape[0] == 1 else "stereo"
    with av.open(str(path), "w", format=fmt) as out:
        stream = out.add_stream(codec, rate=rate)
        stream.layout = layout
        packed = np.ascontiguousarray(planar.T.reshape(1, -1))  # interleaved, as "flt" wants
        frame = av.AudioFrame.from_ndarray(packed, format="flt", layout=layout)
        frame.sample_rate = rate
        frame.time_base = Fraction(1, rate)
        frame.pts = 0
        out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    return Path(path)


def write_speech_wav(path: Path, seconds: float, rate: int = 16000) -> Path:
    return write_wav(path, speech(seconds, rate), rate)


def write_audio(path: Path, seconds: float) -> Path:
    """The same speech signal encoded with PyAV in the format the extension names."""
    fmt, codec, rate = _AUDIO_FORMATS[Path(path).suffix.lower()]
    return _encode_audio(path, fmt, codec, rate, speech(seconds, rate))


def write_portrait_video(
    path: Path, seconds: float, fps: int = 25, source: Path = PORTRAIT_JPG, rotation: int = 0
) -> Path:
    """A slow pan across the portrait photo: frames differ, the face stays whole and detectable.

    `rotation` stores the frames turned by -rotation degrees plus a display matrix that turns them
    back, the way phones record portrait video."""
    fmt, codec, options = _VIDEO_FORMATS[Path(path).suffix.lower()]
    still = cv2.imread(str(source))
    side = (min(still.shape[:2]) - 32) // 2 * 2  # yuv420p needs even sides
    top = (still.shape[0] - side) // 2
    count = max(1, round(seconds * fps))
    with av.open(str(path), "w", format=fmt) as out:
        stream = out.add_stream(codec, rate=fps, options=options)
        stream.width = stream.height = side
        stream.pix_fmt = "yuv420p"
        if rotation:
            stream.set_display_rotation(rotation)
        for i in range(count):
            x = round(32 * i / max(1, count - 1))
            crop = np.ascontiguousarray(np.rot90(still[top : top + side, x : x + side], -rotation // 90))
            frame = av.VideoFrame.from_ndarray(crop, format="bgr24")
            frame.pts = i
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    return Path(path)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def write_png_header(path: Path, width: int, height: int) -> Path:
    """A PNG that claims width x height (1-bit grey) but holds almost no pixel data: a bomb in 100 bytes."""
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    body = _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(b"\0")) + _png_chunk(b"IEND", b"")
    Path(path).write_bytes(b"\x89PNG\r\n\x1a\n" + body)
    return Path(path)


def truncate(path: Path, keep_fraction: float) -> Path:
    """Cut a file to its first `keep_fraction` of bytes, like an interrupted copy."""
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[: int(len(data) * keep_fraction)])
    return Path(path)


@dataclass(frozen=True)
class VideoFacts:
    has_video: bool
    has_audio: bool
    width: int
    height: int
    frames: int
    fps: float
    video_duration: float
    audio_duration: float


def video_facts(path: Path) -> VideoFacts:
    """Decode a whole output file: proves it plays, and measures what a player would see."""
    width = height = frames = 0
    fps = audio_seconds = 0.0
    with av.open(str(path)) as c:
        has_video, has_audio = bool(c.streams.video), bool(c.streams.audio)
        if has_video:
            fps = float(c.streams.video[0].average_rate or 0)
            for frame in c.decode(video=0):
                width, height, frames = frame.width, frame.height, frames + 1
    if has_audio:
        with av.open(str(path)) as c:
            audio_seconds = sum(f.samples / f.sample_rate for f in c.decode(audio=0))
    duration = frames / fps if fps else 0.0
    return VideoFacts(has_video, has_audio, width, height, frames, fps, duration, audio_seconds)


def decoded_frames(path: Path) -> list[np.ndarray]:
    """Every video frame of a file as BGR arrays."""
    with av.open(str(path)) as c:
        return [f.to_ndarray(format="bgr24") for f in c.decode(video=0)]


def write_noise_video(path: Path, megabytes: float, side: int = 256, fps: int = 25, seed: int = 0) -> Path:
    """A real, playable MP4 of at least `megabytes`: lossless H.264 of random noise (which does not compress)."""
    rng = np.random.default_rng(seed)
    per_frame = side * side * 1.5
    count = int(megabytes * 1024 * 1024 / per_frame) + 2
    with av.open(str(path), "w", format="mp4") as out:
        stream = out.add_stream("libx264", rate=fps, options={"preset": "ultrafast", "qp": "0"})
        stream.width = stream.height = side
        stream.pix_fmt = "yuv420p"
        for i in range(count):
            frame = av.VideoFrame.from_ndarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8), format="rgb24")
            frame.pts = i
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    return Path(path)
