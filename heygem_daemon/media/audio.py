"""Decode audio files with PyAV: 16 kHz mono for analysis, or the source rate for muxing."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np

from heygem_daemon.media.errors import MediaError

_HINT = "re-export the audio as WAV or MP3 and drop it in again"


@dataclass(frozen=True)
class AudioClip:
    samples: np.ndarray
    """float32, shape (channels, n), in [-1, 1]."""
    rate: int

    @property
    def channels(self) -> int:
        return int(self.samples.shape[0])

    @property
    def duration(self) -> float:
        return self.samples.shape[1] / self.rate


def _decoded(
    path: Path, resampler_for: Callable[[av.AudioStream], av.AudioResampler]
) -> tuple[np.ndarray, int]:
    """All samples of the first audio stream, converted by the resampler the stream asks for."""
    try:
        with av.open(str(path)) as container:
            if not container.streams.audio:
                raise MediaError(f"{path.name} has no audio track", _HINT)
            stream = container.streams.audio[0]
            resampler = resampler_for(stream)
            chunks = [f.to_ndarray() for f in _resampled(container.decode(stream), resampler)]
    except av.FFmpegError as exc:
        raise MediaError(f"{path.name} is not decodable audio ({exc.strerror or exc})", _HINT) from None
    if not chunks:
        raise MediaError(f"{path.name} contains no audio samples", _HINT)
    return np.concatenate(chunks, axis=1), resampler.rate


def _resampled(frames: Iterator[av.AudioFrame], resampler: av.AudioResampler) -> Iterator[av.AudioFrame]:
    for frame in frames:
        yield from resampler.resample(frame)
    # The resampler holds back a few samples for its filter; None drains them.
    yield from resampler.resample(None)


def load_mono(path: Path, sample_rate: int = 16000) -> np.ndarray:
    """float32 mono samples in [-1, 1] at `sample_rate` (what the engines analyse).

    Channels are averaged, as `librosa.load` does for the Wav2Lip reference. FFmpeg's own mono
    down-mix sums them at -3 dB each (0.7071 * (L + R)): 3 dB louder, clipped on loud stereo, and
    every mel value shifted away from what the model was trained on."""

    def resampler(stream: av.AudioStream) -> av.AudioResampler:
        # Planar and the source's own layout: only the rate changes here.
        return av.AudioResampler(format="fltp", layout=stream.codec_context.layout, rate=sample_rate)

    samples, _ = _decoded(Path(path), resampler)
    return np.clip(samples.mean(axis=0, dtype=np.float32), -1.0, 1.0)


def load_clip(path: Path, max_channels: int = 2) -> AudioClip:
    """The source's own rate, down-mixed to mono or stereo (at most `max_channels`), ready to be muxed."""

    def resampler(stream: av.AudioStream) -> av.AudioResampler:
        # Surround sources fold to stereo: AAC in MP4 players handles mono and stereo everywhere.
        mono = min(stream.codec_context.channels or 1, max_channels) == 1
        layout = "mono" if mono else "stereo"
        return av.AudioResampler(format="fltp", layout=layout, rate=stream.codec_context.sample_rate)

    samples, rate = _decoded(Path(path), resampler)
    return AudioClip(np.clip(samples, -1.0, 1.0), rate)
