"""Finished videos under outputs/: watchdog events and rescans mark paths, the settle clock says when they count.

Whatever wrote the file (our engine, or another tool pointed at the folder), a video is taken only once
its size and mtime stopped changing for watcher.settle_seconds; partial and hidden names never count.
"""

from __future__ import annotations

import os
import stat
import threading
from pathlib import Path
from typing import Callable

from heygem_daemon.config import Watcher
from heygem_daemon.intake.pairing import FileInfo
from heygem_daemon.fs.stability import NameFilter, Snapshot, StabilityTracker
from heygem_daemon.media.kinds import VIDEO_EXTS


class OutputsWatcher:
    def __init__(self, root: Path, settings: Watcher) -> None:
        self.root = root
        self.names = NameFilter(settings)
        self.tracker = StabilityTracker(settings.settle_seconds)
        self.rescan_seconds = settings.rescan_seconds
        self._lock = threading.Lock()
        self._dirty: set[str] = set()
        self._rescan = True
        self._next_rescan = 0.0

    def touch(self, path: str | None) -> None:
        """Called from watchdog's thread: a path changed (None or a folder: look at everything again)."""
        with self._lock:
            if path is None or os.path.isdir(path):
                self._rescan = True
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
            self._rescan = True

    def candidate(self, rel: str) -> bool:
        parts = rel.split(os.sep)
        if any(self.names.ignored(p) or self.names.partial_write(p) for p in parts):
            return False
        return os.path.splitext(parts[-1])[1].lower() in VIDEO_EXTS

    def _walk(self) -> set[str]:
        found: set[str] = set()
        for folder, dirs, files in os.walk(self.root):
            dirs[:] = [d for d in dirs if not self.names.ignored(d)]
            found.update(os.path.relpath(os.path.join(folder, f), self.root) for f in files)
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
            rescan = self._rescan or now >= self._next_rescan
            self._rescan = False
        if rescan:
            dirty |= self._walk()
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
