"""Write H.264 or HEVC + AAC MP4s with PyAV, audio interleaved as frames arrive and cut to the video's length."""

from __future__ import annotations

import functools
from fractions import Fraction
from pathlib import Path
from types import TracebackType
from typing import Literal, cast

import av
import cv2
import numpy as np
from av.video.reformatter import ColorRange

from heygem_daemon.media.audio import AudioClip

# Video's usual audio rate. The encoder resamples any source to it, which also keeps the padding of
# the last AAC frame (1024 samples) near 21 ms; at 16 kHz it would be 64 ms, over a frame of video.
_AAC_RATE = 48000
_AVCOL_SPC_SMPTE170M = 6  # FFmpeg's AVColorSpace for BT.601, which PyAV has no enum for
SOFTWARE = {"h264": "libx264", "hevc": "libx265"}
NVENC = {"h264": "h264_nvenc", "hevc": "hevc_nvenc"}
HEVC_ENCODERS = {"libx265", "hevc_nvenc"}
HVC1 = "hvc1"
# x265 prints a banner and per-file statistics on stderr; only its errors belong in the daemon's log.
_X265_QUIET = "log-level=error"
EncoderMode = Literal["auto", "software", "nvenc"]


class Mp4Writer:
    """`with Mp4Writer(...) as w: w.write(bgr)`; a failure inside the block deletes the partial file."""

    def __init__(
        self,
        path: Path,
        width: int,
        height: int,
        fps: int,
        video_bitrate: int,
        audio: AudioClip | None,
        audio_bitrate: int,
        x264_preset: str = "veryfast",
        codec: str = "libx264",
    ) -> None:
        self.path = Path(path)
        self.frames_written = 0
        self._fps = fps
        self._audio_sent = 0
        self._closed = False
        # Explicit format: the name may end in `.part`; faststart lets players start before the download ends.
        self._container = av.open(
            str(self.path), mode="w", format="mp4", container_options={"movflags": "+faststart"}
        )
        try:
            # A codec named by a variable types as any stream kind; this one is a video encoder.
            self._video = cast("av.video.stream.VideoStream",
                               self._container.add_stream(codec, rate=fps, options=_options(codec, x264_preset)))
            if codec in HEVC_ENCODERS:
                # MP4 muxers default to `hev1`, which Apple's players refuse; `hvc1` plays everywhere.
                self._video.codec_tag = HVC1
            self._video.width, self._video.height = width, height
            self._video.pix_fmt = "yuv420p"
            self._video.bit_rate = video_bitrate
            # Say which matrix the pixels use, or players guess BT.709 for HD and shift the colours.
            self._video.codec_context.colorspace = _AVCOL_SPC_SMPTE170M
            self._video.codec_context.color_range = ColorRange.MPEG
            self._sound = (audio, self._add_audio(audio, audio_bitrate)) if audio is not None else None
        except BaseException:
            self._discard()
            raise

    def _add_audio(self, audio: AudioClip, bitrate: int) -> av.AudioStream:
        stream = self._container.add_stream("aac", rate=_AAC_RATE)
        stream.layout = "mono" if audio.channels == 1 else "stereo"
        stream.format = "fltp"
        stream.bit_rate = bitrate
        return stream

    def __enter__(self) -> Mp4Writer:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self._discard()

    def write(self, bgr: np.ndarray) -> None:
        """Encode one BGR frame, then the audio that plays until that frame ends."""
        # OpenCV's BT.601 limited-range conversion matches swscale's default at a sixth of its cost.
        frame = av.VideoFrame.from_ndarray(cv2.cvtColor(bgr, cv2.COLOR_BGR2YUV_I420), format="yuv420p")
        frame.pts = self.frames_written
        self._container.mux(self._video.encode(frame))
        self.frames_written += 1
        if self._sound is not None:
            self._send_audio(*self._sound)

    def _send_audio(self, clip: AudioClip, stream: av.AudioStream) -> None:
        """Feed samples up to the end time of the frames written; past the clip's end, silence pads."""
        end = round(self.frames_written * clip.rate / self._fps)
        if end <= self._audio_sent:
            return
        chunk = clip.samples[:, self._audio_sent : end]
        if chunk.shape[1] < end - self._audio_sent:
            chunk = np.pad(chunk, ((0, 0), (0, end - self._audio_sent - chunk.shape[1])))
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(chunk), format="fltp", layout=stream.layout)
        frame.sample_rate = clip.rate
        frame.time_base = Fraction(1, clip.rate)
        frame.pts = self._audio_sent
        self._container.mux(stream.encode(frame))
        self._audio_sent = end

    def close(self) -> None:
        """Flush both encoders and finish the file; on failure the partial file is removed."""
        if self._closed:
            return
        try:
            self._container.mux(self._video.encode(None))
            if self._sound is not None:
                self._container.mux(self._sound[1].encode(None))
            self._container.close()
            self._closed = True
        except BaseException:
            self._discard()
            raise

    def _discard(self) -> None:
        self._closed = True
        try:
            self._container.close()
        except av.FFmpegError:
            pass  # the file is being deleted; a failed trailer write does not matter
        finally:
            self.path.unlink(missing_ok=True)


def _options(codec: str, x264_preset: str) -> dict[str, str]:
    # x264 and x265 share preset names; hardware encoders (NVENC) know neither.
    if codec == "libx264":
        return {"preset": x264_preset}
    if codec == "libx265":
        return {"preset": x264_preset, "x265-params": _X265_QUIET}
    return {}


def software_encoder(codec: str) -> str:
    """libx264, or libx265 for HEVC; H.264 when this FFmpeg build lacks libx265 (`doctor` says so)."""
    name = SOFTWARE[codec]
    return name if encoder_usable(name) else SOFTWARE["h264"]


def pick_encoder(codec: str, mode: EncoderMode, device: str) -> str:
    """The encoder for a preset's codec: NVENC when asked for, or (auto) on a CUDA device where it opens."""
    nvenc = NVENC[codec]
    if mode == "nvenc" or (mode == "auto" and device.startswith("cuda") and encoder_usable(nvenc)):
        return nvenc
    return software_encoder(codec)


@functools.lru_cache(maxsize=None)
def encoder_usable(codec: str) -> bool:
    """Whether this FFmpeg build has `codec` and it opens here (NVENC also needs an NVIDIA GPU and driver)."""
    if codec not in av.codecs_available:
        return False
    ctx = cast("av.video.codeccontext.VideoCodecContext", av.CodecContext.create(codec, "w"))
    ctx.width, ctx.height, ctx.pix_fmt = 256, 256, "yuv420p"
    ctx.time_base = Fraction(1, 25)
    ctx.options = _options(codec, "ultrafast")  # x265 would print its banner into the daemon's console
    try:
        ctx.open()
    except (av.FFmpegError, OSError):
        return False
    return True
