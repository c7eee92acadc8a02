"""Face boxes for every portrait frame: detect, fill gaps, pad, smooth; cached per portrait video.

Raw detections (before pads and smoothing) are what the cache keeps, so changing those settings never
needs a new detection. Boxes are in the pixels of the portrait as scaled for the output.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from heygem_daemon.log import get_logger
from heygem_daemon.media.faces import Box, detect_face

log = get_logger("heygem.wav2lip")

MISSING = -1
_HEARTBEAT_EVERY = 25  # frames between progress heartbeats while detecting a long portrait video


def detect_raw(frame: Callable[[int], np.ndarray], first: int, stop: int,
               beat: Callable[[], None] = lambda: None) -> np.ndarray:
    """(stop - first, 4) int32 x, y, w, h of the face in source frames first..stop-1; MISSING rows where none.

    Haar cascades do not batch, so each frame is searched near the last box (a fraction of a full
    search) and only a miss costs a full-frame search."""
    out = np.full((stop - first, 4), MISSING, dtype=np.int32)
    last: Box | None = None
    for k in range(first, stop):
        pixels = frame(k)
        box = detect_face(pixels, near=last) if last is not None else None
        box = box or detect_face(pixels)
        if box is not None:
            out[k - first] = (box.x, box.y, box.w, box.h)
        last = box
        if (k - first) % _HEARTBEAT_EVERY == 0:
            beat()
    return out


def finish_boxes(raw: np.ndarray, size: tuple[int, int], pads: tuple[int, int, int, int],
                 smooth_frames: int) -> np.ndarray | None:
    """Per frame (x1, y1, x2, y2) int32 boxes from raw detections, or None when no frame has a face.

    Frames without a detection take a box interpolated from their neighbours (a blink or a turned
    head should not stop the video). Pads (top, bottom, left, right) and the clip to the frame come
    before smoothing, as in the reference."""
    found = np.flatnonzero(raw[:, 0] != MISSING)
    if found.size == 0:
        return None
    frames = np.arange(len(raw))
    x, y, w, h = (np.interp(frames, found, raw[found, c].astype(np.float64)) for c in range(4))
    top, bottom, left, right = pads
    width, height = size
    boxes = np.stack([
        np.clip(x - left, 0, width), np.clip(y - top, 0, height),
        np.clip(x + w + right, 0, width), np.clip(y + h + bottom, 0, height),
    ], axis=1)
    boxes = np.rint(smooth(boxes, smooth_frames)).astype(np.int32)
    # A pad that pushes a box off the frame must not leave an empty crop.
    boxes[:, 2] = np.maximum(boxes[:, 2], boxes[:, 0] + 1)
    boxes[:, 3] = np.maximum(boxes[:, 3], boxes[:, 1] + 1)
    return boxes


def smooth(boxes: np.ndarray, window: int) -> np.ndarray:
    """The reference's moving mean: frame i averages frames i..i+window-1 (the last `window` near the end)."""
    n = len(boxes)
    window = min(window, n)
    if window <= 1:
        return boxes
    sums = np.concatenate([np.zeros((1, boxes.shape[1])), np.cumsum(boxes, axis=0)])
    starts = np.minimum(np.arange(n), n - window)
    return (sums[starts + window] - sums[starts]) / window


class BoxCache:
    """Raw detections per portrait video (.npy named by content hash, detector and frame size).

    A batch of many audios on one portrait detects once. Entries unused for `max_age_days` are
    deleted whenever a new entry is written, so the folder stays small; deleting it is always safe."""

    def __init__(self, folder: Path, max_age_days: float) -> None:
        self.folder = folder
        self.max_age_s = max_age_days * 86400

    def _path(self, key: str) -> Path:
        return self.folder / f"{key}.npy"

    def load(self, key: str) -> np.ndarray | None:
        path = self._path(key)
        try:
            raw = np.load(path, allow_pickle=False)
        except FileNotFoundError:
            return None
        except (OSError, ValueError, EOFError) as exc:
            log.warning("unreadable face box cache entry; detecting again", path=str(path), error=str(exc))
            return None
        if raw.ndim != 2 or raw.shape[1] != 4:
            return None
        os.utime(path)  # age counts from the last use, not the first
        return raw.astype(np.int32, copy=False)

    def save(self, key: str, raw: np.ndarray) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self._path(key)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        with open(tmp, "wb") as fh:
            np.save(fh, raw.astype(np.int32), allow_pickle=False)
        os.replace(tmp, path)
        self._prune()

    def _prune(self) -> None:
        cutoff = time.time() - self.max_age_s
        for entry in self.folder.glob("*.npy"):
            try:
                if entry.stat().st_mtime < cutoff:
                    entry.unlink()
            except FileNotFoundError:
                pass  # another worker pruned it first
