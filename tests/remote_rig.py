"""Many GPU hosts on one machine: a real redis-server on 127.0.0.1 and `heygem-daemon worker` processes,
each with its own scratch folder, seeing the daemon's folders through a path map as a mounted share."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import redis
import yaml
from daemon_harness import REPO, DaemonHarness, require_daemon_marker
from media_factory import PORTRAIT_JPG
from s3_server import free_port

CLI = "import sys; from heygem_daemon.cli import main; sys.exit(main(sys.argv[1:]))"


class RedisServer:
    """Debian's redis-server with an append-only file in its own folder, so a restart keeps the queue (as
    the README asks of a production broker)."""

    def __init__(self, folder: Path, password: str | None = None) -> None:
        self.folder, self.port, self.password = folder, free_port(), password
        folder.mkdir(parents=True, exist_ok=True)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        binary = shutil.which("redis-server")
        assert binary, "redis-server is missing: apt-get install redis-server (.ci/run does)"
        with open(self.folder / "redis.log", "ab") as log:
            self.proc = subprocess.Popen(
                [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.folder),
                 "--appendonly", "yes", "--appendfsync", "always", "--save", "", "--protected-mode", "yes",
                 *(["--requirepass", self.password] if self.password else [])],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.2).close()
                return self
            except OSError:
                time.sleep(0.05)
        raise AssertionError("redis-server did not start; see " + str(self.folder / "redis.log"))

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)

    def result_channels_listened_to(self) -> list[bytes]:
        """Task result channels someone is subscribed to (PUBSUB CHANNELS)."""
        return redis.Redis.from_url(self.url).pubsub_channels("celery-task-meta-*")


class RemoteWorker:
    """One `heygem-daemon worker` process playing a GPU host: its own config and scratch folder."""

    def __init__(self, folder: Path, name: str, settings: dict[str, Any], env: dict[str, str]) -> None:
        self.folder, self.name, self.env = folder, name, env
        folder.mkdir(parents=True, exist_ok=True)
        self.config = folder / "worker.yaml"
        self.config.write_text(yaml.safe_dump({"base_dir": str(folder), **settings}))
        self.log = folder / "worker.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, ready: str = "ready.") -> RemoteWorker:
        """Start it and wait for `ready` in its log (Celery's "ready.", or what a worker that may not consume
        says)."""
        return self.launch(ready).wait_started()

    def launch(self, ready: str = "ready.") -> RemoteWorker:
        """Start it without waiting (workers start side by side): `wait_started` waits."""
        require_daemon_marker("a `heygem-daemon worker`")
        self._ready = (ready, self.text().count(ready) + 1)
        env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1", **self.env}
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", CLI, "-c", str(self.config), "worker", "--hostname", self.name],
                cwd=self.folder, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        return self

    def wait_started(self) -> RemoteWorker:
        self.wait_log(self._ready[0], 60, self._ready[1])
        return self

    def kill(self) -> None:
        """The host dies: the worker and every process under it, with SIGKILL."""
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def pause(self) -> None:
        """The host freezes (SIGSTOP to the worker and its pool): it takes no task until `resume`."""
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGCONT)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
        self.reap()

    def reap(self) -> None:
        """Wait for a stopping worker (killed after 20 s)."""
        if self.proc and self.proc.poll() is None:
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def succeeded(self) -> int:
        return self.text().count("succeeded in")

    def wait_log(self, needle: str, timeout: float, times: int = 1) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.text().count(needle) >= times:
                return
            assert self.proc is None or self.proc.poll() is None, f"worker {self.name} exited:\n{self.text()[-3000:]}"
            time.sleep(0.1)
        raise AssertionError(f"worker {self.name}: no {needle!r} after {timeout}s:\n{self.text()[-3000:]}")


def stop_all(workers: list[RemoteWorker]) -> None:
    """Stop workers side by side: each warm shutdown takes seconds."""
    for w in workers:
        if w.proc and w.proc.poll() is None:
            w.proc.terminate()
    for w in workers:
        w.reap()


def failed_remotely(daemon: DaemonHarness, voice: Path, name: str, timeout: float = 90.0) -> tuple[Any, list[Any]]:
    """A pair named `name` dropped and its job waited for until it failed: the job and its tasks."""
    daemon.drop_pair(voice, PORTRAIT_JPG, name)
    job = daemon.wait_job(name, timeout=timeout)
    assert job.state == "failed"
    return job, daemon.store().tasks.select(job.id)


def assert_bad_input_fails_once(daemon: DaemonHarness, voice: Path, name: str) -> None:
    """The fake tool refuses the input (`badinput…`): one attempt, its reason and hint in error.json, no outputs."""
    _, tasks = failed_remotely(daemon, voice, name)
    assert [t.attempts for t in tasks] == [1]
    record = json.loads((daemon.folder("failed") / name / "error.json").read_text())
    assert "no face detected" in record["reason"] and record["hint"]
    assert not (daemon.folder("outputs") / name).exists()
