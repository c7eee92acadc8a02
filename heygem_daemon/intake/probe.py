"""Check inputs before a job is claimed, so bad files fail fast with a reason a person can act on.

Pure functions of (path, limits): the daemon runs them in a subprocess pool, where a hung or crashing
decoder cannot take the watcher down.
"""

from __future__ import annotations

import os
import stat
import struct
import warnings
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import BinaryIO, Literal

import av
import numpy as np
from PIL import Image, UnidentifiedImageError

from heygem_daemon.config import Limits
from heygem_daemon.media.errors import MediaError
from heygem_daemon.media.faces import count_faces
from heygem_daemon.media.face_spec import FaceEdges, FaceRule, edges_outside
from heygem_daemon.media.frames import read_image, shown_size, upright
from heygem_daemon.media.kinds import MediaKind, kind_of

_RECOPY = "the copy or upload was probably interrupted; copy the whole file again"
_AUDIO_HINT = "export the audio again as WAV or MP3 and drop it in again"
_IMAGE_HINT = "save the portrait again as JPEG or PNG and drop it in again"
_VIDEO_HINT = "export the portrait video again as MP4 (H.264) and drop it in again"
_FACE_HINT = "use a front-facing photo where the face is clearly visible"
_ONE_FACE_HINT = "this engine animates exactly one person: crop the portrait to a single face and drop it in again"
# Decoders and containers disagree by a few codec frames (priming, padding); more than this is missing data.
_SHORTFALL_SECONDS = 0.25
_SHORTFALL_SHARE = 0.02
_FACE_SAMPLES = 3
# The face cascade looks at no more than 640 pixels a side, so decoding more is wasted.
_FACE_SIDE = 640
_A_PORTRAIT, _PORTRAIT_KEY = "a portrait video", "max_portrait_seconds"
_FLOAT_FORMATS = {"flt", "fltp", "dbl", "dblp"}


class ProbeError(Exception):
    """An input is unusable: `reason` says what is wrong, `hint` what the person should do. `incomplete`:
    what a file still being written looks like too (empty, cut short, undecodable), so intake may wait."""

    def __init__(self, reason: str, hint: str, incomplete: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.hint = hint
        self.incomplete = incomplete


def _cut_short(reason: str) -> ProbeError:
    return ProbeError(reason, _RECOPY, incomplete=True)


@dataclass(frozen=True)
class AudioProbe:
    duration: float
    sample_rate: int
    channels: int
    codec: str


@dataclass(frozen=True)
class PortraitProbe:
    kind: Literal["image", "video"]
    width: int
    height: int
    duration: float | None
    fps: float | None


def _check_file(path: Path, limits: Limits) -> int:
    """Size of a regular, non-empty file within limits; anything else (FIFO, device, link) is refused."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise ProbeError(f"{path.name} disappeared before it could be checked", "drop it in again") from None
    except OSError as exc:
        raise ProbeError(f"{path.name} cannot be read ({exc.strerror})", "check the file's permissions") from None
    if not stat.S_ISREG(st.st_mode):
        raise ProbeError(f"{path.name} is not a regular file", "drop in a plain file, not a link, folder or pipe")
    if st.st_size == 0:
        raise _cut_short(f"{path.name} is empty (0 bytes)")
    if st.st_size > limits.max_file_mb * 1024 * 1024:
        raise ProbeError(
            f"{path.name} is {st.st_size / 2**20:.0f} MB, over the {limits.max_file_mb:g} MB limit",
            "shorten or compress the file, or raise limits.max_file_mb",
        )
    return st.st_size


def _wav_chunks(f: BinaryIO, size: int) -> dict[bytes, tuple[int, int]]:
    """RIFF chunk id -> (offset of its payload, declared payload size), up to and including `data`."""
    chunks: dict[bytes, tuple[int, int]] = {}
    pos = 12
    while pos + 8 <= size and b"data" not in chunks:
        f.seek(pos)
        cid, csize = struct.unpack("<4sI", f.read(8))
        chunks[cid] = (pos + 8, csize)
        pos += 8 + csize + (csize & 1)
    return chunks


def _check_wav(path: Path, size: int) -> None:
    """PyAV plays a cut-off WAV without complaint, so compare the header's promise with the file size."""
    with open(path, "rb") as f:
        riff = f.read(12)
        if len(riff) < 12 or riff[:4] != b"RIFF" or riff[8:] != b"WAVE":
            return  # RF64 and friends: leave them to the decoder
        chunks = _wav_chunks(f, size)
        if b"data" not in chunks:
            raise _cut_short(f"{path.name} is cut short: it ends before its audio data starts")
        offset, declared = chunks[b"data"]
        # Streaming writers that never went back to fill in the size leave 0 or 0xFFFFFFFF.
        if declared in (0, 0xFFFFFFFF) or offset + declared <= size:
            return
        byte_rate = 0
        if b"fmt " in chunks and chunks[b"fmt "][1] >= 12:
            f.seek(chunks[b"fmt "][0] + 8)
            (byte_rate,) = struct.unpack("<I", f.read(4))
    held = size - offset
    if byte_rate:
        amount = f"{declared / byte_rate:.1f} s of audio but holds only {max(held, 0) / byte_rate:.1f} s"
    else:
        amount = f"{declared} bytes of audio but holds only {max(held, 0)}"
    raise _cut_short(f"{path.name} is cut short: its header promises {amount}")


def _seconds(value: int | None, time_base: Fraction | None) -> float | None:
    return float(value * time_base) if value and time_base else None


def _too_long(name: str, what: str, seconds: float, limit: float, key: str) -> ProbeError:
    return ProbeError(
        f"{name} is {seconds:.1f} s long; {what} may be at most {limit:g} s",
        f"shorten it (split long recordings into parts) or raise limits.{key}",
    )


def _check_finite(path: Path, frame: av.AudioFrame, at: float) -> None:
    """Float samples can be NaN or infinite (a broken export); encoders refuse them mid-generation."""
    if frame.format.name not in _FLOAT_FORMATS:
        return  # integer and compressed formats cannot hold non-finite values
    if not np.isfinite(frame.to_ndarray()).all():
        raise ProbeError(
            f"{path.name} holds invalid audio samples (NaN or infinite values) from {at:.1f} s on",
            "the exporting program wrote broken floating-point audio; export it again "
            "(16- or 24-bit WAV, or MP3) and drop it in again",
        )


def _decoded_seconds(
    path: Path, container: av.container.InputContainer, stream: av.AudioStream, stop_after: float
) -> float:
    """Decode to measure real length (the header can lie) and check the samples are numbers; stop once past
    `stop_after` seconds."""
    seconds = 0.0
    try:
        for frame in container.decode(stream):
            _check_finite(path, frame, seconds)
            seconds += frame.samples / (frame.sample_rate or stream.codec_context.sample_rate)
            if seconds > stop_after:
                break
    except av.FFmpegError as exc:
        if not seconds:
            raise
        # Cut-off FLAC, Ogg and ADTS files decode fine up to the cut, then fail.
        raise _cut_short(
            f"{path.name} is damaged or cut short: decoding stops after {seconds:.1f} s ({exc.strerror or exc})"
        ) from None
    return seconds


def probe_audio(path: Path, limits: Limits) -> AudioProbe:
    """Decode the whole audio track, refusing empty, cut-off, undecodable, too short or too long files."""
    path = Path(path)
    size = _check_file(path, limits)
    if path.suffix.lower() == ".wav":
        _check_wav(path, size)
    try:
        with av.open(str(path)) as container:
            if not container.streams.audio:
                raise ProbeError(f"{path.name} has no audio track", _AUDIO_HINT, incomplete=True)
            stream = container.streams.audio[0]
            declared = _seconds(stream.duration, stream.time_base)
            if declared is not None and declared > limits.max_audio_seconds:
                raise _too_long(path.name, "audio", declared, limits.max_audio_seconds, "max_audio_seconds")
            seconds = _decoded_seconds(path, container, stream, limits.max_audio_seconds)
            ctx = stream.codec_context
            found = AudioProbe(seconds, ctx.sample_rate, ctx.channels, ctx.name)
    except av.error.EOFError:
        # Ogg looks for its last page while opening, so a cut-off Ogg fails here.
        raise _cut_short(f"{path.name} is cut short: the file ends unexpectedly") from None
    except av.FFmpegError as exc:
        raise ProbeError(f"{path.name} is not decodable audio ({exc.strerror or exc})", _AUDIO_HINT,
                         incomplete=True) from None
    if declared is not None and declared - seconds > max(_SHORTFALL_SECONDS, _SHORTFALL_SHARE * declared):
        raise _cut_short(
            f"{path.name} is cut short: it declares {declared:.1f} s but only {seconds:.1f} s can be decoded")
    if seconds > limits.max_audio_seconds:
        raise _too_long(path.name, "audio", seconds, limits.max_audio_seconds, "max_audio_seconds")
    if seconds < limits.min_audio_seconds:
        raise ProbeError(
            f"{path.name} is only {seconds:.2f} s long; audio must be at least {limits.min_audio_seconds:g} s",
            "check that the right file was exported (it may be silent or empty)",
        )
    return found


def _image_size(path: Path, limits: Limits) -> tuple[int, int]:
    """Width and height as shown, refusing too many pixels from the header alone (before any decoding)."""
    try:
        with Image.open(path) as im:
            w, h = im.size
            if w * h > limits.max_image_pixels:
                raise ProbeError(
                    f"{path.name} is {w}x{h} ({w * h / 1e6:.0f} megapixels), over the "
                    f"{limits.max_image_pixels / 1e6:g} megapixel limit",
                    "scale the photo down (1920 pixels on the long side is plenty) and drop it in again",
                )
            # Only now: for PNG, reading EXIF can decode the whole image.
            w, h = shown_size(im)
    except UnidentifiedImageError:
        raise ProbeError(f"{path.name} is not a valid image", _IMAGE_HINT, incomplete=True) from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ProbeError(f"{path.name} is a damaged image ({exc})", _IMAGE_HINT, incomplete=True) from None
    return w, h


def _check_faces(frames: list[np.ndarray], rule: FaceRule, where: str) -> None:
    """Refuse a portrait without a face, or with several under FaceRule.ONE: one cascade pass per frame
    answers both, since a frame's face count is 0 exactly when no face is found."""
    if not rule:
        return
    counts: list[int] = []
    for frame in frames:
        counts.append(count_faces(frame))
        if rule == FaceRule.ANY and counts[-1]:
            break  # one face anywhere is all ANY asks for
    if not any(counts):
        raise ProbeError(f"no face found in {where}", _FACE_HINT)
    # Most sampled frames, not any: one frame with a face-like patch beside the face is not a second person.
    if rule == FaceRule.ONE and 2 * sum(count > 1 for count in counts) > len(counts):
        raise ProbeError(f"more than one face in {where}", _ONE_FACE_HINT)


def _probe_image(path: Path, limits: Limits, need_face: FaceRule) -> PortraitProbe:
    try:
        with warnings.catch_warnings():
            # Pillow only warns between its two bomb thresholds; a warning here is still a bomb.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            w, h = _image_size(path, limits)
            # A reduced JPEG decode still reads every byte, so damage is caught at a fraction of the cost.
            bgr = read_image(path, min_side=_FACE_SIDE)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ProbeError(
            f"{path.name} has too many pixels to decode safely ({exc})",
            "scale the photo down and drop it in again",
        ) from None
    except MediaError as exc:  # a JPEG whose end has not arrived yet decodes as damaged too
        raise ProbeError(exc.reason, exc.hint, incomplete=True) from None
    _check_faces([bgr], need_face, path.name)
    return PortraitProbe("image", w, h, None, None)


def _first_frames(container: av.container.InputContainer, stream: av.VideoStream, every: int) -> list[np.ndarray]:
    """Up to _FACE_SAMPLES upright BGR frames, `every` frames apart, from the start of the video."""
    picked: list[np.ndarray] = []
    for i, frame in enumerate(container.decode(stream)):
        if i % every == 0:
            picked.append(upright(frame.to_ndarray(format="bgr24"), frame.rotation))
            if len(picked) == _FACE_SAMPLES:
                break
    return picked


def _demuxed_seconds(container: av.container.InputContainer, stream: av.VideoStream) -> float:
    """Length from packet timestamps, for containers (browser WebM) that declare none."""
    end = 0
    for packet in container.demux(stream):
        if packet.pts is not None:
            end = max(end, packet.pts + (packet.duration or 0))
    return float(end * stream.time_base) if stream.time_base else 0.0


def _check_video_pixels(name: str, width: int, height: int, limits: Limits) -> None:
    if width * height > limits.max_video_pixels:
        raise ProbeError(
            f"{name} is {width}x{height}, over the {limits.max_video_pixels / 1e6:g} megapixel limit "
            "for portrait videos",
            "export the portrait video at 1080p or lower and drop it in again",
        )


def _probe_video(path: Path, limits: Limits, need_face: FaceRule) -> PortraitProbe:
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise ProbeError(f"{path.name} has no video track", _VIDEO_HINT, incomplete=True)
            stream = container.streams.video[0]
            # Checked before decoding when the container says, and again on the first real frame.
            _check_video_pixels(path.name, stream.codec_context.width, stream.codec_context.height, limits)
            declared = _seconds(stream.duration, stream.time_base) or _seconds(
                container.duration, Fraction(1, av.time_base)
            )
            if declared is not None and declared > limits.max_portrait_seconds:
                raise _too_long(path.name, _A_PORTRAIT, declared, limits.max_portrait_seconds, _PORTRAIT_KEY)
            fps = float(stream.average_rate or stream.guessed_rate or 0) or None
            frames = _first_frames(container, stream, max(1, round((fps or 25) / 2)))
            if not frames:
                raise ProbeError(f"{path.name} has no decodable video frames", _VIDEO_HINT, incomplete=True)
            _check_video_pixels(path.name, frames[0].shape[1], frames[0].shape[0], limits)
            seconds = declared if declared is not None else _demuxed_seconds(container, stream)
    except av.FFmpegError as exc:
        raise ProbeError(f"{path.name} is not a decodable video ({exc.strerror or exc})", _VIDEO_HINT,
                         incomplete=True) from None
    if seconds > limits.max_portrait_seconds:
        raise _too_long(path.name, _A_PORTRAIT, seconds, limits.max_portrait_seconds, _PORTRAIT_KEY)
    _check_faces(frames, need_face, f"the first frames of {path.name}")
    h, w = frames[0].shape[:2]
    return PortraitProbe("video", w, h, seconds, fps)


def probe_portrait(path: Path, limits: Limits, need_face: FaceRule,
                   face_box: FaceEdges | None = None) -> PortraitProbe:
    """Check a portrait image or video: decodable, within size limits, and showing a face: found by the
    detector (if asked; exactly one with `FaceRule.ONE`), or where job.yaml's face_box says, which must then
    lie inside the picture. A plain bool works as NONE/ANY."""
    path = Path(path)
    _check_file(path, limits)
    kind = kind_of(path)
    # A face box from job.yaml says where the face is: the detector is not asked.
    rule = FaceRule(need_face) if face_box is None else FaceRule.NONE
    if kind is MediaKind.IMAGE:
        found = _probe_image(path, limits, rule)
    elif kind is MediaKind.VIDEO:
        found = _probe_video(path, limits, rule)
    else:
        raise ProbeError(f"{path.name} is not a portrait image or video", "use JPEG, PNG, WebP, MP4, MOV or WebM")
    if face_box is not None and edges_outside(face_box, (found.width, found.height)):
        raise ProbeError(
            f"job.yaml's face_box {list(face_box)} reaches outside {path.name}, which is "
            f"{found.width}x{found.height}",
            "give face_box as [top, bottom, left, right] in pixels of the portrait as it is shown "
            f"(bottom at most {found.height}, right at most {found.width})",
        )
    return found


def probe_script(path: Path, limits: Limits) -> int:
    """Check a script: a regular file whose text is readable and within limits; returns its characters."""
    from heygem_daemon.speech.text import ScriptError, read_script

    _check_file(path, limits)
    try:
        return len(read_script(path, limits.max_script_chars))
    except ScriptError as exc:
        raise ProbeError(exc.reason, exc.hint, exc.incomplete) from None


def probe_input(path: Path, limits: Limits, need_face: FaceRule, face_box: FaceEdges | None = None) -> None:
    """Whichever check the file's kind calls for (by its extension)."""
    kind = kind_of(path)
    if kind is MediaKind.AUDIO:
        probe_audio(path, limits)
    elif kind is MediaKind.SCRIPT:
        probe_script(path, limits)
    else:
        probe_portrait(path, limits, need_face, face_box)
