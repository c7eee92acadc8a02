"""Check an MP4 made by an outside tool before it is delivered, and give it back its sound if it lost it."""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from heygem_daemon.media.audio import AudioClip
from heygem_daemon.media.errors import MediaError
from heygem_daemon.media.writer import HVC1

# FFmpeg names the ISO-BMFF demuxer after every brand it reads; a real MP4 reports this family.
_MP4_FORMAT = "mp4"
_AAC_RATE = 48000
_AUDIO_CHUNK = 4096


@dataclass(frozen=True)
class Mp4Facts:
    has_video: bool
    has_audio: bool


def _decodes_a_frame(container: av.container.InputContainer, stream: av.stream.Stream) -> bool:
    return any(packet.size and packet.decode() for packet in container.demux(stream))


def inspect_mp4(path: Path) -> Mp4Facts:
    """Which tracks of an MP4 decode (first frame of each); MediaError if it is missing or not an MP4."""
    path = Path(path)
    if not path.is_file() or path.stat().st_size == 0:
        raise MediaError(f"{path.name} was not written (missing or empty)", "the tool did not produce a video")
    try:
        with av.open(str(path)) as container:
            if _MP4_FORMAT not in container.format.name.split(","):
                raise MediaError(f"{path.name} is {container.format.name}, not an MP4", "make the tool write MP4")
            video = bool(container.streams.video) and _decodes_a_frame(container, container.streams.video[0])
        with av.open(str(path)) as container:
            audio = bool(container.streams.audio) and _decodes_a_frame(container, container.streams.audio[0])
    except av.FFmpegError as exc:
        raise MediaError(f"{path.name} is not a decodable MP4 ({exc.strerror or exc})",
                         "the tool wrote a damaged file") from None
    return Mp4Facts(video, audio)


def require_playable(path: Path) -> None:
    """MediaError unless `path` is an MP4 whose video and audio both decode."""
    facts = inspect_mp4(path)
    missing = [kind for kind, present in (("video", facts.has_video), ("audio", facts.has_audio)) if not present]
    if missing:
        raise MediaError(f"{Path(path).name} has no decodable {' or '.join(missing)} track",
                         "the tool must write an MP4 with both picture and sound")


def add_audio(video: Path, clip: AudioClip, out: Path, bitrate: int) -> None:
    """Write `out`: the video track of `video` copied as is, plus `clip` encoded as AAC."""
    try:
        with av.open(str(video)) as src, av.open(str(out), "w", format="mp4") as dst:
            v_in = src.streams.video[0]
            v_out = dst.add_stream_from_template(v_in)
            if v_in.codec_context.name == "hevc":
                v_out.codec_tag = HVC1  # the muxer's default `hev1` does not play on Apple devices
            a_out = dst.add_stream("aac", rate=_AAC_RATE)
            a_out.layout = "mono" if clip.channels == 1 else "stereo"
            a_out.bit_rate = bitrate
            for packet in src.demux(v_in):
                if packet.dts is None:
                    continue
                packet.stream = v_out
                dst.mux(packet)
            for start in range(0, clip.samples.shape[1], _AUDIO_CHUNK):
                chunk = np.ascontiguousarray(clip.samples[:, start : start + _AUDIO_CHUNK])
                frame = av.AudioFrame.from_ndarray(chunk, format="fltp", layout=a_out.layout)
                frame.sample_rate = clip.rate
                frame.time_base = Fraction(1, clip.rate)
                frame.pts = start
                dst.mux(a_out.encode(frame))
            dst.mux(a_out.encode(None))
    except av.FFmpegError as exc:
        Path(out).unlink(missing_ok=True)
        raise MediaError(f"cannot add the sound to {Path(video).name} ({exc.strerror or exc})",
                         "the service's result is damaged") from None
