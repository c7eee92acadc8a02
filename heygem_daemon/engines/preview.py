"""The weight-free default engine: the portrait's mouth opens and closes with the loudness of the speech.

Not real lip-sync, but it runs anywhere, needs no model files, and exercises the whole production line
(decode, face finding, timing, encode, mux) with output a person recognises as a talking face.

This module stays free of OpenCV and numpy (the daemon imports it for the settings and `needs_face`); the
drawing is in `preview_render`, which the worker process loads on its first task.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from pydantic import Field

from heygem_daemon.engines.base import EngineSettings, ProgressFn, TaskSpec
from heygem_daemon.ops.checks import Check


class PreviewEngine:
    name: ClassVar[str] = "preview"
    needs_face: ClassVar[bool] = True

    class Settings(EngineSettings):
        mouth_gain: float = Field(
            1.0, gt=0.0, le=4.0, description="above 1 the mouth opens wide on quieter speech"
        )
        detect_every: int = Field(5, ge=1, description="video portraits: re-detect the face every N frames")

    def __init__(self, settings: PreviewEngine.Settings) -> None:
        self.settings = settings

    @classmethod
    def doctor(cls, settings: PreviewEngine.Settings, devices: list[str]) -> list[Check]:
        """`heygem-daemon doctor`: the face detector must load; the engine draws on the CPU anyway."""
        import cv2
        import numpy as np

        from heygem_daemon.media.faces import detect_face

        try:
            detect_face(np.zeros((64, 64, 3), dtype=np.uint8))
        except RuntimeError as exc:
            return [Check("engine preview: face detector", False, str(exc),
                          "pip install --force-reinstall 'opencv-python-headless<5'")]
        gpus = [d for d in devices if d != "cpu"]
        note = f"; runs on the CPU even for {', '.join(gpus)}" if gpus else ""
        return [Check("engine preview: face detector", True, f"OpenCV {cv2.__version__} Haar cascade{note}")]

    def generate(self, task: TaskSpec, progress: ProgressFn) -> Path:
        from heygem_daemon.engines.preview_render import render

        return render(task, progress, self.settings.mouth_gain, self.settings.detect_every)
