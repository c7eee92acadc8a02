"""Disk guard: below a free-space threshold on outputs/ or work/, no new jobs are claimed.

Files wait in the inbox meanwhile (the watcher keeps watching); claiming resumes once space is back.
A folder every job needs that cannot take a file at all (read-only, gone, not ours) is an outage of the
environment (`folder_fault`): tasks wait without using attempts and go on once it is usable again.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable, NamedTuple

from heygem_daemon.config import Config
from heygem_daemon.fs.ops import temp_name
from heygem_daemon.log import get_logger
from heygem_daemon.state import Store

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


# The folders every task writes to: one that cannot be written is the environment's fault, not the job's.
SHARED_FOLDERS = ("work", "outputs")


class FolderFault(NamedTuple):
    dependency: str
    reason: str
    hint: str


def folder_fault(cfg: Config) -> FolderFault | None:
    """The first of work/ and outputs/ that cannot take a new file now (a real create and remove, so a
    read-only mount, a missing folder or lost permissions all show), or None when both can."""
    for key in SHARED_FOLDERS:
        path = cfg.folder(key)
        try:
            _write_check(path)
        except OSError as exc:
            return FolderFault(f"{key}/", f"{key}/ ({path}) cannot be written: {exc.strerror or exc}",
                               f"make {path} writable for the daemon's user again (a read-only remount, lost "
                               "permissions, an unmounted disk); tasks wait and go on by themselves")
    return None


def wake_folder_waiters(cfg: Config, store: Store, now: float) -> list[str] | None:
    """Tasks waiting for work/ or outputs/ are due at once when it can be written again (not at the end of
    their backoff); returns the folders whose waiters were woken, or None when no task waits for one."""
    waited = {o["dependency"] for o in store.tasks.outages()} & {f"{key}/" for key in SHARED_FOLDERS}
    if not waited:
        return None
    woken = []
    for key in SHARED_FOLDERS:
        if f"{key}/" not in waited:
            continue
        try:
            _write_check(cfg.folder(key))
        except OSError:
            continue
        if store.tasks.wake([f"{key}/"], now):
            woken.append(f"{key}/")
    return woken


def _write_check(folder: Path) -> None:
    probe = temp_name(folder / "write-check")  # a hidden own temp: watchers and sweeps know the name
    os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    os.unlink(probe)
