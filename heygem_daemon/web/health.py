"""The Health page's live checks: `heygem-daemon doctor` in a child process, only when someone asks.

The doctor asks S3 and the engines' services (chat URLs it only parses), and the wav2lip checks import torch and
load the checkpoint: none of that belongs in the web process, nor in every page view. A child process keeps
torch, its memory and any hang out of the console; one run at a time, and a result younger than
FRESH_SECONDS is shown again instead of asking every service again.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from heygem_daemon.ops.checks import Check

FRESH_SECONDS = 60.0
TIMEOUT_SECONDS = 120.0
HINT = "run `heygem-daemon doctor` on the daemon's host as its user"


@dataclass(frozen=True)
class DoctorRun:
    at: float
    """When it ended (epoch seconds)."""
    seconds: float
    checks: list[Check]


def run_doctor(config_path: Path | None, timeout: float) -> list[Check]:
    """The CLI's doctor, as a child with this interpreter and environment (the same config it resolves)."""
    argv = [sys.executable, "-m", "heygem_daemon.cli", *(["-c", str(config_path)] if config_path else []),
            "doctor", "--json"]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return [Check("doctor", False, f"no answer within {timeout:g} s", f"{HINT} to see which check hangs")]
    try:
        return [Check(**c) for c in json.loads(done.stdout.strip().splitlines()[-1])]
    except (ValueError, TypeError, IndexError):
        last = (done.stderr.strip().splitlines() or ["no output"])[-1][:300]
        return [Check("doctor", False, f"the checks did not finish (exit {done.returncode}): {last}", HINT)]


class LiveChecks:
    def __init__(self, config_path: Path | None, fresh: float = FRESH_SECONDS,
                 timeout: float = TIMEOUT_SECONDS) -> None:
        self.config_path = config_path
        self.fresh = fresh
        self.timeout = timeout
        self._running = threading.Lock()
        self.last: DoctorRun | None = None

    def run(self) -> str:
        """Runs the checks unless a run is under way or the last one is fresh; says which, for the page."""
        if not self._running.acquire(blocking=False):
            return "The checks are running already (someone else asked); reload in a moment."
        try:
            age = time.time() - self.last.at if self.last else None
            if age is not None and age < self.fresh:
                return (f"Checked {age:.0f} s ago: these are the results. The checks run at most once "
                        f"every {self.fresh:g} s.")
            began = time.monotonic()
            checks = run_doctor(self.config_path, self.timeout)
            self.last = DoctorRun(time.time(), time.monotonic() - began, checks)
            return "Checked just now."
        finally:
            self._running.release()
