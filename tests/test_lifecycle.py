"""The real daemon under systemd's protocols: notify socket, SIGTERM drain, second SIGTERM, SIGHUP, disk guard."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
import yaml

from daemon_harness import DaemonHarness
from media_factory import PORTRAIT_JPG, write_speech_wav
from notify_receiver import Receiver
from test_command_engine import ARGS

pytestmark = pytest.mark.daemon  # starts the real daemon: left out of `make test-fast`


class NotifyListener:
    """Plays systemd: an abstract unix datagram socket collecting every message the daemon sends."""

    def __init__(self) -> None:
        self.address = f"@heygem-test-{uuid.uuid4().hex}"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + self.address[1:])
        self.sock.settimeout(0.2)
        self.messages: list[str] = []
        self._stop = False
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop:
            try:
                self.messages.append(self.sock.recv(65536).decode())
            except socket.timeout:
                continue

    def fields(self) -> list[str]:
        return [line for msg in list(self.messages) for line in msg.splitlines()]

    def close(self) -> None:
        if self._stop:  # closed already: by the test, then again by the fixture
            return
        self._stop = True
        self._thread.join()
        # What the reader has not taken yet is in the socket buffer (the sender has stopped): take it all.
        self.sock.setblocking(False)
        while True:
            try:
                self.messages.append(self.sock.recv(65536).decode())
            except BlockingIOError:
                break
        self.sock.close()


@pytest.fixture
def notify():
    listener = NotifyListener()
    yield listener
    listener.close()


# A task whose audio is named `slow…` runs the fake lip-sync tool (tests/tools/), which reports 5% and then holds
# until the test writes its release file: running for as long as a test needs, finished when the test says.
HELD_SECONDS = 600
# Long enough for a daemon still claiming to take a pair dropped during the drain (settle 0.6 s, poll 0.3 s), twice.
CLAIM_WINDOW_SECONDS = 2.0


def held_tool(base: Path, release: Path, drain_seconds: float) -> dict:
    """Config for a daemon whose engine is the fake tool (`slow…` tasks wait for `release`)."""
    env = {"FAKE_SLOW_SECONDS": str(HELD_SECONDS), "FAKE_RELEASE_FILE": str(release)}
    return {"shutdown": {"drain_seconds": drain_seconds}, "engine": {"name": "command"},
            "engines": {"command": {"args": ARGS, "timeout": HELD_SECONDS, "progress_regex": r"(\d+)%",
                                    "cwd": str(base), "env": env}}}


@pytest.fixture
def voice(tmp_path) -> Path:
    return write_speech_wav(tmp_path / "voice.wav", 1.0)


def running_task(harness: DaemonHarness, name: str):
    """A task of the job that the tool has begun (its first progress is in the store)."""
    job = harness.job(name)
    tasks = harness.store().tasks.select(job.id) if job else []
    return next((t for t in tasks if t.state == "running" and t.progress > 0.02), None)


def test_notify_socket_sees_ready_status_watchdog_and_stopping(tmp_path, notify):
    harness = DaemonHarness(tmp_path / "base")
    harness.start(env={"NOTIFY_SOCKET": notify.address, "WATCHDOG_USEC": "400000"})
    harness.wait_for(lambda: notify.fields().count("WATCHDOG=1") >= 3, 30, "three watchdog pings")
    assert harness.stop() == 0
    notify.close()
    fields = notify.fields()
    assert fields.index("READY=1") < fields.index("WATCHDOG=1")
    status = next(f for f in fields if f.startswith("STATUS="))
    assert status == "STATUS=0 queued, 0 running | cpu: idle"
    stopping = fields.index("STOPPING=1")
    assert fields[stopping + 1] == f"EXTEND_TIMEOUT_USEC={(10 + 30) * 1_000_000}"


def test_sigterm_lets_the_running_task_finish_takes_nothing_new_and_restart_resumes(tmp_path, voice):
    release = tmp_path / "release"
    harness = DaemonHarness(tmp_path / "base", held_tool(tmp_path / "base", release, drain_seconds=120))
    harness.start()
    harness.drop(voice, "slow.wav", folder="pair")
    harness.drop(PORTRAIT_JPG, "anna.jpg", folder="pair")
    harness.drop(PORTRAIT_JPG, "ben.jpg", folder="pair")
    harness.wait_for(lambda: running_task(harness, "pair"), 60, "the first task to run")

    harness.proc.send_signal(signal.SIGTERM)
    harness.drop(write_speech_wav(tmp_path / "short.wav", 0.8), "late.wav")  # not the pair's audio: no duplicate
    harness.drop(PORTRAIT_JPG, "late.jpg")
    harness.wait_for(lambda: "draining" in harness.log_text(), 30, "the drain to begin")
    time.sleep(CLAIM_WINDOW_SECONDS)  # not a race: the time in which a daemon still claiming would take `late`
    release.touch()
    assert harness.proc.wait(120) == 0

    job = harness.job("pair")
    tasks = {t.name: t for t in harness.store().tasks.select(job.id)}
    assert tasks["anna"].state == "done" and (harness.folder("outputs") / "pair" / "anna.mp4").is_file()
    assert tasks["ben"].state == "queued" and tasks["ben"].attempts == 0
    assert harness.store().tasks.attempts(tasks["ben"].id) == []
    assert sorted(p.name for p in harness.inbox.iterdir()) == ["late.jpg", "late.wav"]
    assert harness.job("late") is None
    assert "draining" in harness.log_text()

    harness.start()
    assert harness.wait_job("pair", timeout=120).state == "done"
    assert harness.wait_job("late", timeout=120).state == "done"
    harness.stop()


def test_a_job_finished_during_the_drain_is_linked_reported_and_announced_before_exit(tmp_path, voice):
    receiver = Receiver().start()
    release = tmp_path / "release"
    harness = DaemonHarness(tmp_path / "base", held_tool(tmp_path / "base", release, drain_seconds=120))
    try:
        harness.start(env={"HEYGEM_NOTIFY__URLS": receiver.url("/hook")})
        harness.drop(voice, "slow.wav", folder="carol")
        harness.drop(PORTRAIT_JPG, "carol.jpg", folder="carol")
        harness.wait_for(lambda: running_task(harness, "carol"), 60, "the task to run")
        harness.proc.send_signal(signal.SIGTERM)
        harness.wait_for(lambda: "draining" in harness.log_text(), 30, "the drain to begin")
        release.touch()
        assert harness.proc.wait(120) == 0
    finally:
        harness.stop()
        receiver.stop()

    job = harness.job("carol")
    assert job.state == "done"
    batch = harness.store().deliveries.batch(job.id)
    assert batch is not None and batch.state == "reported"
    out = harness.folder("outputs") / "carol"
    # One video: no zip below delivery.zip_min_videos (2); its own link is the download.
    assert batch.zip_name is None and (out / "carol.mp4").is_file() and (out / "links.json").is_file()
    [message] = receiver.delivered("/hook", containing="carol")
    assert message.payload["type"] == "success" and "carol.mp4" in message.text
    assert [n.state for n in harness.store().outbox.select(job.id)] == ["sent"]


def test_drain_time_over_puts_the_running_task_back_in_the_queue_uncounted(tmp_path, voice):
    harness = DaemonHarness(tmp_path / "base", held_tool(tmp_path / "base", tmp_path / "release", drain_seconds=0.5))
    harness.start()
    harness.drop(voice, "slow.wav")
    harness.drop(PORTRAIT_JPG, "slow.jpg")
    harness.wait_for(lambda: running_task(harness, "slow"), 60, "the task to run")

    assert harness.stop() == 0

    [task] = harness.store().tasks.select(harness.job("slow").id)
    assert task.state == "queued" and task.attempts == 0 and task.progress == 0
    assert [a["outcome"] for a in harness.store().tasks.attempts(task.id)] == ["interrupted"]
    assert not list(harness.folder("outputs").rglob("*.part"))
    assert "drain time over: running tasks go back to the queue" in harness.log_text()


def test_a_second_sigterm_stops_at_once_with_the_task_requeued(tmp_path, voice):
    harness = DaemonHarness(tmp_path / "base", held_tool(tmp_path / "base", tmp_path / "release", drain_seconds=600))
    harness.start()
    harness.drop(voice, "slow.wav")
    harness.drop(PORTRAIT_JPG, "slow.jpg")
    harness.wait_for(lambda: running_task(harness, "slow"), 60, "the task to run")

    harness.proc.send_signal(signal.SIGTERM)
    harness.wait_for(lambda: "draining" in harness.log_text(), 30, "the drain to begin")
    harness.proc.send_signal(signal.SIGTERM)
    assert harness.proc.wait(60) == 0

    [task] = harness.store().tasks.select(harness.job("slow").id)
    assert task.state == "queued" and task.attempts == 0
    assert "second stop signal: running tasks go back to the queue" in harness.log_text()


def rewrite_config(harness: DaemonHarness, **sections: dict) -> None:
    data = yaml.safe_load(harness.config_path.read_text())
    for key, values in sections.items():
        data.setdefault(key, {}).update(values)
    harness.config_path.write_text(yaml.safe_dump(data))


def log_events(harness: DaemonHarness, event: str) -> list[dict]:
    return [e for e in map(json.loads, harness.log_text().splitlines()) if e["event"] == event]


def test_sighup_with_a_broken_config_keeps_the_old_one_running(tmp_path, notify):
    harness = DaemonHarness(tmp_path / "base")
    harness.start(env={"NOTIFY_SOCKET": notify.address})
    harness.config_path.write_text(harness.config_path.read_text() + "\nwatcher: {settle_secnds: 1}\n")
    harness.proc.send_signal(signal.SIGHUP)
    [refused] = harness.wait_for(lambda: log_events(harness, "new config refused; the daemon keeps running with "
                                                             "the old one"), 30, "the refusal")
    assert "settle_secnds" in refused["error"] and refused["level"] == "error"
    harness.wait_for(lambda: "RELOADING=1" in notify.fields() and notify.fields().count("READY=1") == 2, 10,
                     "RELOADING=1 then READY=1")
    voice = write_speech_wav(tmp_path / "v.wav", 1.0)
    harness.drop(voice, "still.wav")
    harness.drop(PORTRAIT_JPG, "still.jpg")
    assert harness.wait_job("still").state == "done"
    assert harness.stop() == 0


def test_disk_guard_holds_jobs_in_the_inbox_until_a_reload_lowers_the_threshold(tmp_path, notify):
    harness = DaemonHarness(tmp_path / "base", {"disk_guard": {"min_free_gb": 1_000_000, "check_seconds": 0.5}})
    harness.start(env={"NOTIFY_SOCKET": notify.address})
    harness.wait_for(lambda: any("disk space low" in f for f in notify.fields() if f.startswith("STATUS=")), 30,
                     "STATUS to report low disk space")
    voice = write_speech_wav(tmp_path / "v.wav", 1.0)
    harness.drop(voice, "held.wav")
    harness.drop(PORTRAIT_JPG, "held.jpg")
    time.sleep(3)  # five settle windows: long enough that the pair would have been claimed
    assert sorted(p.name for p in harness.inbox.iterdir()) == ["held.jpg", "held.wav"]
    assert harness.job("held") is None
    status = json.loads(subprocess.run(
        [sys.executable, "-m", "heygem_daemon.cli", "-c", str(harness.config_path), "status", "--json"],
        capture_output=True, text=True, check=True).stdout)["daemon"]
    assert status["running"] and status["pid"] == harness.proc.pid and "disk space low" in status["disk_low"]

    rewrite_config(harness, disk_guard={"min_free_gb": 0}, watcher={"mode": "polling"})
    harness.proc.send_signal(signal.SIGHUP)
    assert harness.wait_job("held").state == "done"
    [reloaded] = log_events(harness, "config reloaded")
    assert reloaded["applied"] == ["disk_guard.min_free_gb"] and reloaded["need_restart"] == ["watcher.mode"]
    assert "disk space is back; claiming new jobs again" in harness.log_text()
    assert harness.stop() == 0
