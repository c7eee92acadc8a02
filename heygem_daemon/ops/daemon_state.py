"""What the running daemon is doing, for `status --json` and the web console's Health page: a small JSON file
beside the pid lock, written at each change and at least every HEARTBEAT_SECONDS (its `updated` is the
daemon's heartbeat: a main loop that stopped turning stops it)."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import time
from pathlib import Path
from typing import Any

import psutil

from heygem_daemon.fs.ops import atomic_write_text

STATE_FILE = "daemon.json"
LOCK_FILE = "heygem.pid"
HEARTBEAT_SECONDS = 5.0
STALE_SECONDS = 3 * HEARTBEAT_SECONDS
# The file is padded to this size, so that on a full state disk — when a new copy cannot be written — the
# new state (why the daemon waits) still fits over the old one, in blocks the file already holds.
PADDED_SIZE = 4096


def write_state(state_dir: Path, **fields: Any) -> None:
    path = state_dir / STATE_FILE
    text = json.dumps({"pid": os.getpid(), "updated": time.time(), **fields}, indent=2, ensure_ascii=False)
    data = (text + "\n").encode()
    data += b" " * (PADDED_SIZE - len(data))  # JSON allows trailing white space
    try:
        atomic_write_text(path, data.decode())
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT) or not _overwrite(path, data):
            raise


def _overwrite(path: Path, data: bytes) -> bool:
    """Write `data` over the file in place, padded to its size, if it fits. A reader meeting it half written
    sees bad JSON and takes it as no state (`read_state`); this runs only when the disk is full."""
    try:
        with open(path, "r+b") as fh:
            size = os.fstat(fh.fileno()).st_size
            if len(data) > size:
                return False
            fh.write(data + b" " * (size - len(data)))
            fh.flush()
            os.fsync(fh.fileno())
    except OSError:
        return False
    return True


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
