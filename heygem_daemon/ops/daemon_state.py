"""What the running daemon is doing, for `status --json` and the web console's Health page: a small JSON file
beside the pid lock, written at each change and at least every HEARTBEAT_SECONDS (its `updated` is the
daemon's heartbeat: a main loop that stopped turning stops it)."""

from __future__ import annotations

import fcntl
import json
import os
import time
from pathlib import Path
from typing import Any

import psutil

from heygem_daemon.fs.ops import atomic_write_json

STATE_FILE = "daemon.json"
LOCK_FILE = "heygem.pid"
HEARTBEAT_SECONDS = 5.0
STALE_SECONDS = 3 * HEARTBEAT_SECONDS


def write_state(state_dir: Path, **fields: Any) -> None:
    atomic_write_json(state_dir / STATE_FILE, {"pid": os.getpid(), "updated": time.time(), **fields})


def lock_holder(state_dir: Path) -> int | None:
    """The pid of the daemon holding the lock on state_dir, or None when none runs."""
    try:
        fh = open(state_dir / LOCK_FILE, encoding="utf-8")
    except FileNotFoundError:
        return None
    with fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            text = fh.read().strip()
            return int(text) if text.isdigit() else -1
        fcntl.flock(fh, fcntl.LOCK_UN)
    return None


def read_state(state_dir: Path) -> dict[str, Any]:
    """`running` comes from the lock (a crashed daemon leaves a stale file), `started` from the process; the
    rest from the file."""
    pid = lock_holder(state_dir)
    state: dict[str, Any] = {"running": pid is not None, "pid": pid}
    if pid is not None and pid > 0:
        try:
            state["started"] = psutil.Process(pid).create_time()
        except psutil.Error:
            pass  # exited just now, or another namespace's pid
    if pid is not None:
        try:
            saved = json.loads((state_dir / STATE_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            saved = {}
        if saved.get("pid") == pid:
            state.update({k: v for k, v in saved.items() if k != "pid"})
    return state
