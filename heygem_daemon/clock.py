"""Time as the daemon's decisions see it: injected, so tests move it forward instead of sleeping."""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    def time(self) -> float:
        """Wall-clock seconds (stored in the database: not_before, since, finished_at)."""

    def monotonic(self) -> float:
        """Seconds for measuring intervals in this process (stalls, heartbeats)."""


class SystemClock:
    def time(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()


SYSTEM_CLOCK = SystemClock()
