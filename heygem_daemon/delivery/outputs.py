"""Finished videos under outputs/: watchdog events and rescans mark paths, the settle clock says when they count.

Whatever wrote the file (our engine, or another tool pointed at the folder), a video is taken only once
its size and mtime stopped changing for watcher.settle_seconds; partial and hidden names never count.

outputs/ keeps growing (thousands of earlier videos), so work follows changes, not the tree: a file event
marks that file, a new or moved-in folder has only its own subtree walked. A full walk happens at start
and when asked (touch(None): the kernel dropped events, the folder came back). With inotify that is all:
the kernel reports every change on a local filesystem and says when it lost some, so idle costs nothing
however many videos were delivered. Polling (network mounts) adds the periodic rescan as a net, looking
only at entries whose ctime moved since the previous walk (the poller itself stats the whole tree anyway).
"""

from __future__ import annotations

import os
import stat
import threading
import time
from pathlib import Path
from typing import Callable

from heygem_daemon.config import Watcher
from heygem_daemon.intake.pairing import FileInfo
from heygem_daemon.fs.stability import NameFilter, Snapshot, StabilityTracker
from heygem_daemon.media.kinds import VIDEO_EXTS


class OutputsWatcher:
    rescan_slack_ns = 1_000_000_000
    """The periodic rescan also looks at entries changed this long before the previous walk began: coarse
    timestamps (1 s on some network filesystems) and a write landing while that walk ran."""

    def __init__(self, root: Path, settings: Watcher) -> None:
        self.root = root
        self.names = NameFilter(settings)
        self.tracker = StabilityTracker(settings.settle_seconds)
        self.rescan_seconds = settings.rescan_seconds
        self.periodic = True
        """Whether the periodic rescan runs: only while polling (set by the delivery service from the mode)."""
        self._lock = threading.Lock()
        self._dirty: set[str] = set()
        self._dirty_dirs: set[str] = set()
        self._full = True
        self._next_rescan = 0.0
        self._walked_since_ns = 0
        """ctime (wall clock) from which the next periodic rescan must look: the previous walk's start."""

    def touch(self, path: str | None) -> None:
        """Called from watchdog's thread: a path changed (a folder: walk it; None: walk everything)."""
        with self._lock:
            if path is None:
                self._full = True
            elif os.path.isdir(path):
                self._dirty_dirs.add(path)
            else:
                rel = os.path.relpath(path, self.root)
                if not rel.startswith(".."):
                    self._dirty.add(rel)

    def apply(self, settings: Watcher) -> None:
        """Reloaded watcher settings (name patterns, settle and rescan times); the next step uses them."""
        with self._lock:
            self.names = NameFilter(settings)
            self.tracker.settle = settings.settle_seconds
            self.rescan_seconds = settings.rescan_seconds
            self._full = True  # new name patterns may let files through that were ignored

    def candidate(self, rel: str) -> bool:
        parts = rel.split(os.sep)
        if any(self.names.ignored(p) or self.names.partial_write(p) for p in parts):
            return False
        return os.path.splitext(parts[-1])[1].lower() in VIDEO_EXTS

    def _walk(self, top: str, since_ns: int = 0) -> set[str]:
        """Files under `top` (relative to the root) whose ctime is at least since_ns; ctime moves on
        every write, rename and chmod, so a file untouched since the last walk is skipped unread."""
        found: set[str] = set()
        stack = [top]
        while stack:
            try:
                it = os.scandir(stack.pop())
            except OSError:  # gone meanwhile, or not ours to read
                continue
            with it:
                for entry in it:
                    try:
                        if entry.is_dir(follow_symlinks=False):
                            if not self.names.ignored(entry.name):
                                stack.append(entry.path)
                            continue
                        rel = os.path.relpath(entry.path, self.root)
                        # Only videos are delivered: links.json, zips and the like are never even stat'ed.
                        if self.candidate(rel) and (
                                not since_ns or entry.stat(follow_symlinks=False).st_ctime_ns >= since_ns):
                            found.add(rel)
                    except OSError:
                        continue
        return found

    def _snapshot(self, rel: str) -> Snapshot | None:
        try:
            st = os.lstat(self.root / rel)
        except OSError:
            return None
        if not stat.S_ISREG(st.st_mode):  # a symlink could point anywhere; only real files leave the machine
            return None
        return Snapshot(rel, False, (FileInfo(rel, st.st_size, st.st_mtime_ns, st.st_mode),), False, False)

    def step(self, now: float, known: Callable[[str], bool]) -> list[tuple[str, int]]:
        """Observe what changed; return (relative path, size) of videos settled and not `known` yet."""
        with self._lock:
            dirty, self._dirty = self._dirty, set()
            dirs, self._dirty_dirs = self._dirty_dirs, set()
            full, self._full = self._full, False
        for folder in dirs:
            dirty |= self._walk(folder)
        if full or (self.periodic and now >= self._next_rescan):
            started = time.time_ns()
            dirty |= self._walk(str(self.root), 0 if full else self._walked_since_ns - self.rescan_slack_ns)
            self._walked_since_ns = started
            self._next_rescan = now + self.rescan_seconds
        for rel in dirty | set(self.tracker.entries):
            snap = self._snapshot(rel) if self.candidate(rel) and not known(rel) else None
            if snap is None:
                self.tracker.forget(rel)
            else:
                self.tracker.observe(snap, now)
        settled = [(rel, t.snap.files[0].size) for rel, t in self.tracker.entries.items()
                   if now >= self.tracker.stable_at(rel)]
        for rel, _ in settled:
            self.tracker.forget(rel)
        return settled
