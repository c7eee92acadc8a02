"""Find the main face in a frame with OpenCV's bundled Haar cascade (no model download, CPU only)."""

from __future__ import annotations

import functools
import threading
from dataclasses import dataclass

import cv2
import numpy as np

_CASCADE = "haarcascade_frontalface_default.xml"
# Detection cost grows with pixels; faces big enough to lip-sync survive this downscale.
_MAX_SIDE = 640
# A tracked face changes size slowly between detections a few frames apart.
_NEAR_SIZE = (0.7, 1.4)
# cv2 releases the GIL during detection, and one classifier object is not meant for concurrent calls.
_LOCK = threading.Lock()
# A second face counts when it is nearly as convincing and as big as the best one: the cascade also
# fires weakly on ears, hands and patterned shirts next to a single face.
_SECOND_FACE_WEIGHT = 0.5
_SECOND_FACE_SIZE = 0.5


@dataclass(frozen=True)
class Box:
    x: int
    y: int
    w: int
    h: int


def _gray(bgr: np.ndarray) -> tuple[np.ndarray, float]:
    gray = cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY)
    scale = min(1.0, _MAX_SIDE / max(gray.shape))
    if scale < 1.0:
        gray = cv2.resize(gray, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
    return gray, scale


@functools.lru_cache(maxsize=1)
def _cascade() -> cv2.CascadeClassifier:
    classifier = cv2.CascadeClassifier(cv2.data.haarcascades + _CASCADE)
    if classifier.empty():
        raise RuntimeError(f"OpenCV could not load {_CASCADE}; reinstall opencv-python-headless 4.x")
    return classifier


def _cascade_pass(
    bgr: np.ndarray, sizes: tuple[float, float] | None = None
) -> tuple[np.ndarray, np.ndarray, float]:
    """Every face the cascade finds (boxes in detection pixels), their level weights, and the detection scale."""
    gray, scale = _gray(bgr)
    limits: dict[str, tuple[int, int]] = {}
    if sizes is not None:
        low, high = (max(1, int(side * scale)) for side in sizes)
        limits = {"minSize": (low, low), "maxSize": (high, high)}
    with _LOCK:
        boxes, _levels, weights = _cascade().detectMultiScale3(
            cv2.equalizeHist(gray), scaleFactor=1.1, minNeighbors=5, outputRejectLevels=True, **limits
        )
    return boxes, np.ravel(weights), scale


def detect_face(bgr: np.ndarray, near: Box | None = None) -> Box | None:
    """The most confident frontal face, in the input's pixel coordinates, or None.

    With `near` (the last known box) only a window around it is searched, for a face of similar size:
    a fraction of a full search, which is what tracking through video frames needs."""
    x0 = y0 = 0
    sizes: tuple[float, float] | None = None
    if near is not None:
        x0, y0 = max(0, near.x - near.w // 2), max(0, near.y - near.h // 2)
        bgr = bgr[y0 : near.y + near.h + near.h // 2, x0 : near.x + near.w + near.w // 2]
        sizes = (_NEAR_SIZE[0] * near.w, _NEAR_SIZE[1] * near.w)
    boxes, weights, scale = _cascade_pass(bgr, sizes)
    if len(boxes) == 0:
        return None
    # The first or largest hit can be a face-like patch; the level weight ranks real faces highest.
    x, y, w, h = (int(round(v / scale)) for v in boxes[int(np.argmax(weights))])
    return Box(x0 + x, y0 + y, w, h)


def count_faces(bgr: np.ndarray) -> int:
    """How many distinct people face the camera: the best face, plus others nearly as convincing and big.

    0 exactly when detect_face finds none, so one pass answers both "is there a face" and "how many"."""
    boxes, weights, _scale = _cascade_pass(bgr)
    if len(boxes) == 0:
        return 0
    best = int(np.argmax(weights))
    widths = boxes[:, 2]
    strong = (weights >= _SECOND_FACE_WEIGHT * weights[best]) & (widths >= _SECOND_FACE_SIZE * widths[best])
    # A negative best weight would fail its own comparison; the best face always counts.
    strong[best] = True
    return int(np.count_nonzero(strong))
