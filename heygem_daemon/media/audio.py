"""Decode audio files with PyAV: 16 kHz mono for analysis (as librosa reads it), or the source rate for muxing."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
import soxr

from heygem_daemon.media.errors import MediaError

_HINT = "re-export the audio as WAV or MP3 and drop it in again"
# librosa.load's default res_type ("soxr_hq"): the resampler the Wav2Lip reference reads its audio through.
_SOXR_QUALITY = "HQ"


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
) -> Iterator[tuple[np.ndarray, int]]:
    """(samples (channels, n), rate) per frame of the first audio stream, converted by the resampler it asks for."""
    try:
        with av.open(str(path)) as container:
            if not container.streams.audio:
                raise MediaError(f"{path.name} has no audio track", _HINT)
            stream = container.streams.audio[0]
            resampler = resampler_for(stream)
            for frame in _resampled(container.decode(stream), resampler):
                yield frame.to_ndarray(), frame.sample_rate
    except av.FFmpegError as exc:
        raise MediaError(f"{path.name} is not decodable audio ({exc.strerror or exc})", _HINT) from None


def _resampled(frames: Iterator[av.AudioFrame], resampler: av.AudioResampler) -> Iterator[av.AudioFrame]:
    for frame in frames:
        yield from resampler.resample(frame)
    # The resampler holds back a few samples for its filter; None drains them.
    yield from resampler.resample(None)


def _no_samples(path: Path) -> MediaError:
    return MediaError(f"{path.name} contains no audio samples", _HINT)


def load_mono(path: Path, sample_rate: int = 16000) -> np.ndarray:
    """float32 mono samples at `sample_rate` (what the engines analyse), as `librosa.load(path, sr=...)` reads them.

    Like librosa: decoded at the source's rate, channels averaged (FFmpeg's own down-mix sums them at -3 dB
    each: 3 dB louder, clipped on loud stereo), then resampled by soxr at high quality (FFmpeg's resampler
    shifts the mel bands near 8 kHz by up to 0.15) and cut or zero-padded to ceil(n * ratio) samples. The
    mel the model sees is then the reference's, whatever the input rate. Decoding and resampling go frame by
    frame: memory holds the 16 kHz result, never the source."""
    path = Path(path)

    def same_format(stream: av.AudioStream) -> av.AudioResampler:
        # Planar float in the source's own layout and rate: the down-mix and the rate change happen below.
        ctx = stream.codec_context
        return av.AudioResampler(format="fltp", layout=ctx.layout, rate=ctx.sample_rate or None)

    out: list[np.ndarray] = []
    resampler: soxr.ResampleStream | None = None
    taken, rate = 0, sample_rate
    for samples, rate in _decoded(path, same_format):
        mono = samples.mean(axis=0, dtype=np.float32)
        taken += mono.size
        if rate != sample_rate:
            resampler = resampler or soxr.ResampleStream(rate, sample_rate, 1, dtype="float32", quality=_SOXR_QUALITY)
            mono = resampler.resample_chunk(mono)
        out.append(mono)
    if not taken:
        raise _no_samples(path)
    if resampler is not None:
        out.append(resampler.resample_chunk(np.zeros(0, np.float32), last=True))
    mono = np.concatenate(out)
    length = math.ceil(taken * sample_rate / rate)  # librosa.resample's fix_length
    return mono[:length] if mono.size >= length else np.pad(mono, (0, length - mono.size))


def load_clip(path: Path, max_channels: int = 2) -> AudioClip:
    """The source's own rate, down-mixed to mono or stereo (at most `max_channels`), ready to be muxed."""
    path = Path(path)

    def resampler(stream: av.AudioStream) -> av.AudioResampler:
        # Surround sources fold to stereo: AAC in MP4 players handles mono and stereo everywhere.
        mono = min(stream.codec_context.channels or 1, max_channels) == 1
        layout = "mono" if mono else "stereo"
        return av.AudioResampler(format="fltp", layout=layout, rate=stream.codec_context.sample_rate)

    chunks = list(_decoded(path, resampler))
    if not chunks:
        raise _no_samples(path)
    samples = np.concatenate([c for c, _ in chunks], axis=1)
    return AudioClip(np.clip(samples, -1.0, 1.0), chunks[0][1])
