"""`heygem-daemon health`: is the daemon of this state folder running and its main loop still turning? Cheap
enough for a container HEALTHCHECK every few seconds: the pid lock and the daemon's own state file, no store,
no engine."""

from __future__ import annotations

import time
from pathlib import Path

from heygem_daemon.ops.daemon_state import STATE_FILE, read_state


def last_beat(state_dir: Path, state: dict) -> float | None:
    """When the daemon last wrote its state: its `heartbeat` or `updated` field, else the file's mtime."""
    for key in ("heartbeat", "updated"):
        value = state.get(key)
        if isinstance(value, (int, float)):
            return float(value)
    try:
        return (state_dir / STATE_FILE).stat().st_mtime
    except OSError:
        return None


def problem(state_dir: Path, max_age: float, now: float | None = None) -> str | None:
    """None when healthy, else one line saying what is wrong."""
    state = read_state(state_dir)
    if not state["running"]:
        return f"the daemon is not running (no lock held on {state_dir})"
    beat = last_beat(state_dir, state)
    if beat is None:
        return f"the daemon (pid {state['pid']}) has written no state in {state_dir} yet"
    age = (time.time() if now is None else now) - beat
    if age > max_age:
        return f"the daemon (pid {state['pid']}) last wrote its state {age:.0f} s ago (limit {max_age:.0f} s): stuck"
    return None
