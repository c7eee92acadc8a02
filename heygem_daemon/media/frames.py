"""Portrait frame sources: a still image or a decoded video, already scaled to the output size."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import av
import cv2
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from heygem_daemon.media.errors import MediaError
from heygem_daemon.media.kinds import MediaKind, kind_of

_IMAGE_HINT = "save it again as JPEG or PNG and drop it in again"
# Phones store some photos sideways with an EXIF orientation of 5..8.
_EXIF_ORIENTATION = 0x0112
_SIDEWAYS = {5, 6, 7, 8}
_VIDEO_HINT = "re-export it as MP4 (H.264) and drop it in again"


def output_size(src_w: int, src_h: int, height: int) -> tuple[int, int]:
    """(w, h) scaled to `height` with the source aspect; both even because yuv420p halves them."""
    h = max(2, height - height % 2)
    w = max(2, int(round(src_w * h / src_h / 2)) * 2)
    return w, h


def ping_pong_index(i: int, n: int) -> int:
    """Walk 0..n-1 and back so a looped portrait video never jumps from its last frame to its first."""
    if n <= 1:
        return 0
    period = 2 * n - 2
    r = i % period
    return r if r < n else period - r


@dataclass(frozen=True)
class PortraitFrames:
    frames: np.ndarray
    """(count, h, w, 3) BGR uint8, read-only: a plain array for stills, a file-backed memmap for videos."""
    source_fps: float | None
    source_size: tuple[int, int]
    """(w, h) of the portrait as shown, before scaling: the pixels a person measures a face box in."""

    @property
    def size(self) -> tuple[int, int]:
        return int(self.frames.shape[2]), int(self.frames.shape[1])

    @property
    def count(self) -> int:
        return int(self.frames.shape[0])

    def frame(self, k: int) -> np.ndarray:
        """Source frame k (read-only view: copy before drawing on it)."""
        return self.frames[k]

    def index_for_output(self, i: int, fps: float | None = None) -> int:
        """Which source frame is shown at output frame i; with `fps`, source timing is kept rather than one-to-one."""
        k = i
        if fps is not None and self.source_fps is not None:
            k = int(i * self.source_fps / fps + 1e-6)
        return ping_pong_index(k, self.count)

    def for_output(self, i: int, fps: float | None = None) -> np.ndarray:
        """The frame shown at output frame i (see index_for_output)."""
        return self.frame(self.index_for_output(i, fps))


def _resize(bgr: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    if (bgr.shape[1], bgr.shape[0]) == size:
        return bgr
    shrinking = size[0] < bgr.shape[1]
    return cv2.resize(bgr, size, interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_CUBIC)


def shown_size(im: Image.Image) -> tuple[int, int]:
    """(w, h) of an opened image as displayed (EXIF orientation applied), from its header alone."""
    w, h = im.size
    return (h, w) if im.getexif().get(_EXIF_ORIENTATION) in _SIDEWAYS else (w, h)


def read_image(path: Path, min_side: int | None = None) -> np.ndarray:
    """BGR pixels upright per EXIF; `min_side` lets JPEG decode at a reduced scale that still covers it."""
    path = Path(path)
    try:
        with Image.open(path) as im:
            if min_side:
                im.draft("RGB", (min_side, min_side))
            rgb = np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
    except UnidentifiedImageError:
        raise MediaError(f"{path.name} is not a valid image", _IMAGE_HINT) from None
    except Image.DecompressionBombError:
        raise MediaError(
            f"{path.name} has too many pixels to decode safely", "scale it down and drop it in again"
        ) from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise MediaError(f"{path.name} is a damaged or incomplete image ({exc})", _IMAGE_HINT) from None
    return cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)


def upright(bgr: np.ndarray, rotation: int) -> np.ndarray:
    """Apply the display matrix (phones store portrait video sideways plus a rotation)."""
    quarter_turns = int(round(rotation / 90)) % 4
    return np.ascontiguousarray(np.rot90(bgr, quarter_turns)) if quarter_turns else bgr


def _spool_frames(path: Path, height: int, raw: BinaryIO) -> tuple[tuple[int, int], tuple[int, int], int, float]:
    """Write every frame, upright and scaled, to `raw`; returns (size, source size, count, fps)."""
    size: tuple[int, int] | None = None
    shown = (0, 0)
    count = 0
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise MediaError(f"{path.name} has no video track", _VIDEO_HINT)
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            fps = float(stream.average_rate or stream.guessed_rate or 25)
            for frame in container.decode(stream):
                sideways = int(round(frame.rotation / 90)) % 2 == 1
                if size is None:
                    shown = (frame.height, frame.width) if sideways else (frame.width, frame.height)
                    size = output_size(shown[0], shown[1], height)
                # Scale and convert in one swscale pass, before the (cheap) quarter turn.
                coded = (size[1], size[0]) if sideways else size
                bgr = frame.reformat(width=coded[0], height=coded[1], format="bgr24", interpolation="AREA")
                raw.write(upright(bgr.to_ndarray(), frame.rotation).tobytes())
                count += 1
    except av.FFmpegError as exc:
        raise MediaError(f"{path.name} is not a decodable video ({exc.strerror or exc})", _VIDEO_HINT) from None
    if size is None:
        raise MediaError(f"{path.name} has no decodable video frames", _VIDEO_HINT)
    return size, shown, count, fps


def _decode_video(path: Path, height: int, scratch_dir: Path) -> PortraitFrames:
    fd, raw_name = tempfile.mkstemp(prefix="portrait-", suffix=".bgr", dir=scratch_dir)
    try:
        with os.fdopen(fd, "wb") as raw:
            size, shown, count, fps = _spool_frames(path, height, raw)
    except BaseException:
        os.unlink(raw_name)
        raise
    # Frames live on disk, so a long portrait video costs page cache, not resident memory.
    frames = np.memmap(raw_name, dtype=np.uint8, mode="r", shape=(count, size[1], size[0], 3))
    return PortraitFrames(frames, fps, shown)


def open_portrait(path: Path, height: int, scratch_dir: Path) -> PortraitFrames:
    """Decode a portrait once, scaled to `height`; video frames are spooled to a file in scratch_dir."""
    path = Path(path)
    kind = kind_of(path)
    if kind is MediaKind.VIDEO:
        return _decode_video(path, height, Path(scratch_dir))
    if kind is not MediaKind.IMAGE:
        raise MediaError(f"{path.name} is not a portrait image or video", "use JPEG, PNG, WebP, MP4, MOV or WebM")
    bgr = read_image(path, min_side=height)
    still = _resize(bgr, output_size(bgr.shape[1], bgr.shape[0], height))[np.newaxis]
    still.flags.writeable = False
    with Image.open(path) as im:  # the header again: a reduced JPEG decode no longer knows the full size
        source = shown_size(im)
    return PortraitFrames(still, None, source)
