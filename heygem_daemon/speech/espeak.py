"""The offline default: Debian's espeak-ng reads the script (no model files; robotic, but any machine has it)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, ClassVar

from pydantic import Field

from heygem_daemon.engines.base import EngineError, EngineSettings, Reporter, SetupError
from heygem_daemon.engines.command import judge_exit
from heygem_daemon.speech.base import check_speech
from heygem_daemon.speech.command import speak_with

INSTALL = "install it (Debian/Ubuntu: apt-get install espeak-ng), or set speech.engine to another speech engine"
_TIMEOUT_SECONDS = 600.0


class EspeakSettings(EngineSettings):
    binary: str = Field("espeak-ng", description="the program, on PATH or as a full path")
    voice: str = Field("en", description="an espeak-ng voice (espeak-ng --voices): en, en-us, de, zh, ...")
    words_per_minute: int = Field(160, ge=80, le=450)
    pitch: int = Field(50, ge=0, le=99)


class EspeakEngine:
    name: ClassVar[str] = "espeak"
    Settings = EspeakSettings

    def __init__(self, settings: EspeakSettings) -> None:
        self.settings = settings

    def voice(self) -> dict[str, Any]:
        s = self.settings
        return {"voice": s.voice, "wpm": s.words_per_minute, "pitch": s.pitch}

    def synthesise(self, text: str, out: Path, progress: Reporter) -> None:
        s = self.settings
        # The text goes in a file, not argv: long scripts, and no text is ever taken for an option.
        argv = [s.binary, "-v", s.voice, "-s", str(s.words_per_minute), "-p", str(s.pitch), "-w", "{output}",
                "-f", "{text_file}"]
        try:
            code, tail = speak_with("espeak-ng", argv, text, out, progress, {}, None, _TIMEOUT_SECONDS,
                                    "speech.engines.espeak")
        except SetupError:
            raise SetupError(f"speech engine espeak: {s.binary} is not installed", INSTALL) from None
        if any("voice does not exist" in line for line in tail):
            raise SetupError(f"speech engine espeak: there is no espeak-ng voice {s.voice!r}",
                             "pick one `espeak-ng --voices` lists (job.yaml speech: voice:, or "
                             "speech.engines.espeak.voice), then retry the job")
        judge_exit("espeak-ng", code, tail, [])
        if not out.is_file():
            raise EngineError("espeak-ng exited 0 but wrote no audio", "the task is tried again")
        check_speech(out, "espeak-ng")

    @classmethod
    def doctor(cls, settings: EspeakSettings) -> list[Any]:
        from heygem_daemon.ops.checks import Check

        found = shutil.which(settings.binary)
        if found is None:
            return [Check("speech espeak", False, f"{settings.binary} not found", INSTALL)]
        return [Check("speech espeak", True, f"{found}, voice {settings.voice}")]
