"""The one small interface every engine implements, and the errors it may raise."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol

from pydantic import BaseModel, ConfigDict

from heygem_daemon.config import Preset
from heygem_daemon.failures import Kind



class Reporter(Protocol):
    """What an engine tells the worker while it runs. Stalled means no heartbeat for
    `workers.stall_seconds`: progress may stand still for an hour (a service rendering at 20 %) as long
    as the engine keeps saying it is alive."""

    def __call__(self, fraction: float) -> None:
        """Fraction done (0..1), shown in `status`; also counts as a heartbeat."""

    def heartbeat(self) -> None:
        """Still working (or waiting on something that answers), without new progress."""


ProgressFn = Reporter


@dataclass(frozen=True)
class SpeechSpec:
    """A task whose sound is a script: which speech engine reads it out first (heygem_daemon/speech/step.py)."""

    engine: str
    settings: dict[str, Any]
    cache: Path
    """Where spoken scripts are kept by (text, voice, engine): work/.speech-cache/."""
    max_chars: int
    part_chars: int = 300
    """A script is spoken sentence by sentence, a longer sentence in parts of at most this many characters."""
    pause_seconds: float = 0.3


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
    store: Path | None = None
    """The daemon's store (SQLite file), for what must outlive an attempt that is cut short (heygem: the
    codes a service may still hold, so a sweep can clean up after a cancel or a crash)."""
    speech: SpeechSpec | None = None
    """Set when `audio` is a script: the worker makes the audio before the engine sees the task."""


class EngineError(Exception):
    """Generation failed in a way that may succeed on another attempt: a counted attempt, with backoff."""

    kind: ClassVar[Kind] = Kind.ENGINE
    dependency: str = ""
    """What an outage waits for (a service URL); empty for other kinds."""

    def __init__(self, reason: str, hint: str = "") -> None:
        super().__init__(reason)
        self.reason = reason
        self.hint = hint



class BadInputError(EngineError):
    """The inputs themselves are unusable (no face, undecodable): retrying cannot help."""

    kind: ClassVar[Kind] = Kind.BAD_INPUT


class SetupError(EngineError):
    """The engine's own set-up (model file, encoder) is wrong. Every task would fail the same way until
    an operator fixes it, so retrying on a timer would only burn attempts: the task fails at once."""

    kind: ClassVar[Kind] = Kind.SETUP


class OutageError(EngineError):
    """Something the engine depends on is out (a service unreachable or restarting, a full disk): the
    task waits and is tried again without using an attempt."""

    kind: ClassVar[Kind] = Kind.OUTAGE

    def __init__(self, reason: str, hint: str = "", dependency: str = "") -> None:
        super().__init__(reason, hint)
        self.dependency = dependency


class EngineSettings(BaseModel):
    """Base for each engine's own settings section (`engines.<name>` in config.yaml)."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class Engine(Protocol):
    name: ClassVar[str]
    needs_face: ClassVar[bool]

    def generate(self, task: TaskSpec, progress: ProgressFn) -> Path:
        """Write an MP4 (H.264 + AAC) to task.output and return that path."""
        ...

    # Optional: `single_face: ClassVar[bool] = True` when the engine refuses a portrait showing several
    # people (intake then refuses it up front; see registry.needs_face).
    #
    # Optional, for `heygem-daemon status` and the daemon's alerts (heygem_daemon/dependencies.py):
    #   @classmethod
    #   def dependencies(cls, settings: Settings) -> list[heygem_daemon.generation.dependencies.Dependency]
    #
    # Optional, for `heygem-daemon doctor` (runs in the CLI process, so heavy imports are fine there):
    #   @classmethod
    #   def doctor(cls, settings: Settings, devices: list[str]) -> list[heygem_daemon.ops.checks.Check]
