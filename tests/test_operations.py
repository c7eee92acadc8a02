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

pytestmark = pytest.mark.daemon  # starts the real daemon: left out of `make test-fast`


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    port = free_port()
    harness = DaemonHarness(tmp_path_factory.mktemp("ops") / "base", {"metrics": {"port": port}})
    harness.metrics_port = port  # type: ignore[attr-defined]
    yield harness.start()
    harness.stop()


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("media")
    write_speech_wav(src / "short.wav", 1.0)
    write_speech_wav(src / "long.wav", 25.0)
    return src


def cli(harness: DaemonHarness, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "heygem_daemon.cli", "-c", str(harness.config_path), *args],
                          capture_output=True, text=True)


def scrape(harness: DaemonHarness) -> dict[tuple[str, tuple], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{harness.metrics_port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_cancel_stops_the_running_task_without_a_retry_and_files_the_inputs_in_failed(daemon, media):
    daemon.drop(media / "long.wav", "speech.wav", folder="stopme")
    daemon.drop(PORTRAIT_JPG, "anna.jpg", folder="stopme")
    daemon.drop(PORTRAIT_JPG, "ben.jpg", folder="stopme")
    # 1080p is HEVC (x265), slow enough that the task still runs once `cancel` has started up on a busy machine.
    (daemon.inbox / "stopme" / "job.yaml").write_text("preset: 1080p\n")

    def running():
        job = daemon.job("stopme")
        return job and any(t.state == "running" and t.progress > 0.02 for t in daemon.store().tasks.select(job.id))

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
        "anna.jpg", "ben.jpg", "error.json", "job.yaml", "speech.wav"]
    assert not (daemon.folder("outputs") / "stopme").exists()
    assert not (daemon.folder("work") / job.id).exists()


def test_cancel_refuses_finished_and_unknown_jobs(daemon, media):
    daemon.drop(media / "short.wav", "quick.wav")
    daemon.drop(PORTRAIT_JPG, "quick.jpg")
    daemon.wait_job("quick")
    finished = cli(daemon, "cancel", "quick")
    assert finished.returncode == 1 and "only queued or running jobs can be cancelled" in finished.stderr
    unknown = cli(daemon, "cancel", "nobody")
    assert unknown.returncode == 1 and "no job called 'nobody'" in unknown.stderr


def test_metrics_show_jobs_queue_durations_devices_and_counters(daemon, media):
    daemon.drop(media / "short.wav", "measured.wav")
    daemon.drop(PORTRAIT_JPG, "measured.jpg")
    daemon.wait_job("measured")
    m = scrape(daemon)
    assert m[("heygem_jobs", (("state", "done"),))] >= 1
    assert m[("heygem_queue_length", ())] == 0
    assert m[("heygem_device_busy", (("device", "cpu"),))] == 0
    assert m[("heygem_task_seconds_count", (("device", "cpu"), ("outcome", "done")))] >= 1
    assert m[("heygem_task_seconds_sum", (("device", "cpu"), ("outcome", "done")))] > 0
    assert m[("heygem_cleanup_freed_bytes_total", (("sweep", "temp"),))] == 0
    assert m[("heygem_uploaded_bytes_total", ())] == 0
    # the cancel earlier in this module ended its running attempt for good
    assert m[("heygem_failed_attempts_total", (("kind", "bad_input"), ("then", "failed")))] >= 1
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
