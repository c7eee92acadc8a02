"""Run the real daemon as a subprocess on temporary folders, and watch what it does."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Callable

import yaml

from heygem_daemon.state import Job, Store

REPO = Path(__file__).resolve().parent.parent

FAST_SETTINGS: dict[str, Any] = {
    "watcher": {"settle_seconds": 0.6, "rescan_seconds": 5, "pair_timeout": 30, "poll_interval": 0.3,
                "incomplete_grace_seconds": 1},
    "workers": {"backoff_seconds": 0.5, "backoff_max_seconds": 2, "max_attempts": 2, "stall_seconds": 60},
    "limits": {"max_audio_seconds": 30},
    "logging": {"console": False, "level": "debug"},
    # Bounded, so stopping a daemon with a task still running never holds a test up for long.
    "shutdown": {"drain_seconds": 10},
}


# tests/conftest.py sets this per test: False for a test without the `daemon` marker, so that a test starting
# the real daemon (or a `heygem-daemon worker`) cannot slip unmarked into `make test-fast`, the in-process part.
# Outside pytest (bench/) it stays True.
may_start_daemon = True


def require_daemon_marker(what: str) -> None:
    if not may_start_daemon:
        raise RuntimeError(f"this test starts {what} but is not marked `@pytest.mark.daemon`: mark it (or its "
                           "module: pytestmark = pytest.mark.daemon) so `make test-fast` stays in-process")


def deep_merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for k, v in b.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


class DaemonHarness:
    def __init__(self, base: Path, overrides: dict[str, Any] | None = None) -> None:
        self.base = base
        base.mkdir(parents=True, exist_ok=True)
        self.config_path = base / "config.yaml"
        settings = deep_merge({"base_dir": str(base)}, FAST_SETTINGS)
        self.config_path.write_text(yaml.safe_dump(deep_merge(settings, overrides or {})))
        self.proc: subprocess.Popen[bytes] | None = None
        self.console = base / "console.log"
        for name in ("inbox", "outputs", "failed", "archive", "work", "state", "logs"):
            (base / name).mkdir(exist_ok=True)

    def folder(self, name: str) -> Path:
        return self.base / name

    @property
    def inbox(self) -> Path:
        return self.base / "inbox"

    # --- process ------------------------------------------------------------------------------

    def start(self, env: dict[str, str] | None = None) -> "DaemonHarness":
        require_daemon_marker("the real daemon")
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        with open(self.console, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, str(REPO / "daemon.py"), "-c", str(self.config_path)],
                cwd=self.base, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self.wait_for(lambda: "daemon ready" in self.log_text(), 60, "daemon to start")
        return self

    def kill(self, sig: int = signal.SIGKILL) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)
        self.proc.wait(30)

    def stop(self) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            return self.proc.wait(10)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_text(self) -> str:
        path = self.base / "logs" / "heygem.log"
        return path.read_text(errors="replace") if path.exists() else ""

    # --- dropping files -----------------------------------------------------------------------

    def drop(self, src: Path, name: str | None = None, folder: str | None = None) -> Path:
        """Copy like a careful client: write a hidden temp name, then rename into place."""
        dest_dir = self.inbox / folder if folder else self.inbox
        dest_dir.mkdir(parents=True, exist_ok=True)
        dest = dest_dir / (name or src.name)
        tmp = dest_dir / f".{uuid.uuid4().hex}.tmp"
        shutil.copyfile(src, tmp)
        os.rename(tmp, dest)
        return dest

    def drop_pair(self, audio: Path, portrait: Path, stem: str) -> None:
        """A loose pair: `<stem>.wav` + `<stem>.jpg` in the inbox."""
        self.drop(audio, f"{stem}.wav")
        self.drop(portrait, f"{stem}.jpg")

    # --- looking at the results ---------------------------------------------------------------

    def store(self) -> Store:
        return Store(self.base / "state" / "heygem.db")

    def job(self, name: str) -> Job | None:
        return self.store().jobs.find(name)

    def wait_for(self, cond: Callable[[], Any], timeout: float, what: str) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = cond()
            if value:
                return value
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"daemon exited ({self.proc.returncode}) while waiting for {what}:\n"
                                     + self.console.read_text(errors="replace")[-3000:])
            time.sleep(0.1)
        raise AssertionError(f"timed out after {timeout}s waiting for {what}; log tail:\n{self.log_text()[-3000:]}")

    def wait_job(self, name: str, states: tuple[str, ...] = ("done", "failed"), timeout: float = 90) -> Job:
        def finished() -> Job | None:
            job = self.job(name)
            return job if job and job.state in states else None
        return self.wait_for(finished, timeout, f"job {name} to reach {states}")
