"""`engine.name: wav2lip`: lip-sync with a released Wav2Lip checkpoint, batched and pipelined on one device.

This module stays free of torch (the daemon imports it for the settings and `needs_face`); the torch
parts load in the worker process on the first task.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Literal

from pydantic import Field, field_validator

from heygem_daemon.engines.base import EngineSettings, ProgressFn, SetupError, TaskSpec

if TYPE_CHECKING:
    from heygem_daemon.ops.checks import Check
    from heygem_daemon.engines.wav2lip.runtime import Predictor

CHECKPOINT_KEY = "engines.wav2lip.checkpoint"


class Wav2LipEngine:
    name: ClassVar[str] = "wav2lip"
    needs_face: ClassVar[bool] = True

    class Settings(EngineSettings):
        checkpoint: Path | None = Field(None, description="absolute path of wav2lip.pth or wav2lip_gan.pth")
        detector: Literal["haar"] = Field("haar", description="face detector (OpenCV's Haar cascade, no download)")
        pads: tuple[int, int, int, int] = Field(
            (0, 10, 0, 0), description="pixels added to the face box: top, bottom, left, right")
        smooth_frames: int = Field(5, ge=1, description="moving mean of face boxes over N video frames (1 = off)")
        batch_size: int | None = Field(None, ge=1, le=4096,
                                       description="faces per model call; None: 128 on CUDA, 32 on CPU")
        fp16: bool | None = Field(None, description="half precision; None: on for CUDA (float16), off for CPU")
        resize_factor: int = Field(1, ge=1, le=8, description="work and write at 1/N of the preset height")
        encoder: Literal["auto", "software", "nvenc"] = Field(
            "auto", description="auto: NVENC on a CUDA device where it opens; the codec comes from the preset")
        channels_last: bool = Field(True, description="NHWC tensors: faster convolutions on GPU and CPU")
        box_cache_days: float = Field(7.0, ge=0.0, description="face boxes of portrait videos kept this long unused")

        @field_validator("encoder", mode="before")
        @classmethod
        def _old_names(cls, v: object) -> object:
            # Configs written when every preset was H.264 name the encoder itself.
            return {"libx264": "software", "h264_nvenc": "nvenc"}.get(v, v) if isinstance(v, str) else v

        @field_validator("checkpoint")
        @classmethod
        def _absolute(cls, v: Path | None) -> Path | None:
            if v is None:
                return None
            v = v.expanduser()
            if not v.is_absolute():
                # Workers do not run in the config's folder; a relative path would point somewhere else.
                raise ValueError(f"must be an absolute path (got {str(v)!r}), e.g. /srv/heygem/models/wav2lip_gan.pth")
            return v

    def __init__(self, settings: Wav2LipEngine.Settings) -> None:
        self.settings = settings
        self._predictor: Predictor | None = None
        self._loaded: tuple[str, Path, int, int] | None = None

    def predictor(self, device: str) -> Predictor:
        """The model for `device`, loaded once per worker and again only when the checkpoint file changes."""
        from heygem_daemon.engines.wav2lip.checkpoint import CheckpointError
        from heygem_daemon.engines.wav2lip.runtime import Predictor

        path = self.settings.checkpoint
        if path is None:
            raise SetupError(f"no Wav2Lip checkpoint configured: set {CHECKPOINT_KEY}",
                             hint=f"put wav2lip_gan.pth (or wav2lip.pth) on this machine and set {CHECKPOINT_KEY} "
                                  "to its absolute path, then `heygem-daemon retry JOB`")
        try:
            stat = os.stat(path)
            key = (device, path, stat.st_mtime_ns, stat.st_size)
        except OSError:
            key = None  # load_checkpoint names the problem
        if self._predictor is None or key is None or key != self._loaded:
            self._predictor = None  # free the old model before the new one takes memory
            try:
                self._predictor = Predictor.load(path, device, self.settings.fp16, self.settings.channels_last,
                                                 self.settings.batch_size)
            except CheckpointError as exc:
                raise SetupError(str(exc), hint=f"fix {CHECKPOINT_KEY} or the file, then `heygem-daemon retry JOB` "
                                               "(no restart needed)") from None
            self._loaded = key
        return self._predictor

    def generate(self, task: TaskSpec, progress: ProgressFn) -> Path:
        from heygem_daemon.engines.wav2lip.render import render

        return render(self, task, progress)

    @classmethod
    def doctor(cls, settings: Wav2LipEngine.Settings, devices: list[str]) -> list[Check]:
        from heygem_daemon.engines.wav2lip.doctor import doctor

        return doctor(settings, devices)
