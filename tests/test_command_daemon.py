"""The real daemon with engine `command`: inputs dropped in the inbox go through an external program."""

from __future__ import annotations

import json

import pytest

from daemon_harness import DaemonHarness
from heygem_daemon.intake.pairing import safe_name
from media_factory import PORTRAIT_JPG, video_facts
from test_command_engine import ARGS, WEIRD

pytestmark = pytest.mark.daemon  # starts the real daemon: left out of `make test-fast`


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    base = tmp_path_factory.mktemp("command-daemon")
    harness = DaemonHarness(base, {
        "engine": {"name": "command"},
        "dedupe": {"window_hours": 0},  # every test drops the same voice
        "engines": {"command": {"args": ARGS, "timeout": 60, "bad_input_exit_codes": [3],
                                "progress_regex": r"(\d+)%", "cwd": str(base)}},
    })
    yield harness.start()
    harness.stop()


def test_a_pair_with_shell_syntax_in_its_name_is_generated_without_running_it(daemon, voice):
    daemon.drop_pair(voice, PORTRAIT_JPG, WEIRD)
    name = safe_name(WEIRD)
    assert daemon.wait_job(name).state == "done"
    assert video_facts(daemon.folder("outputs") / name / f"{name}.mp4").has_audio
    # The tool was handed the files under their own names, and no shell ever saw them.
    assert len(list(daemon.folder("archive").glob(f"*/{name}/{WEIRD}.wav"))) == 1
    assert not list(daemon.base.rglob("pwned*"))


def test_a_crashing_tool_is_retried_then_the_job_fails_with_its_output_in_error_json(daemon, voice):
    daemon.drop_pair(voice, PORTRAIT_JPG, "crash-test")
    job = daemon.wait_job("crash-test")
    assert job.state == "failed"
    (task,) = daemon.store().tasks.select(job.id)
    assert task.attempts == 2
    record = json.loads((daemon.folder("failed") / "crash-test" / "error.json").read_text())
    assert record["stage"] == "generate" and "exit code 1" in record["reason"]
    assert "ZeroDivisionError" in record["reason"] and "Traceback" in record["problems"][0]["detail"]


def test_a_bad_input_exit_code_fails_the_job_on_the_first_attempt(daemon, voice):
    daemon.drop_pair(voice, PORTRAIT_JPG, "badinput-test")
    job = daemon.wait_job("badinput-test")
    assert job.state == "failed"
    assert [t.attempts for t in daemon.store().tasks.select(job.id)] == [1]
    record = json.loads((daemon.folder("failed") / "badinput-test" / "error.json").read_text())
    assert "no face detected" in record["reason"]
