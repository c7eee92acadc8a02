"""The offline default: Debian's espeak-ng reads the script (no model files; robotic, but any machine has it)."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path
from typing import Any, ClassVar

from pydantic import Field

from heygem_daemon.engines.base import EngineError, EngineSettings, Reporter, SetupError

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
        script = out.with_name(out.name + ".txt")  # a file, not argv: long scripts, no option injection
        script.write_text(text, encoding="utf-8")
        argv = [s.binary, "-v", s.voice, "-s", str(s.words_per_minute), "-p", str(s.pitch), "-w", str(out),
                "-f", str(script)]
        try:
            proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        except FileNotFoundError:
            raise SetupError(f"speech engine espeak: {s.binary} is not installed", INSTALL) from None
        try:
            _wait(proc, progress)
            err = proc.stderr.read() if proc.stderr else ""
        finally:
            script.unlink(missing_ok=True)
        if "voice does not exist" in err:
            raise SetupError(f"speech engine espeak: there is no espeak-ng voice {s.voice!r}",
                             "set speech.engines.espeak.voice to one `espeak-ng --voices` lists")
        if proc.returncode != 0 or not out.is_file() or out.stat().st_size <= 44:
            raise EngineError(f"espeak-ng failed (exit {proc.returncode}): {err.strip()[-300:]}",
                              "see the message; the task is tried again")

    @classmethod
    def doctor(cls, settings: EspeakSettings) -> list[Any]:
        from heygem_daemon.ops.checks import Check

        found = shutil.which(settings.binary)
        if found is None:
            return [Check("speech espeak", False, f"{settings.binary} not found", INSTALL)]
        return [Check("speech espeak", True, f"{found}, voice {settings.voice}")]


def _wait(proc: subprocess.Popen[str], progress: Reporter) -> None:
    started = time.monotonic()
    while proc.poll() is None:
        progress.heartbeat()
        if time.monotonic() - started > _TIMEOUT_SECONDS:
            proc.kill()
            proc.wait()
            raise EngineError(f"espeak-ng did not finish in {_TIMEOUT_SECONDS:g} s", "the task is tried again")
        time.sleep(0.05)
