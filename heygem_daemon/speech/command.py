"""The `command` speech engine: any command-line TTS (piper, edge-tts, a company's own) through an argument
list template, run as the `command` lip-sync engine runs its tool (own process group, no HEYGEM_* secrets,
a timeout, exit codes judged the same way)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

from pydantic import Field, field_validator

from heygem_daemon.engines.base import EngineError, EngineSettings, Reporter, SetupError
from heygem_daemon.engines.command import ToolOutput, check_template, judge_exit, run_tool
from heygem_daemon.speech.base import Heartbeats, check_speech

PLACEHOLDERS = ("text", "text_file", "output")


class CommandSpeechSettings(EngineSettings):
    args: list[str] = Field(min_length=1, description="argv template; {text}, {text_file} (UTF-8), {output} (a .wav)")
    env: dict[str, str] = Field(default_factory=dict)
    timeout: float = Field(600.0, gt=0.0)
    bad_input_exit_codes: list[int] = Field(default_factory=list,
                                            description="exit codes meaning: this text cannot work")
    cwd: Path | None = None

    @field_validator("args")
    @classmethod
    def _templates(cls, args: list[str]) -> list[str]:
        return [check_template(a, PLACEHOLDERS) for a in args]


class CommandSpeechEngine:
    name: ClassVar[str] = "command"
    Settings = CommandSpeechSettings

    def __init__(self, settings: CommandSpeechSettings) -> None:
        self.settings = settings
        self.program = Path(settings.args[0]).name

    def voice(self) -> dict[str, Any]:
        return {"args": self.settings.args, "env": self.settings.env}

    def synthesise(self, text: str, out: Path, progress: Reporter) -> None:
        s = self.settings
        code, tail = speak_with(self.program, s.args, text, out, progress, s.env, s.cwd, s.timeout,
                                "speech.engines.command")
        judge_exit(self.program, code, tail, s.bad_input_exit_codes)
        if not out.is_file():
            raise EngineError(f"{self.program} exited 0 but wrote no audio at {{output}}",
                              "pass {output} to the tool as the file to write (a .wav)")
        check_speech(out, self.program)


def speak_with(program: str, template: list[str], text: str, out: Path, progress: Reporter, env: dict[str, str],
               cwd: Path | None, timeout: float, section: str) -> tuple[int, Any]:
    """Run a TTS tool on `text` (also given as a UTF-8 file beside `out`); its exit code and output tail."""
    text_file = out.with_name(out.name + ".txt")
    text_file.write_text(text, encoding="utf-8")
    values = {"text": text, "text_file": str(text_file), "output": str(out)}
    output = ToolOutput(None, Heartbeats(progress))  # type: ignore[arg-type]
    try:
        code = run_tool([a.format_map(values) for a in template], env, cwd, timeout, output, section)
    except OSError as exc:
        raise SetupError(f"cannot start {program}: {exc.strerror or exc}",
                         f"install it or fix {section}.args[0] (`heygem-daemon doctor`)") from None
    finally:
        text_file.unlink(missing_ok=True)
    return code, output.tail
