"""Benchmark the preview engine: 20 s of synthesised speech at 480p, from a still and from a video portrait.

Prints frames/s, the realtime factor (seconds of output per second of wall time) and the share of wall
time spent in the encoder, measured two ways in the same run: timing Mp4Writer.write/close directly,
and comparing with the same frame loop writing nowhere.

    .venv/bin/python bench/preview.py
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType
from unittest import mock

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # media_factory lives with the tests

from heygem_daemon.config import DEFAULT_PRESETS  # noqa: E402
from heygem_daemon.engines import preview, preview_render  # noqa: E402
from heygem_daemon.engines.base import TaskSpec  # noqa: E402
from heygem_daemon.media.writer import Mp4Writer  # noqa: E402
from media_factory import PORTRAIT_JPG, video_facts, write_portrait_video, write_speech_wav  # noqa: E402

SECONDS = 20.0
PRESET = DEFAULT_PRESETS["480p"]


class TimedWriter(Mp4Writer):
    """Mp4Writer that adds the time spent encoding and muxing to `spent`."""

    spent = 0.0

    def write(self, bgr: np.ndarray) -> None:
        start = time.perf_counter()
        super().write(bgr)
        TimedWriter.spent += time.perf_counter() - start

    def close(self) -> None:
        start = time.perf_counter()
        super().close()
        TimedWriter.spent += time.perf_counter() - start


class NullWriter:
    """Takes the frames and writes nowhere: the engine's own cost."""

    def __init__(self, *_args: object, **_kwargs: object) -> None:
        pass

    def __enter__(self) -> NullWriter:
        return self

    def __exit__(self, *_exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        pass

    def write(self, bgr: np.ndarray) -> None:
        pass


def _run(task: TaskSpec, writer: type) -> float:
    with mock.patch.object(preview_render, "Mp4Writer", writer):
        start = time.perf_counter()
        preview.PreviewEngine(preview.PreviewEngine.Settings()).generate(task, lambda _f: None)
        return time.perf_counter() - start


def bench(label: str, audio: Path, portrait: Path, tmp: Path) -> None:
    work = tmp / f"work-{label}"
    work.mkdir()
    task = TaskSpec(1, "bench", label, audio, portrait, tmp / f"{label}.mp4.part", work, PRESET)
    TimedWriter.spent = 0.0
    wall = _run(task, TimedWriter)
    encoder = TimedWriter.spent
    loop_only = _run(task, NullWriter)
    facts = video_facts(task.output)
    print(
        f"{label:<6} {facts.width}x{facts.height} {facts.frames} frames  {wall:6.2f} s  "
        f"{facts.frames / wall:6.1f} frames/s  {facts.video_duration / wall:5.1f}x realtime  "
        f"encoder {encoder / wall:4.0%} timed, {(wall - loop_only) / wall:4.0%} by difference "
        f"(frame loop alone {loop_only:.2f} s)"
    )


def main() -> None:
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        audio = write_speech_wav(tmp / "speech.wav", SECONDS)
        video = write_portrait_video(tmp / "portrait.mp4", 4.0)
        print(f"preview engine, {SECONDS:g} s speech, preset 480p ({PRESET.fps} fps, {PRESET.video_bitrate} b/s)")
        bench("still", audio, PORTRAIT_JPG, tmp)
        bench("video", audio, video, tmp)


if __name__ == "__main__":
    main()
