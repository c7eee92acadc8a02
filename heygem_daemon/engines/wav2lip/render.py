"""One Wav2Lip generation, as concurrent stages with bounded queues:

    face crops + mel chunks (batches) -> model -> paste back into the frame + H.264/AAC encode

Frames stream from the portrait (a still, or a memory-mapped spool of a video) straight into the
final MP4: nothing holds the whole video, so an hour of audio needs no more memory than a minute.
Outside the face box every pixel is the portrait's own.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np

from heygem_daemon.engines.base import BadInputError, ProgressFn, TaskSpec
from heygem_daemon.engines.wav2lip.audio_features import (
    HOP_LENGTH,
    SAMPLE_RATE,
    chunk_starts,
    chunks_at,
    melspectrogram_long,
)
from heygem_daemon.engines.wav2lip.boxes import BoxCache, detect_raw, finish_boxes
from heygem_daemon.engines.base import SetupError
from heygem_daemon.engines.wav2lip.face_batch import FACE_SIZE
from heygem_daemon.engines.wav2lip.stages import staged
from heygem_daemon.fs.files import sha256_file
from heygem_daemon.intake.pairing import FACE_BOX
from heygem_daemon.log import get_logger
from heygem_daemon.media.audio import load_clip, load_mono
from heygem_daemon.media.errors import MediaError
from heygem_daemon.media.face_spec import FaceEdges, scaled_edges
from heygem_daemon.media.frames import PortraitFrames, open_portrait
from heygem_daemon.media.writer import NVENC, EncoderMode, Mp4Writer, encoder_usable, pick_encoder

if TYPE_CHECKING:
    from heygem_daemon.engines.wav2lip.engine import Wav2LipEngine

log = get_logger("heygem.wav2lip")
NO_FACE_HINT = "use a front-facing photo or video where the face is clearly visible and not too small"
_PROGRESS_STEPS = 50
_QUEUE_DEPTH = 2  # batches waiting between stages: enough to hide jitter, small enough to bound memory


def frame_starts(samples: int, fps: int) -> np.ndarray:
    """The mel chunk start of every output frame.

    The reference's chunks stop up to 0.2 s before the audio ends; its last chunk is repeated until
    the video covers the whole audio, so the end of the speech is never cut off."""
    starts = chunk_starts(1 + samples // HOP_LENGTH, fps)
    wanted = round(samples / SAMPLE_RATE * fps)
    if wanted > len(starts):
        starts = np.concatenate([starts, np.full(wanted - len(starts), starts[-1])])
    return starts


def box_cache_dir(task: TaskSpec) -> Path:
    # task.workdir is <work>/<job-id>/task-<n>; the cache outlives jobs, so it sits beside them.
    return task.workdir.parent.parent / ".cache" / "wav2lip-boxes"


def given_boxes(portrait: PortraitFrames, needed: int, edges: FaceEdges) -> np.ndarray:
    """job.yaml's face_box on every frame, as the reference's `--box`: no detection, no pads, no smoothing.
    It is given in the portrait's own pixels; the frames here are scaled to the preset."""
    top, bottom, left, right = scaled_edges(edges, portrait.source_size, portrait.size)
    return np.tile(np.array([left, top, right, bottom], dtype=np.int32), (needed, 1))


def face_boxes(portrait: PortraitFrames, needed: int, task: TaskSpec, settings: Wav2LipEngine.Settings,
               beat: ProgressFn) -> np.ndarray:
    """(x1, y1, x2, y2) per source frame 0..needed-1; BadInputError when no frame shows a face."""
    if task.options.get(FACE_BOX) is not None:
        return given_boxes(portrait, needed, tuple(task.options[FACE_BOX]))  # type: ignore[arg-type]
    if portrait.count == 1:
        raw = detect_raw(portrait.frame, 0, 1)
    else:
        width, height = portrait.size
        key = f"{sha256_file(task.portrait)[:32]}-{settings.detector}-{width}x{height}"
        cache = BoxCache(box_cache_dir(task), settings.box_cache_days)
        cached = cache.load(key)
        have = 0 if cached is None else len(cached)
        if have >= needed:
            log.info("face boxes from cache", portrait=task.portrait.name, frames=needed, key=key)
            raw = cached
        else:
            fresh = detect_raw(portrait.frame, have, needed, lambda: beat(0.0))
            raw = fresh if cached is None else np.concatenate([cached, fresh])
            cache.save(key, raw)
            log.info("face boxes detected", portrait=task.portrait.name, frames=needed - have,
                     from_cache=have, key=key)
    boxes = finish_boxes(raw[:needed], portrait.size, settings.pads, settings.smooth_frames)
    if boxes is None:
        raise BadInputError(f"no face found in {task.portrait.name}", hint=NO_FACE_HINT)
    return boxes


def encoder_for(codec: str, setting: EncoderMode, device: str) -> str:
    """The preset's codec with the configured encoder; NVENC asked for but unusable is a set-up error."""
    if setting == "nvenc" and not encoder_usable(NVENC[codec]):
        raise SetupError(f"{NVENC[codec]} cannot be opened here (no NVIDIA GPU/driver, or FFmpeg built without it)",
                         hint="set engines.wav2lip.encoder to auto or software")
    return pick_encoder(codec, setting, device)


def _crop(frame: np.ndarray, box: np.ndarray) -> np.ndarray:
    x1, y1, x2, y2 = box
    return cv2.resize(frame[y1:y2, x1:x2], (FACE_SIZE, FACE_SIZE))


def render(engine: Wav2LipEngine, task: TaskSpec, progress: ProgressFn) -> Path:
    settings = engine.settings
    fps = task.preset.fps
    try:
        mono = load_mono(task.audio, SAMPLE_RATE)
        clip = load_clip(task.audio)
        portrait = open_portrait(task.portrait, max(2, task.preset.height // settings.resize_factor), task.workdir)
    except MediaError as exc:
        raise BadInputError(exc.reason, exc.hint) from None
    progress(0.0)
    starts = frame_starts(len(mono), fps)
    sources = np.fromiter((portrait.index_for_output(i, fps) for i in range(len(starts))), np.int64, len(starts))
    # Inputs are checked before the model loads, so a bad drop fails in seconds.
    boxes = face_boxes(portrait, int(sources.max()) + 1, task, settings, progress)
    codec = encoder_for(task.preset.codec, settings.encoder, task.device)
    predictor = engine.predictor(task.device)
    mel = melspectrogram_long(mono, predictor.device)
    size = predictor.batch_size
    still = _crop(portrait.frame(0), boxes[0]) if portrait.count == 1 else None

    def batches() -> Iterator[tuple[np.ndarray, Any, Any]]:
        for first in range(0, len(starts), size):
            picked = sources[first : first + size]
            crops = (np.broadcast_to(still, (len(picked), *still.shape)) if still is not None
                     else np.stack([_crop(portrait.frame(k), boxes[k]) for k in picked]))
            yield picked, predictor.pin(crops), chunks_at(mel, starts[first : first + size])

    def infer(batch: tuple[np.ndarray, Any, Any]) -> tuple[np.ndarray, np.ndarray]:
        picked, crops, mels = batch
        return picked, predictor(crops, mels)

    width, height = portrait.size
    canvas = np.array(portrait.frame(0))
    done, step = 0, max(1, len(starts) // _PROGRESS_STEPS)
    with Mp4Writer(task.output, width, height, fps, task.preset.video_bitrate, clip, task.preset.audio_bitrate,
                   task.x264_preset, codec=codec) as writer:
        for picked, mouths in staged(batches(), [infer], depth=_QUEUE_DEPTH, name=f"wav2lip-{task.task_id}"):
            for k, mouth in zip(picked, mouths):
                # A still's canvas is reused: every frame overwrites the same box, and the writer
                # converts the frame before returning.
                frame = canvas if still is not None else np.array(portrait.frame(k))
                x1, y1, x2, y2 = boxes[k]
                frame[y1:y2, x1:x2] = cv2.resize(mouth, (int(x2 - x1), int(y2 - y1)))
                writer.write(frame)
                done += 1
                if done % step == 0:
                    progress(done / len(starts))
    log.info("wav2lip video written", frames=len(starts), device=str(predictor.device), encoder=codec,
             batch=predictor.batch_size, half=str(predictor.half))
    progress(1.0)
    return task.output
