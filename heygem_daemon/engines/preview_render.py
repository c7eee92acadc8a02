"""The preview engine's drawing: the mouth opens and closes with the loudness of the speech.

OpenCV, numpy and PyAV load here, in the worker process on the first task: the daemon imports only
`preview.py` (the settings and `needs_face`), as for every engine.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import astuple
from pathlib import Path

import cv2
import numpy as np

from heygem_daemon.engines.base import BadInputError, ProgressFn, TaskSpec
from heygem_daemon.media.audio import load_clip, load_mono
from heygem_daemon.media.errors import MediaError
from heygem_daemon.intake.pairing import FACE_BOX
from heygem_daemon.media.faces import Box, detect_face
from heygem_daemon.media.face_spec import scaled_edges
from heygem_daemon.media.frames import PortraitFrames, open_portrait
from heygem_daemon.media.writer import Mp4Writer, pick_encoder

_RATE = 16000
_LOUDNESS_WINDOW_S = 0.06
# Levels below this share of the clip's loud level (or -50 dBFS) count as silence: the mouth stays shut.
_GATE_SHARE = 0.12
_GATE_FLOOR = 10 ** (-50 / 20)
# Mouths open quickly at a syllable's onset and close a little slower.
_ATTACK_S, _RELEASE_S = 0.02, 0.05
_SHUT = 0.01
_NO_FACE_HINT = "use a front-facing photo where the face is clearly visible"
# Mouth cavity (BGR): dark red-brown at the lips, near black deeper in; a tiny opening fades in
# rather than drawing a hard line.
_CAVITY_EDGE = np.array([40, 42, 86], dtype=np.float32)
_CAVITY_CORE = np.array([14, 12, 26], dtype=np.float32)
_CAVITY_OPACITY = 0.92
_FEATHER_PX = 1.2
_FADE_IN_PX = 3.0
_PROGRESS_STEPS = 50
# Box smoothing for video portraits: Haar boxes jitter by a few pixels between detections.
_BOX_BLEND = 0.5
_FIRST_FACE_TRIES = 20


def mouth_openness(mono: np.ndarray, count: int, fps: float, gain: float) -> np.ndarray:
    """Per output frame, how open the mouth is (0 shut .. 1 fully open), from 16 kHz mono samples."""
    centers = ((np.arange(count) + 0.5) * _RATE / fps).astype(np.int64)
    half = int(_RATE * _LOUDNESS_WINDOW_S / 2)
    lo = np.clip(centers - half, 0, len(mono))
    hi = np.clip(centers + half, 0, len(mono))
    energy = np.concatenate([[0.0], np.cumsum(mono.astype(np.float64) ** 2)])
    rms = np.sqrt((energy[hi] - energy[lo]) / np.maximum(hi - lo, 1))
    # "Loud" is judged over the frames with sound, so long pauses do not make every syllable look loud.
    active = rms[rms > _GATE_FLOOR]
    if active.size == 0:
        return np.zeros(count, dtype=np.float32)
    loud = float(np.percentile(active, 90))
    floor = max(_GATE_SHARE * loud, _GATE_FLOOR)
    target = np.clip((rms - floor) / (loud - floor) * gain, 0.0, 1.0)
    return _smoothed(target, fps)


def _smoothed(target: np.ndarray, fps: float) -> np.ndarray:
    attack = 1 - math.exp(-1 / (fps * _ATTACK_S))
    release = 1 - math.exp(-1 / (fps * _RELEASE_S))
    out = np.empty(len(target), dtype=np.float32)
    level = 0.0
    for i, t in enumerate(target):
        level += (attack if t > level else release) * (t - level)
        out[i] = level
    # The release only approaches zero; snapping makes pauses show the untouched portrait.
    out[out < _SHUT] = 0.0
    return out


def _taper(t: np.ndarray) -> np.ndarray:
    """1 for t <= 0, easing smoothly to 0 at t >= 1."""
    return 0.5 * (1 + np.cos(np.pi * np.clip(t, 0.0, 1.0)))


class MouthRig:
    """Opens the mouth inside one face box: the lower lip and jaw slide down, the upper lip lifts a little,
    and a dark cavity fills the gap. Only pixels inside the face box are ever touched."""

    # Fractions of the face box, fitted to OpenCV's frontal-face boxes.
    LIP_LINE, HALF_WIDTH, TOP = 0.80, 0.20, 0.70
    MAX_DROP, MAX_LIFT = 0.08, 0.03
    LOWER_BAND, UPPER_BAND = 0.04, 0.02

    def __init__(self, box: Box, frame_size: tuple[int, int]) -> None:
        self.box = box
        cx = box.x + 0.5 * box.w
        self.lip = box.y + self.LIP_LINE * box.h
        self.half_width = self.HALF_WIDTH * box.w
        self.max_drop, self.max_lift = self.MAX_DROP * box.h, self.MAX_LIFT * box.h
        self.x0 = max(0, math.floor(cx - self.half_width - 1))
        self.x1 = min(frame_size[0], math.ceil(cx + self.half_width + 1), box.x + box.w)
        self.y0 = max(0, math.floor(box.y + self.TOP * box.h))
        self.y1 = min(frame_size[1], box.y + box.h)
        xs = np.arange(self.x0, self.x1, dtype=np.float32)
        ys = np.arange(self.y0, self.y1, dtype=np.float32)
        u2 = ((xs - cx) / self.half_width) ** 2
        self.u2 = u2[np.newaxis, :]
        # Vertical offsets trace half-ellipses, so the opening between the lips is exactly the cavity.
        self.arc = np.sqrt(np.clip(1 - u2, 0.0, None))[np.newaxis, :]
        below = ys >= self.lip
        drop_start = self.lip + self.LOWER_BAND * box.h
        lift_start = self.lip - self.UPPER_BAND * box.h
        self.drop_rows = np.where(below, _taper((ys - drop_start) / max(1.0, self.y1 - drop_start)), 0.0)
        self.lift_rows = np.where(below, 0.0, _taper((lift_start - ys) / max(1.0, lift_start - self.y0)))
        self.drop_rows, self.lift_rows = self.drop_rows[:, np.newaxis], self.lift_rows[:, np.newaxis]
        self.below = below[:, np.newaxis]
        self.from_lip = np.abs(ys - self.lip)[:, np.newaxis]
        self.rows = ys[:, np.newaxis]
        self.map_x = np.ascontiguousarray(np.broadcast_to(xs, (len(ys), len(xs))))

    def draw(self, canvas: np.ndarray, source: np.ndarray, openness: float) -> None:
        """Write the mouth region of `source`, opened by `openness` (0..1), into `canvas`."""
        region = (slice(self.y0, self.y1), slice(self.x0, self.x1))
        drop, lift = openness * self.max_drop, openness * self.max_lift
        if drop + lift < 0.1:
            canvas[region] = source[region]
            return
        shift = (drop * self.drop_rows - lift * self.lift_rows) * self.arc
        map_y = (self.rows - shift).astype(np.float32)
        patch = cv2.remap(source, self.map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
        semi = np.where(self.below, drop, lift)
        r = np.sqrt(self.u2 + (self.from_lip / semi) ** 2)
        fade = min(1.0, (drop + lift) / _FADE_IN_PX) * _CAVITY_OPACITY
        inside = np.clip(1 - r, 0.0, 1.0)
        alpha = (np.clip(inside * semi / _FEATHER_PX, 0.0, 1.0) * fade)[..., np.newaxis]
        cavity = _CAVITY_EDGE + (_CAVITY_CORE - _CAVITY_EDGE) * np.sqrt(inside)[..., np.newaxis]
        canvas[region] = (patch * (1 - alpha) + cavity * alpha).astype(np.uint8)


class _FaceTrack:
    """The face box for each output frame of a video portrait: re-detected every few frames, smoothed,
    and held when a detection misses (a blink or a turn should not stop the mouth). `every` 0 holds the
    first box throughout (job.yaml's face_box)."""

    def __init__(self, first: Box, every: int) -> None:
        self.box, self.every = first, every
        self.lost = False

    def at(self, i: int, frame: np.ndarray) -> Box:
        if not self.every or i % self.every:
            return self.box
        # Searching near the last box is cheap; after a miss, look at the whole frame again.
        found = detect_face(frame, near=None if self.lost else self.box)
        self.lost = found is None
        if found is not None:
            pairs = zip(astuple(found), astuple(self.box))
            self.box = Box(*(round(_BOX_BLEND * new + (1 - _BOX_BLEND) * old) for new, old in pairs))
        return self.box


def _first_face(portrait: PortraitFrames, every: int) -> Box | None:
    """The first detectable face, trying every `every`-th source frame (stills have just one).

    A full-frame search is slow, so a long video is sampled at most _FIRST_FACE_TRIES times."""
    for k in range(0, portrait.count, max(every, portrait.count // _FIRST_FACE_TRIES)):
        if (box := detect_face(portrait.frame(k))) is not None:
            return box
    return None


def _given_face(portrait: PortraitFrames, edges: list[int]) -> Box:
    """job.yaml's face_box (top, bottom, left, right in the portrait's own pixels) at the output size."""
    top, bottom, left, right = scaled_edges(tuple(edges), portrait.source_size, portrait.size)  # type: ignore
    return Box(left, top, right - left, bottom - top)


def _still_frames(portrait: PortraitFrames, box: Box, openness: np.ndarray) -> Iterator[np.ndarray]:
    """One resize and one detection for the whole clip; each frame only redraws the mouth region.

    The same canvas is yielded every time: the writer copies a frame before the next one is drawn."""
    base = portrait.frame(0)
    rig = MouthRig(box, portrait.size)
    canvas = base.copy()
    for amount in openness:
        rig.draw(canvas, base, float(amount))
        yield canvas


def _video_frames(
    portrait: PortraitFrames, first: Box, openness: np.ndarray, fps: float, every: int
) -> Iterator[np.ndarray]:
    track = _FaceTrack(first, every)
    rig = MouthRig(first, portrait.size)
    for i, amount in enumerate(openness):
        source = portrait.for_output(i, fps)
        box = track.at(i, source)
        if box != rig.box:
            rig = MouthRig(box, portrait.size)
        canvas = np.array(source)
        rig.draw(canvas, source, float(amount))
        yield canvas


def render(task: TaskSpec, progress: ProgressFn, mouth_gain: float, detect_every: int) -> Path:
    """One video: the portrait (a still or a video) with its mouth following the task's audio."""
    fps = task.preset.fps
    try:
        mono = load_mono(task.audio, _RATE)
        clip = load_clip(task.audio)
        portrait = open_portrait(task.portrait, task.preset.height, task.workdir)
    except MediaError as exc:
        raise BadInputError(exc.reason, exc.hint) from None
    edges = task.options.get(FACE_BOX)
    every = 0 if edges else detect_every
    first = _given_face(portrait, edges) if edges else _first_face(portrait, every)
    if first is None:
        raise BadInputError(f"no face found in {task.portrait.name}", hint=_NO_FACE_HINT)
    progress(0.0)
    # Frame count follows the audio, so the video ends within one frame of the speech.
    count = max(1, round(len(mono) / _RATE * fps))
    openness = mouth_openness(mono, count, fps, mouth_gain)
    width, height = portrait.size
    with Mp4Writer(
        task.output, width, height, fps, task.preset.video_bitrate, clip, task.preset.audio_bitrate,
        task.x264_preset, codec=pick_encoder(task.preset.codec, "auto", task.device),
    ) as writer:
        if portrait.count == 1:
            frames = _still_frames(portrait, first, openness)
        else:
            frames = _video_frames(portrait, first, openness, fps, every)
        step = max(1, count // _PROGRESS_STEPS)
        for i, frame in enumerate(frames):
            writer.write(frame)
            if i % step == 0:
                progress(i / count)
    progress(1.0)
    return task.output
