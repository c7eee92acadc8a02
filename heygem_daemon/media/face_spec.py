"""What intake demands of a portrait's face, and face boxes as job.yaml gives them: pure values, no OpenCV,
so the daemon's process can use them without loading the detector (faces.py does the detecting)."""

from __future__ import annotations

from enum import IntEnum


class FaceRule(IntEnum):
    """What intake demands of a portrait for an engine. Compares like the bool it replaced (NONE is false)."""

    NONE = 0
    ANY = 1
    """At least one face."""
    ONE = 2
    """Exactly one face: the engine refuses a picture with several people (HeyGem's "存在多人脸")."""


FaceEdges = tuple[int, int, int, int]
"""A face box as job.yaml and the Wav2Lip reference's `--box` give it: top, bottom, left, right (pixels)."""


def edges_outside(edges: FaceEdges, size: tuple[int, int]) -> bool:
    """Whether [top, bottom, left, right] reaches past a (w, h) picture."""
    top, bottom, left, right = edges
    return bottom > size[1] or right > size[0]


def scaled_edges(edges: FaceEdges, source: tuple[int, int], size: tuple[int, int]) -> FaceEdges:
    """The same box in a picture scaled from `source` (w, h) to `size`, never empty."""
    top, bottom, left, right = edges
    sx, sy = size[0] / source[0], size[1] / source[1]
    t, lf = min(round(top * sy), size[1] - 1), min(round(left * sx), size[0] - 1)
    return t, max(round(bottom * sy), t + 1), lf, max(round(right * sx), lf + 1)
