"""Folder watching with watchdog: inotify on local disks, polling on network mounts (no events cross NFS/SMB).

Events only say where to look; three cases need more than that and are handled here:
- the kernel's event queue overflowed (events were dropped): the consumer is asked for a full rescan;
- the watched folder itself was deleted or renamed away (an inotify watch follows the folder, not its path):
  once a folder exists at the path again it is watched again;
- which files are open for writing (`OpenWrites`): inotify says when a file was written to (IN_MODIFY) and
  when its writer closed it (IN_CLOSE_WRITE), so a writer that pauses is told apart from one that is done.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any, Callable, Literal

import psutil
from watchdog.events import (
    DirDeletedEvent, DirModifiedEvent, DirMovedEvent, FileClosedEvent, FileClosedNoWriteEvent, FileDeletedEvent,
    FileModifiedEvent, FileMovedEvent, FileOpenedEvent, FileSystemEvent, FileSystemEventHandler,
)
from watchdog.observers.api import BaseObserver
from watchdog.observers.inotify import InotifyEmitter, InotifyObserver
from watchdog.observers.inotify_c import InotifyConstants
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
REARM_POLL = 0.5
"""How often a deleted watched folder is looked for (seconds)."""
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


class QueueOverflowEvent(DirModifiedEvent):
    """The kernel's inotify queue overflowed (fs.inotify.max_queued_events): events were lost."""


class WatchedFolderMovedEvent(DirDeletedEvent):
    """The watched folder was renamed (IN_MOVE_SELF): its watch now follows it wherever it went."""


class OpenWrites:
    """The files written to and not closed since (absolute paths), as inotify reports them: IN_MODIFY marks a
    file, IN_CLOSE_WRITE (also when a writer dies: the kernel closes its files) clears it. smbd writes
    through the local filesystem, so a Samba client's upload shows here too. Polling cannot see any of this:
    the set stays empty. Read from the intake thread, written from the observer's."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._paths: set[str] = set()

    def writing(self, path: str) -> bool:
        with self._lock:
            return path in self._paths

    def forget_all(self) -> None:
        """Events were lost: a stale "still writing" would hold a file back until it counts as stalled,
        so forget them all and let the settle clock judge until the next write is seen."""
        with self._lock:
            self._paths.clear()

    def follow(self, event: FileSystemEvent) -> None:
        src = os.fsdecode(event.src_path)
        with self._lock:
            if isinstance(event, FileModifiedEvent):
                self._paths.add(src)
            elif isinstance(event, (FileClosedEvent, FileDeletedEvent)):
                self._paths.discard(src)
            elif isinstance(event, FileMovedEvent) and src in self._paths:
                self._paths.discard(src)
                self._paths.add(os.fsdecode(event.dest_path))
            elif isinstance(event, (DirDeletedEvent, DirMovedEvent)):
                # A folder moved out (a claim, a delete) takes its files' events with it.
                inside = src.rstrip("/") + "/"
                self._paths = {p for p in self._paths if not p.startswith(inside)}


class _OverflowReportingEmitter(InotifyEmitter):
    def on_thread_start(self) -> None:
        super().on_thread_start()
        group = self._inotify
        assert group is not None
        rebuild = group.on_queue_overflow

        def overflowed() -> None:
            rebuild()  # watchdog re-adds the recursive watches; what the lost events said is ours to recover
            self.queue_event(QueueOverflowEvent(self.watch.path))

        group.on_queue_overflow = overflowed  # type: ignore[method-assign]

    def get_event_mask_from_filter(self) -> Any:
        return super().get_event_mask_from_filter() | InotifyConstants.IN_MOVE_SELF

    def build_and_queue_event(self, event: Any, *, full_events: bool = False) -> None:
        # watchdog reports no event for IN_MOVE_SELF; of the watched folder itself, it means the path is
        # no longer watched (`mv inbox inbox.old; mkdir inbox`).
        ev = getattr(event, "ev", None)
        if ev is not None and ev.is_move_self and os.fsdecode(event.path) == os.fsdecode(self.watch.path):
            self.queue_event(WatchedFolderMovedEvent(self.watch.path))
            return
        super().build_and_queue_event(event, full_events=full_events)


class _InotifyObserver(InotifyObserver):
    def __init__(self) -> None:
        super().__init__()
        self._emitter_class = _OverflowReportingEmitter


class _Forward(FileSystemEventHandler):
    def __init__(self, root: Path, touch: Callable[[str | None], None], observer: BaseObserver, what: str,
                 writes: OpenWrites | None) -> None:
        self.root = os.path.abspath(root)
        self.touch = touch
        self.observer = observer
        self.what = what
        self.writes = writes

    def on_any_event(self, event: FileSystemEvent) -> None:
        if isinstance(event, QueueOverflowEvent):
            log.warning(f"{self.what}: the kernel dropped file events (inotify queue overflow); rescanning",
                        folder=self.root, hint="raise fs.inotify.max_queued_events if this happens often")
            if self.writes is not None:
                self.writes.forget_all()
            self.touch(None)
            return
        if isinstance(event, DirDeletedEvent) and os.path.abspath(os.fsdecode(event.src_path)) == self.root:
            if self.writes is not None:
                self.writes.forget_all()
            gone = "renamed away" if isinstance(event, WatchedFolderMovedEvent) else "deleted"
            threading.Thread(target=self._rearm, args=(gone,), name=f"rearm {self.what}", daemon=True).start()
            return
        if self.writes is not None:
            self.writes.follow(event)
        # A folder's "modified" only repeats what its member's own event says; opening or reading changes
        # nothing. Skipping them keeps the work per change small (outputs/ may hold many thousand files).
        if type(event) in (DirModifiedEvent, FileOpenedEvent, FileClosedNoWriteEvent):
            return
        # Moved-in files give no close event: the destination path is what matters.
        for path in (event.src_path, getattr(event, "dest_path", "")):
            if path:
                self.touch(os.fsdecode(path))

    def _rearm(self, gone: str) -> None:
        """The watched folder was deleted or renamed, and its path with it: watch the path again once a folder
        is there (the old watch, if it still follows the renamed folder, goes)."""
        log.warning(f"{self.what} folder {gone}; it is watched again as soon as it is re-created", folder=self.root)
        while not self.observer.stopped_event.wait(REARM_POLL):
            if os.path.isdir(self.root):
                self.observer.unschedule_all()
                self.observer.schedule(self, self.root, recursive=True)
                log.info(f"{self.what} folder is back; watching it again", folder=self.root)
                self.touch(None)
                return


def start_watcher(inbox: Path, mode: Literal["auto", "inotify", "polling"], poll_interval: float,
                  touch: Callable[[str | None], None], what: str = "inbox",
                  writes: OpenWrites | None = None) -> tuple[BaseObserver, str]:
    """Watch `inbox` (any folder) recursively; `writes`, when given, follows which files are open for writing."""
    fstype = filesystem_type(inbox)
    chosen = choose_mode(mode, fstype)
    observer: BaseObserver = PollingObserver(timeout=poll_interval) if chosen == "polling" else _InotifyObserver()
    observer.schedule(_Forward(inbox, touch, observer, what, writes), str(inbox), recursive=True)
    observer.daemon = True
    observer.start()
    log.info(f"watching {what}", folder=str(inbox), mode=chosen, fstype=fstype)
    return observer, chosen
