"""Inbox watching with watchdog: inotify on local disks, polling on network mounts (no events cross NFS/SMB)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Literal

import psutil
from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver
from watchdog.observers.polling import PollingObserver

from heygem_daemon.log import get_logger

try:
    from watchdog.observers.inotify_move_event_grouper import InotifyMoveEventGrouper

    # watchdog holds every IN_MOVED_FROM for 0.5 s to pair it with its IN_MOVED_TO, and that stalls the
    # whole event queue behind it. Intake only needs the paths (it re-stats everything), not the pairing,
    # so a file renamed into the inbox (how careful clients finish an upload) is seen at once.
    InotifyMoveEventGrouper.delay = 0.0
except ImportError:  # not Linux, or a watchdog without the grouper: nothing to tune
    pass

log = get_logger("heygem.watcher")
NETWORK_FS = ("nfs", "nfs4", "cifs", "smb3", "smbfs", "9p", "ceph", "glusterfs", "afs", "sshfs", "davfs")


def filesystem_type(path: Path) -> str:
    """The type of the filesystem holding `path` (the longest mount point that holds it, as psutil lists them)."""
    target = os.path.realpath(path)
    best, fstype = "", "unknown"
    for part in psutil.disk_partitions(all=True):
        mnt = part.mountpoint
        inside = target == mnt or target.startswith(mnt.rstrip("/") + "/")
        if inside and len(mnt) >= len(best):
            best, fstype = mnt, part.fstype
    return fstype


def choose_mode(mode: Literal["auto", "inotify", "polling"], fstype: str) -> Literal["inotify", "polling"]:
    if mode != "auto":
        return mode
    if fstype in NETWORK_FS or fstype.startswith("fuse"):
        return "polling"
    return "inotify"


class _Forward(FileSystemEventHandler):
    def __init__(self, touch: Callable[[str | None], None]) -> None:
        self.touch = touch

    def on_any_event(self, event: FileSystemEvent) -> None:
        # Moved-in files give no close event: the destination path is what matters.
        for path in (event.src_path, getattr(event, "dest_path", "")):
            if path:
                self.touch(os.fsdecode(path))


def start_watcher(inbox: Path, mode: Literal["auto", "inotify", "polling"], poll_interval: float,
                  touch: Callable[[str | None], None], what: str = "inbox") -> tuple[BaseObserver, str]:
    fstype = filesystem_type(inbox)
    chosen = choose_mode(mode, fstype)
    observer: BaseObserver = PollingObserver(timeout=poll_interval) if chosen == "polling" else Observer()
    observer.schedule(_Forward(touch), str(inbox), recursive=True)
    observer.daemon = True
    observer.start()
    log.info(f"watching {what}", folder=str(inbox), mode=chosen, fstype=fstype)
    return observer, chosen
