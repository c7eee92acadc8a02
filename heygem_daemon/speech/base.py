"""The interface every speech engine implements. Failures are the lip-sync engines' errors
(engines/base.py), so a speech step fails, waits or is retried by the same rules as a render."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Protocol

from heygem_daemon.engines.base import Reporter


class SpeechEngine(Protocol):
    name: ClassVar[str]

    def voice(self) -> dict[str, Any]:
        """What shapes the sound (voice, speed, reference clip...): with the text and the engine's name,
        the key under which the audio is cached. Where and how long to ask (URLs, timeouts) are not in it."""
        ...

    def synthesise(self, text: str, out: Path, progress: Reporter) -> None:
        """Write `text`, spoken, as a WAV file at `out` (its folder exists; other files beside it are the
        cache's). Raise engines.base errors: BadInputError, SetupError, OutageError, EngineError."""
        ...

    # Optional, for `heygem-daemon doctor`:
    #   @classmethod
    #   def doctor(cls, settings: Settings) -> list[heygem_daemon.ops.checks.Check]


class Heartbeats:
    """A tool's output lines as heartbeats only (engines.command.ToolOutput's progress callback): speaking
    is the start of the render's attempt, whose progress the render engine reports."""

    def __init__(self, progress: Reporter) -> None:
        self.progress = progress

    def __call__(self, fraction: float) -> None:
        self.progress.heartbeat()

    def heartbeat(self) -> None:
        self.progress.heartbeat()


def check_speech(path: Path, who: str) -> None:
    """A speech engine's answer must be audio that decodes and lasts: else a counted, retried attempt."""
    from heygem_daemon.engines.base import EngineError
    from heygem_daemon.media.audio import load_clip
    from heygem_daemon.media.errors import MediaError

    try:
        seconds = load_clip(path).duration
    except MediaError as exc:
        raise EngineError(f"{who} gave audio that does not decode ({exc})", "the task is tried again") from None
    if seconds <= 0:
        raise EngineError(f"{who} gave empty audio", "the task is tried again")
