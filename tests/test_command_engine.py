"""The `command` engine runs a real external program (tests/tools/fake_lipsync.py) on real media."""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import pytest

from heygem_daemon.config import DEFAULT_PRESETS, ConfigError, load_config
from heygem_daemon.engines.base import BadInputError, EngineError, TaskSpec
from heygem_daemon.engines.command import CommandEngine
from heygem_daemon.engines.registry import settings_for
from media_factory import PORTRAIT_JPG, video_facts, write_speech_wav

TOOL = Path(__file__).parent / "tools" / "fake_lipsync.py"
ARGS = [sys.executable, str(TOOL), "--audio", "{audio}", "--portrait", "{portrait}", "--output", "{output}",
        "--fps", "{fps}", "--height", "{height}"]
WEIRD = "it's \"quoted\" $(touch pwned) `touch pwned2`"


def running(pid: int) -> bool:
    """Alive and not a zombie (a killed orphan may wait a while for init to reap it)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def make_engine(tmp_path: Path, **overrides) -> CommandEngine:
    settings = {"args": ARGS, "timeout": 60, "bad_input_exit_codes": [3], "progress_regex": r"(\d+)%",
                "cwd": str(tmp_path), **overrides}
    return CommandEngine(CommandEngine.Settings.model_validate(settings))


def make_task(tmp_path: Path, audio_name: str = "voice.wav", portrait: Path = PORTRAIT_JPG) -> TaskSpec:
    inputs = tmp_path / "in"
    inputs.mkdir(exist_ok=True)
    audio = write_speech_wav(inputs / audio_name, 1.0)
    shutil.copy(portrait, inputs / portrait.name)
    workdir = tmp_path / "task"
    workdir.mkdir(exist_ok=True)
    return TaskSpec(task_id=1, job_id="j", name="out", audio=audio, portrait=inputs / portrait.name,
                    output=tmp_path / "out.mp4.part", workdir=workdir, preset=DEFAULT_PRESETS["480p"])


def test_the_tool_output_becomes_the_task_output_with_progress_from_its_percentages(tmp_path):
    seen: list[float] = []
    task = make_task(tmp_path)
    assert make_engine(tmp_path).generate(task, seen.append) == task.output
    facts = video_facts(task.output)
    assert facts.has_video and facts.has_audio and facts.height == 480
    assert abs(facts.video_duration - 1.0) <= 0.04
    assert any(0.2 < p < 0.99 for p in seen) and seen[-1] == 1.0


def test_a_tool_that_names_its_own_output_is_found_in_the_work_folder(tmp_path):
    args = [("{workdir}/result.mp4" if a == "{output}" else a) for a in ARGS]
    task = make_task(tmp_path)
    make_engine(tmp_path, args=args).generate(task, lambda _p: None)
    assert video_facts(task.output).has_audio and not (task.workdir / "result.mp4").exists()


def test_file_names_with_quotes_and_shell_syntax_are_passed_as_plain_arguments(tmp_path):
    task = make_task(tmp_path, audio_name=f"{WEIRD}.wav")
    make_engine(tmp_path).generate(task, lambda _p: None)
    assert video_facts(task.output).has_audio
    assert not list(tmp_path.rglob("pwned*")) and not Path("pwned").exists()


def test_a_crash_is_a_retryable_error_carrying_the_output_tail(tmp_path):
    with pytest.raises(EngineError) as err:
        make_engine(tmp_path).generate(make_task(tmp_path, "crash.wav"), lambda _p: None)
    assert err.value.kind.retried
    assert "exit code 1" in err.value.reason and "ZeroDivisionError" in err.value.reason
    assert "step 1 of 3 ok" in err.value.hint and "Traceback" in err.value.hint


def test_a_bad_input_exit_code_is_not_retried(tmp_path):
    with pytest.raises(BadInputError) as err:
        make_engine(tmp_path).generate(make_task(tmp_path, "badinput.wav"), lambda _p: None)
    assert not err.value.kind.retried
    assert "exit code 3" in err.value.reason and "no face detected in portrait.jpg" in err.value.reason


def test_a_tool_past_its_timeout_is_killed_with_its_whole_process_group(tmp_path):
    task = make_task(tmp_path, "hang.wav")
    with pytest.raises(EngineError) as err:
        make_engine(tmp_path, timeout=3).generate(task, lambda _p: None)
    assert err.value.kind.retried and "timeout of 3 s" in err.value.reason
    helper = int((task.workdir / "helper.pid").read_text())
    # SIGKILL is delivered at once, but the helper (not our child) dies when the kernel next runs it.
    deadline = time.monotonic() + 10
    while running(helper) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not running(helper)


def test_an_output_that_is_not_an_mp4_fails_the_attempt(tmp_path):
    task = make_task(tmp_path, "notmp4.wav")
    with pytest.raises(EngineError, match=r"output\.mp4 is not a(n| decodable) MP4"):
        make_engine(tmp_path).generate(task, lambda _p: None)
    assert not task.output.exists()


def test_an_mp4_without_sound_fails_the_attempt(tmp_path):
    with pytest.raises(EngineError, match="no decodable audio track"):
        make_engine(tmp_path).generate(make_task(tmp_path, "noaudio.wav"), lambda _p: None)


def test_the_tool_gets_configured_env_but_not_the_daemons_own_settings(tmp_path, monkeypatch):
    monkeypatch.setenv("HEYGEM_S3__SECRET_KEY", "do-not-leak")
    task = make_task(tmp_path, "env.wav")
    make_engine(tmp_path, env={"FAKE_TOOL_MODEL": "/models/x"}).generate(task, lambda _p: None)
    assert json.loads((task.workdir / "env.json").read_text()) == ["FAKE_TOOL_MODEL"]


def test_an_unknown_placeholder_is_a_config_error_naming_it(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("engine: {name: command}\nengines:\n  command:\n    args: [tool, '{audoi}']\n")
    with pytest.raises(ConfigError, match=r"engines\.command\.args: '\{audoi\}': unknown placeholder"):
        settings_for(load_config(path, environ={}, prepare=False), "command")


def test_doctor_finds_the_program_or_says_how_to_fix_it():
    good = CommandEngine.doctor(CommandEngine.Settings(args=[sys.executable]), ["cpu"])
    bad = CommandEngine.doctor(CommandEngine.Settings(args=["no-such-lipsync-tool"]), ["cpu"])
    assert [c.ok for c in good] == [True]
    assert [c.ok for c in bad] == [False] and "PATH" in bad[0].detail
