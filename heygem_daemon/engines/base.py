"""The one small interface every engine implements, and the errors it may raise."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Protocol

from pydantic import BaseModel, ConfigDict

from heygem_daemon.config import Preset

ProgressFn = Callable[[float], None]
"""Called with the fraction done (0..1). Calling it is also the engine's heartbeat for stall detection."""


@dataclass(frozen=True)
class TaskSpec:
    """Everything one generation needs: a pure function of this, so it could run on another host."""

    task_id: int
    job_id: str
    name: str
    audio: Path
    portrait: Path
    output: Path
    """Where the engine writes the finished MP4 (a `.part` name; the worker renames it when done)."""
    workdir: Path
    """Scratch folder owned by this task; removed by the daemon afterwards."""
    preset: Preset
    device: str = "cpu"
    x264_preset: str = "veryfast"
    options: dict[str, Any] = field(default_factory=dict)


class EngineError(Exception):
    """Generation failed in a way that may succeed on another attempt (crash, service down)."""

    retryable: ClassVar[bool] = True

    def __init__(self, reason: str, hint: str = "") -> None:
        super().__init__(reason)
        self.reason = reason
        self.hint = hint


class BadInputError(EngineError):
    """The inputs themselves are unusable (no face, undecodable): retrying cannot help."""

    retryable: ClassVar[bool] = False


class EngineSettings(BaseModel):
    """Base for each engine's own settings section (`engines.<name>` in config.yaml)."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class Engine(Protocol):
    name: ClassVar[str]
    needs_face: ClassVar[bool]

    def generate(self, task: TaskSpec, progress: ProgressFn) -> Path:
        """Write an MP4 (H.264 + AAC) to task.output and return that path."""
        ...

    # Optional, for `heygem-daemon doctor` (runs in the CLI process, so heavy imports are fine there):
    #   @classmethod
    #   def doctor(cls, settings: Settings, devices: list[str]) -> list[heygem_daemon.checks.Check]
