"""Disk guard: below a free-space threshold on outputs/ or work/, no new jobs are claimed.

Files wait in the inbox meanwhile (the watcher keeps watching); claiming resumes once space is back.
"""

from __future__ import annotations

import shutil
from typing import Callable, NamedTuple

from heygem_daemon.config import Config
from heygem_daemon.log import get_logger

log = get_logger("heygem.diskguard")
GB = 1024 ** 3
# Resume only with some room above the threshold, so a disk hovering at the limit does not flap.
RESUME_MARGIN = 1.1


class Usage(NamedTuple):
    total: int
    used: int
    free: int


UsageFn = Callable[[str], Usage]


class DiskGuard:
    def __init__(self, cfg: Config, usage: UsageFn = shutil.disk_usage) -> None:  # type: ignore[assignment]
        self.cfg = cfg
        self.usage = usage
        self.low: str | None = None
        """Why claiming is paused (one sentence), or None while there is room."""

    def check(self) -> str | None:
        threshold = self.cfg.disk_guard.min_free_gb * GB
        needed = threshold * RESUME_MARGIN if self.low else threshold
        short = []
        for key in ("outputs", "work"):
            path = self.cfg.folder(key)
            try:
                free = self.usage(str(path)).free
            except OSError as exc:
                short.append(f"{key}/ unreadable ({exc.strerror})")
                continue
            if free < needed:
                short.append(f"{key}/ has {free / GB:.1f} GB free")
        reason = (f"disk space low: {', '.join(short)} (disk_guard.min_free_gb = "
                  f"{self.cfg.disk_guard.min_free_gb:g}); not claiming new jobs") if short else None
        if reason and not self.low:
            log.warning("disk space low; new jobs wait in the inbox until space is freed", reason=reason)
        elif self.low and not reason:
            log.info("disk space is back; claiming new jobs again")
        self.low = reason
        return reason
