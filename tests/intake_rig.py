"""In-process intake: the real Intake, Claimer, store and probe pool on real folders, driven by a clock
the test moves (no sleeps), and, where a test needs it, running as an unprivileged user like under systemd."""

from __future__ import annotations

import json
import os
import pwd
import subprocess
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import pytest

from heygem_daemon.config import load_config
from heygem_daemon.engines.registry import available
from heygem_daemon.fs.watcher import start_watcher
from heygem_daemon.generation.lifecycle import LifeCycle
from heygem_daemon.intake.claim import Claimer
from heygem_daemon.intake.inspect import Inspector
from heygem_daemon.intake.intake import Intake
from heygem_daemon.log import LOG_FILE, setup_logging
from heygem_daemon.state import Store

DAEMON_USER = "heygem-fsx-daemon"
OTHER_USER = "heygem-fsx-other"


def system_user(name: str) -> pwd.struct_passwd:
    """A real unprivileged account (made once per machine); skips the test where that is impossible."""
    if os.geteuid() != 0:
        pytest.skip("needs root to act as two different unprivileged users")
    try:
        return pwd.getpwnam(name)
    except KeyError:
        done = subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
                              capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot create user {name}: {done.stderr.strip()}")
        return pwd.getpwnam(name)


@contextmanager
def acting_as(user: pwd.struct_passwd) -> Iterator[None]:
    """Every permission check in this process (all threads) is made as `user` until the block ends."""
    os.setegid(user.pw_gid)
    os.seteuid(user.pw_uid)
    try:
        yield
    finally:
        os.seteuid(0)
        os.setegid(0)


def chown_tree(path: Path, user: pwd.struct_passwd) -> None:
    for p in [path, *path.rglob("*")]:
        os.lchown(p, user.pw_uid, user.pw_gid)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class IntakeRig:
    def __init__(self, base: Path, overrides: str = "") -> None:
        self.base = base
        (base / "base").mkdir(parents=True, exist_ok=True)
        cfg_path = base / "config.yaml"
        cfg_path.write_text("base_dir: base\nwatcher: {settle_seconds: 2, pair_timeout: 600}\n"
                            "disk_guard: {min_free_gb: 0}\n" + overrides)
        self.cfg = load_config(cfg_path, environ={})
        self.inbox = self.cfg.folder("inbox")
        self.logs = self.cfg.folder("logs")
        self.clock = Clock()
        self.store = Store(self.cfg.folder("state") / "heygem.db")
        self.inspector = Inspector(1)
        # Start the probe child now: tests may later act as a user who cannot read this Python install.
        self.inspector.submit(self.inbox, [], self.cfg.limits, False)[0].result(60)
        self.queued = 0
        self.observer: Any = None
        self.alerts: list[tuple[str, str]] = []
        self.intake = Intake(self.cfg, Claimer(self.cfg, LifeCycle(self.cfg, self.store)), self.inspector,
                             set(available()),
                             lambda _engine: False, self._queued, clock=self.clock,
                             on_alert=lambda key, text: self.alerts.append((key, text)))
        setup_logging(self.logs, "info", console=False)

    def _queued(self) -> None:
        self.queued += 1

    def watch(self) -> None:
        """Feed intake from the daemon's real inotify observer (events and which files are open for writing)."""
        self.observer, _mode = start_watcher(self.inbox, "inotify", 1.0, self.intake.touch, writes=self.intake.writes)

    def close(self) -> None:
        if self.observer is not None:
            self.observer.stop()
            self.observer.join(5)
        self.inspector.close()
        self.store.close()
        setup_logging(None, "info", console=False)

    def settle(self, seconds: float = 3.0) -> None:
        """Let time pass, then run intake until nothing is being probed (probes are real child processes)."""
        self.clock.advance(seconds)
        self.intake.touch(None)
        self.intake.step()
        deadline = time.monotonic() + 60
        while self.intake._probing and time.monotonic() < deadline:
            self.intake.wake.wait(0.2)
            self.intake.wake.clear()
            self.intake.step()
        assert not self.intake._probing, "probe did not finish within 60 s"

    def jobs(self) -> list[Any]:
        return self.store.jobs.select()

    def log_lines(self, level: str | None = None) -> list[dict[str, Any]]:
        path = self.logs / LOG_FILE
        lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
        return [rec for rec in lines if level is None or rec.get("level") == level]


def world_dir() -> Path:
    """A scratch folder every user can reach (pytest's own tmp folders are private to root)."""
    path = Path(tempfile.mkdtemp(prefix="heygem-fsx-", dir="/tmp"))
    path.chmod(0o777)
    return path
