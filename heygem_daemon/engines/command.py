"""The `command` engine: runs any lip-sync tool that has a command line (SadTalker, MuseTalk, LatentSync...).

The command is an argument list, never a shell string, and file names are only ever substituted into
whole arguments, so a name like `$(touch x).wav` is just a name. Output lines are the heartbeat and,
with a regex, the progress; their tail becomes the failure's detail."""

from __future__ import annotations

import functools
import os
import re
import selectors
import shutil
import signal
import string
import subprocess
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import ClassVar

from pydantic import Field, field_validator

from heygem_daemon.ops.checks import Check
from heygem_daemon.config import ENV_PREFIX
from heygem_daemon.engines.base import BadInputError, EngineError, EngineSettings, ProgressFn, TaskSpec
from heygem_daemon.fs.ops import move
from heygem_daemon.media.errors import MediaError
from heygem_daemon.proc import die_with_parent

PLACEHOLDERS = ("audio", "portrait", "output", "workdir", "fps", "height", "device")
OUTPUT_NAME = "output.mp4"
_TAIL_LINES = 30
_LINE_CHARS = 400
_READ_BYTES = 65536
_BEAT_SECONDS = 0.5
_LINE_BREAK = re.compile(rb"[\r\n]")


def _fields(arg: str) -> list[tuple[str, str | None, str | None]]:
    return [(name, spec, conv) for _, name, spec, conv in string.Formatter().parse(arg) if name is not None]


def check_template(arg: str, placeholders: tuple[str, ...] = PLACEHOLDERS) -> str:
    """One argument of an argv template: only known `{placeholders}`, written plainly."""
    try:
        fields = _fields(arg)
    except ValueError as exc:
        raise ValueError(f"{arg!r}: {exc}; write a literal brace as {{{{ or }}}}") from None
    for name, spec, conv in fields:
        if name not in placeholders:
            known = ", ".join(f"{{{p}}}" for p in placeholders)
            raise ValueError(f"{arg!r}: unknown placeholder {{{name}}}; use {known}")
        if spec or conv:
            raise ValueError(f"{arg!r}: write placeholders plainly as {{{name}}}, without formatting")
    return arg


class CommandEngine:
    name: ClassVar[str] = "command"
    needs_face: ClassVar[bool] = False
    """Overridden per configuration by Settings.needs_face."""

    class Settings(EngineSettings):
        args: list[str] = Field(min_length=1, description="argument list template; args[0] is the program")
        env: dict[str, str] = Field(default_factory=dict, description="extra environment variables")
        timeout: float = Field(3600.0, gt=0.0, description="seconds before the whole process group is killed")
        bad_input_exit_codes: list[int] = Field(default_factory=list, description="exit codes that mean: bad input")
        progress_regex: str | None = Field(None, description="first group (or the match) is a percentage")
        cwd: Path | None = None
        needs_face: bool = False

        @field_validator("args")
        @classmethod
        def _templates(cls, args: list[str]) -> list[str]:
            return [check_template(a) for a in args]

        @field_validator("progress_regex")
        @classmethod
        def _regex(cls, pattern: str | None) -> str | None:
            if pattern is not None:
                try:
                    re.compile(pattern)
                except re.error as exc:
                    raise ValueError(f"not a valid regular expression ({exc})") from None
            return pattern

    def __init__(self, settings: CommandEngine.Settings) -> None:
        self.settings = settings
        self.program = Path(settings.args[0]).name
        self.regex = re.compile(settings.progress_regex) if settings.progress_regex else None
        self.names_output = any(f[0] == "output" for arg in settings.args for f in _fields(arg))

    def generate(self, task: TaskSpec, progress: ProgressFn) -> Path:
        made = task.workdir / OUTPUT_NAME
        made.unlink(missing_ok=True)
        values = {"audio": task.audio, "portrait": task.portrait, "output": made, "workdir": task.workdir,
                  "fps": task.preset.fps, "height": task.preset.height, "device": task.device}
        argv = [arg.format_map({k: str(v) for k, v in values.items()}) for arg in self.settings.args]
        progress(0.0)
        output = ToolOutput(self.regex, progress)
        code = self._run(argv, output)
        tail = output.tail
        self._judge(code, tail)
        if not self.names_output:
            made = self._found_output(task.workdir, tail)
        # In the worker only: the check loads OpenCV and numpy, which the daemon (reading the settings) does not need.
        from heygem_daemon.media.verify import require_playable

        try:
            require_playable(made)
        except MediaError as exc:
            raise EngineError(f"{self.program} exited 0 but its output is unusable: {exc.reason}",
                              detail(exc.hint, tail)) from None
        task.output.unlink(missing_ok=True)
        move(made, task.output)
        progress(1.0)
        return task.output

    def _run(self, argv: list[str], output: ToolOutput) -> int:
        try:
            return run_tool(argv, self.settings.env, self.settings.cwd, self.settings.timeout, output,
                            "engines.command")
        except OSError as exc:
            raise EngineError(f"cannot start {self.program}: {exc.strerror or exc}",
                              "check engines.command.args[0] (`heygem-daemon doctor`)") from None

    def _found_output(self, workdir: Path, tail: deque[str]) -> Path:
        """Tools that choose their own file name (SadTalker...) are given {workdir}: take their newest MP4."""
        made = sorted(workdir.rglob("*.mp4"), key=lambda p: p.stat().st_mtime)
        if not made:
            raise EngineError(f"{self.program} exited 0 but wrote no MP4 under its work folder",
                              detail("pass {output} or {workdir} so the tool writes its video there", tail))
        return made[-1]

    def _judge(self, code: int, tail: deque[str]) -> None:
        judge_exit(self.program, code, tail, self.settings.bad_input_exit_codes)

    @classmethod
    def doctor(cls, settings: CommandEngine.Settings, devices: list[str]) -> list[Check]:
        program = settings.args[0]
        found = shutil.which(program)
        if found is None:
            return [Check("command program", False, f"{program} is not an executable file nor on PATH",
                          "install the tool or give its absolute path as engines.command.args[0]")]
        return [Check("command program", True, f"{found} is executable")]


class ToolOutput:
    """Takes the tool's output lines: keeps the tail, and feeds the worker's progress callback (every line
    is a heartbeat, throttled; with a regex, also the value)."""

    def __init__(self, regex: re.Pattern[str] | None, progress: ProgressFn) -> None:
        self.regex, self.progress = regex, progress
        self.value, self.sent_at = 0.0, 0.0
        self.tail: deque[str] = deque(maxlen=_TAIL_LINES)

    def __call__(self, line: str) -> None:
        self.tail.append(line[:_LINE_CHARS])
        match = self.regex.search(line) if self.regex else None
        value = self.value
        if match:
            try:
                value = min(0.99, max(0.0, float(match.group(1) if match.groups() else match.group(0)) / 100))
            except ValueError:
                pass
        now = time.monotonic()
        if value != self.value or now - self.sent_at >= _BEAT_SECONDS:
            self.value, self.sent_at = value, now
            self.progress(value)


def judge_exit(program: str, code: int, tail: deque[str], bad_input_exit_codes: list[int]) -> None:
    """A tool's exit code as an engine error of its kind (none for 0)."""
    last = tail[-1] if tail else "no output"
    if code in bad_input_exit_codes:
        raise BadInputError(f"{program} refused the inputs (exit code {code}): {last}",
                            detail("fix the inputs as the tool's message says; a retry cannot help", tail))
    if code < 0:
        raise EngineError(f"{program} was killed by signal {signal.Signals(-code).name}: {last}",
                          detail("the task will be retried", tail))
    if code:
        raise EngineError(f"{program} failed (exit code {code}): {last}",
                          detail("the task will be retried", tail))


def run_tool(argv: list[str], extra_env: dict[str, str], cwd: Path | None, timeout: float, output: ToolOutput,
             section: str) -> int:
    """Run a tool in its own process group, its output lines to `output`; its exit code. OSError when it
    cannot start; EngineError past `timeout` (`section`: the config section that sets it, for the hint)."""
    # The tool gets no secrets meant for the daemon (HEYGEM_* overrides may hold S3 keys).
    env = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)} | extra_env
    proc = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        cwd=cwd, env=env, start_new_session=True,
        # If the worker is killed (stall, daemon gone), the tool must not keep running.
        preexec_fn=functools.partial(die_with_parent, os.getpid()))
    deadline = time.monotonic() + timeout
    try:
        _pump(proc, deadline, output)
        proc.wait(max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        raise EngineError(f"{Path(argv[0]).name} ran past the timeout of {timeout:g} s and was killed",
                          detail(f"raise {section}.timeout if it was still working", output.tail)) from None
    finally:
        _kill_group(proc)
    return proc.returncode


def _pump(proc: subprocess.Popen[bytes], deadline: float, on_line: Callable[[str], None]) -> None:
    """Read the merged stdout/stderr until EOF, split at \\r or \\n; TimeoutExpired at the deadline."""
    assert proc.stdout is not None
    fd, pending = proc.stdout.fileno(), b""
    with selectors.DefaultSelector() as sel:
        sel.register(fd, selectors.EVENT_READ)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise subprocess.TimeoutExpired(proc.args, 0)
            if not sel.select(min(left, 1.0)):
                continue
            chunk = os.read(fd, _READ_BYTES)
            if not chunk:
                break
            *lines, pending = _LINE_BREAK.split(pending + chunk)
            for raw in lines:
                if raw.strip():
                    on_line(raw.decode("utf-8", "replace").rstrip())
    if pending.strip():
        on_line(pending.decode("utf-8", "replace").rstrip())
    proc.stdout.close()


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    """The tool runs in its own session: its helpers go with it, whether it ended or hung."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    if proc.poll() is None:
        proc.wait()
    if proc.stdout and not proc.stdout.closed:
        proc.stdout.close()


def detail(hint: str, tail: deque[str]) -> str:
    """The hint's first line is shown to people; the output tail rides along as detail for error.json."""
    return hint + ("\noutput (last lines):\n" + "\n".join(tail) if tail else "")
