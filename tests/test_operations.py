"""Operator commands against one real daemon: cancel, status --json, Prometheus metrics on a real port."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from daemon_harness import DaemonHarness
from media_factory import PORTRAIT_JPG, write_speech_wav
from test_command_engine import ARGS

pytestmark = pytest.mark.daemon  # starts the real daemon: left out of `make test-fast`
# How long the fake tool holds, reporting 5%, for an audio named `slow…`: longer than any wait here, so such a
# task runs until a test cancels it.
HELD_SECONDS = 600


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    port = free_port()
    base = tmp_path_factory.mktemp("ops") / "base"
    harness = DaemonHarness(base, {
        "metrics": {"port": port},
        "dedupe": {"window_hours": 0},  # tests drop the same voice and portrait
        # A job.yaml with `engine: command` runs the fake tool (tests/tools/), whose outcome its audio's name picks.
        "engines": {"command": {"args": ARGS, "timeout": HELD_SECONDS, "bad_input_exit_codes": [3],
                                "progress_regex": r"(\d+)%", "cwd": str(base),
                                "env": {"FAKE_SLOW_SECONDS": str(HELD_SECONDS)}}},
    })
    harness.metrics_port = port  # type: ignore[attr-defined]
    yield harness.start()
    harness.stop()


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("media")
    write_speech_wav(src / "short.wav", 1.0)
    return src


def drop_command_job(harness: DaemonHarness, audio: Path, audio_name: str, folder: str) -> None:
    """A folder job for the fake tool: one audio, the portraits anna and ben, and a job.yaml naming the engine."""
    harness.drop(audio, audio_name, folder=folder)
    harness.drop(PORTRAIT_JPG, "anna.jpg", folder=folder)
    harness.drop(PORTRAIT_JPG, "ben.jpg", folder=folder)
    (harness.inbox / folder / "job.yaml").write_text("engine: command\n")


def cli(harness: DaemonHarness, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "heygem_daemon.cli", "-c", str(harness.config_path), *args],
                          capture_output=True, text=True)


def scrape(harness: DaemonHarness) -> dict[tuple[str, tuple], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{harness.metrics_port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def rise(before: dict[tuple[str, tuple], float], after: dict[tuple[str, tuple], float], name: str,
         *labels: tuple[str, str]) -> float:
    """How much a sample grew between two scrapes (a labelled sample is there from its first use)."""
    return after[(name, labels)] - before.get((name, labels), 0)


def test_cancel_stops_the_running_task_without_a_retry_and_files_the_inputs_in_failed(daemon, media):
    before = scrape(daemon)
    drop_command_job(daemon, media / "short.wav", "slow.wav", "stopme")  # each task runs until stopped

    def running():
        job = daemon.job("stopme")
        return job and any(t.state == "running" for t in daemon.store().tasks.select(job.id))

    daemon.wait_for(running, 60, "a task of stopme to run")
    result = cli(daemon, "cancel", "stopme")
    assert result.returncode == 0 and "stopme: cancelling" in result.stdout

    job = daemon.wait_job("stopme")
    assert job.state == "failed"
    tasks = daemon.store().tasks.select(job.id)
    assert [t.state for t in tasks] == ["failed", "failed"]
    ran = next(t for t in tasks if t.attempts)
    assert [a["outcome"] for a in daemon.store().tasks.attempts(ran.id)] == ["failed"]
    error = json.loads((daemon.folder("failed") / "stopme" / "error.json").read_text())
    assert "cancelled by the operator" in error["reason"] and "retry" in error["hint"]
    assert sorted(p.name for p in (daemon.folder("failed") / "stopme").iterdir()) == [
        "anna.jpg", "ben.jpg", "error.json", "job.yaml", "slow.wav"]
    assert not (daemon.folder("outputs") / "stopme").exists()
    assert not (daemon.folder("work") / job.id).exists()
    # the running attempt ended for good, counted as cancelled; the queued task never had one
    assert rise(before, scrape(daemon), "heygem_failed_attempts_total", ("kind", "cancelled"), ("then", "failed")) == 1


def test_cancel_refuses_finished_and_unknown_jobs(daemon, media):
    daemon.drop(media / "short.wav", "quick.wav")
    daemon.drop(PORTRAIT_JPG, "quick.jpg")
    daemon.wait_job("quick")
    finished = cli(daemon, "cancel", "quick")
    assert finished.returncode == 1 and "only queued or running jobs can be cancelled" in finished.stderr
    unknown = cli(daemon, "cancel", "nobody")
    assert unknown.returncode == 1 and "no job called 'nobody'" in unknown.stderr


def test_metrics_show_jobs_queue_durations_devices_and_counters(daemon, media):
    before = scrape(daemon)
    daemon.drop(media / "short.wav", "measured.wav")
    daemon.drop(PORTRAIT_JPG, "measured.jpg")
    drop_command_job(daemon, media / "short.wav", "badinput.wav", "refused")  # the tool refuses both pairs
    assert daemon.wait_job("measured").state == "done"
    assert daemon.wait_job("refused").state == "failed"

    def idle():  # a slot lets go of its task just after recording the outcome that finished the job
        m = scrape(daemon)
        return m if m[("heygem_device_busy", (("device", "cpu"),))] == 0 else None

    m = daemon.wait_for(idle, 30, "the cpu slot to be idle")
    assert rise(before, m, "heygem_jobs", ("state", "done")) == 1
    assert rise(before, m, "heygem_jobs", ("state", "failed")) == 1
    assert m[("heygem_queue_length", ())] == 0
    assert rise(before, m, "heygem_task_seconds_count", ("device", "cpu"), ("outcome", "done")) == 1
    assert rise(before, m, "heygem_task_seconds_sum", ("device", "cpu"), ("outcome", "done")) > 0
    assert rise(before, m, "heygem_task_seconds_count", ("device", "cpu"), ("outcome", "failed")) == 2
    assert rise(before, m, "heygem_failed_attempts_total", ("kind", "bad_input"), ("then", "failed")) == 2
    assert m[("heygem_cleanup_freed_bytes_total", (("sweep", "temp"),))] == 0
    assert m[("heygem_uploaded_bytes_total", ())] == 0
    assert m[("heygem_draining", ())] == 0 and m[("heygem_disk_low", ())] == 0


def test_metrics_listen_on_loopback_only(daemon):
    listening = [c.laddr for c in psutil.Process(daemon.proc.pid).net_connections("inet")
                 if c.status == psutil.CONN_LISTEN]
    assert [(a.ip, a.port) for a in listening] == [("127.0.0.1", daemon.metrics_port)]


def test_status_json_says_whether_the_daemon_runs(daemon, tmp_path):
    state = json.loads(cli(daemon, "status", "--json").stdout)["daemon"]
    assert state["running"] and state["pid"] == daemon.proc.pid
    assert state["draining"] is False and state["disk_low"] is None
    idle = DaemonHarness(tmp_path / "idle")
    assert json.loads(cli(idle, "status", "--json").stdout)["daemon"] == {"running": False, "pid": None}


def test_a_taken_metrics_port_is_logged_and_the_daemon_runs_on(daemon, tmp_path):
    other = DaemonHarness(tmp_path / "other", {"metrics": {"port": daemon.metrics_port}})
    other.start()
    try:
        assert "cannot serve metrics; running without them" in other.log_text()
        assert other.alive()
    finally:
        assert other.stop() == 0
