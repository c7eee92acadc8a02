"""The daemon's components: every one counts for the watchdog, a reload reaches each, an early stop is clean."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from daemon_harness import REPO, DaemonHarness
from heygem_daemon.config import load_config
from heygem_daemon.delivery.outputs import OutputsWatcher
from heygem_daemon.service import Daemon


@pytest.fixture
def config(tmp_path) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"base_dir": str(tmp_path), "logging": {"console": False},
                                    "watcher": {"settle_seconds": 30}}))
    return path


@pytest.fixture
def daemon(config):
    daemon = Daemon(load_config(config, environ={}), config)
    daemon.start_components()
    yield daemon
    daemon.stop_components()


def test_every_component_is_alive_after_start(daemon):
    # In start order, which is the contract: intake last, so nothing is claimed before what carries a job on.
    assert [c.name for c in daemon.components] == [
        "notify", "outages", "workers", "speech", "delivery", "cleanup", "metrics", "intake"]
    assert daemon.dead_components() == []


def test_a_dead_notify_thread_or_outputs_observer_withholds_the_watchdog(daemon):
    daemon.chat.stop()
    daemon.delivery._observer.stop()
    daemon.delivery._observer.join(5)
    assert sorted(daemon.dead_components()) == ["delivery", "notify"]  # which ones, not in what order


def test_a_stopped_scheduler_counts_as_dead(daemon):
    daemon.cleanup.stop()
    assert daemon.dead_components() == ["cleanup"]


def test_reload_hands_new_watcher_timings_to_delivery_and_intake(daemon, config):
    config.write_text(config.read_text().replace("settle_seconds: 30", "settle_seconds: 2.5"))
    daemon._reload()
    assert daemon.delivery.watcher.tracker.settle == 2.5
    deadline = time.monotonic() + 10  # the intake thread takes it at its next step
    while daemon.intake.tracker.settle != 2.5 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert daemon.intake.tracker.settle == 2.5


def test_outputs_watcher_takes_a_video_by_the_settle_time_applied_on_reload(tmp_path, config):
    cfg = load_config(config, environ={})
    video = tmp_path / "outputs" / "alice" / "v.mp4"
    video.parent.mkdir(parents=True)
    video.write_bytes(b"x" * 100)
    watcher = OutputsWatcher(tmp_path / "outputs", cfg.watcher)
    assert watcher.step(0.0, lambda _: False) == [] and watcher.step(5.0, lambda _: False) == []
    watcher.apply(cfg.watcher.model_copy(update={"settle_seconds": 2.0}))
    assert watcher.step(5.0, lambda _: False) == [(os.path.join("alice", "v.mp4"), 100)]


def _catches_sigterm(pid: int) -> bool:
    with open(f"/proc/{pid}/status") as fh:
        caught = next(line for line in fh if line.startswith("SigCgt:"))
    return bool(int(caught.split()[1], 16) & (1 << (signal.SIGTERM - 1)))


def _hand_over(fifo: Path, text: str, proc: subprocess.Popen[bytes]) -> None:
    """Write `text` into the named pipe once the process has opened it to read (until then there is no reader)."""
    deadline = time.monotonic() + 30
    while True:
        try:
            fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
            break
        except OSError as exc:
            if exc.errno != errno.ENXIO:
                raise
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.01)
    with os.fdopen(fd, "w") as pipe:
        pipe.write(text)


@pytest.mark.daemon
def test_sigterm_in_the_first_moments_after_start_is_a_clean_stop(tmp_path):
    harness = DaemonHarness(tmp_path / "base")
    # The daemon reads its config through a named pipe: it waits there, before logging is set up, until the
    # test has sent SIGTERM, so the signal lands in the first moments however loaded the machine is.
    fifo = tmp_path / "config.yaml"
    os.mkfifo(fifo)
    proc = subprocess.Popen([sys.executable, str(REPO / "daemon.py"), "-c", str(fifo)],
                            cwd=harness.base, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 30
    while not _catches_sigterm(proc.pid):
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.001)
    # The handler is there before logging is even set up (today's main: only once the daemon was built).
    assert not (harness.base / "logs" / "heygem.log").exists()
    proc.send_signal(signal.SIGTERM)
    _hand_over(fifo, harness.config_path.read_text(), proc)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out.decode()
    assert "Traceback" not in out.decode()
    assert "stopped" in harness.log_text() and "daemon ready" not in harness.log_text()


@pytest.mark.daemon
@pytest.mark.parametrize("delay", [0.05, 0.2, 0.4])
def test_sigterm_at_any_moment_of_start_up_stops_at_once_with_the_default_drain_time(tmp_path, delay):
    # The default drain_seconds (600): a stop that comes while the daemon starts must not wait it out for a
    # delivery that never began.
    harness = DaemonHarness(tmp_path / "base", {"shutdown": {"drain_seconds": 600}})
    proc = subprocess.Popen([sys.executable, str(REPO / "daemon.py"), "-c", str(harness.config_path)],
                            cwd=harness.base, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    time.sleep(delay)
    handled = _catches_sigterm(proc.pid)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)  # 600 s when the drain waits
    # Before the interpreter has run the entry point's first lines no handler exists yet: the kernel's default
    # (killed by SIGTERM, which systemd counts as a clean stop). From then on: the same clean stop, exit 0.
    assert proc.returncode == (0 if handled else -signal.SIGTERM), out.decode()
    assert "Traceback" not in out.decode()
