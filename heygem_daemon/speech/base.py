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
