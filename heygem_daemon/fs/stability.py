"""When is a dropped entry completely written? When its signature stops changing for settle_seconds, and
(where inotify can tell) none of its files is still open for writing."""

from __future__ import annotations

import fnmatch
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from heygem_daemon.config import Watcher
from heygem_daemon.fs.ops import is_own_temp
from heygem_daemon.intake.pairing import READY_MARKER, FileInfo

Signature = tuple[tuple[str, int, int, int], ...]


class NameFilter:
    """Names people's tools leave behind (temp files, Finder/Explorer droppings) are never inputs."""

    def __init__(self, settings: Watcher) -> None:
        self.ignore = settings.ignore
        self.partial = settings.partial
        self.ignore_hidden = settings.ignore_hidden

    def ignored(self, name: str) -> bool:
        if self.ignore_hidden and name.startswith(".") and name != READY_MARKER:
            return True
        return any(fnmatch.fnmatchcase(name, pat) for pat in self.ignore)

    def partial_write(self, name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, pat) for pat in self.partial)


def _info(rel: str, st: os.stat_result) -> FileInfo:
    return FileInfo(rel, st.st_size, st.st_mtime_ns, st.st_mode)


@dataclass(frozen=True)
class Snapshot:
    """What one top-level inbox entry looks like right now (lstat only: links are never followed)."""

    name: str
    is_dir: bool
    files: tuple[FileInfo, ...]
    """For a file: itself. For a folder: its members, ignored names excluded."""
    ready_marker: bool
    partial: bool
    """A member has a name that means it is still being written."""
    writing: tuple[str, ...] = ()
    """Members written to and not closed since (inotify): their writer may only be pausing."""

    @property
    def signature(self) -> Signature:
        return tuple((f.rel, f.size, f.mtime_ns, f.mode) for f in self.files) + (
            ("", int(self.ready_marker), int(self.partial), len(self.writing)),)


def snapshot(inbox: Path, name: str, names: NameFilter,
             writing: Callable[[str], bool] = lambda _path: False) -> Snapshot | None:
    """Stat one top-level entry; None when it is gone or ignored. Raises OSError (PermissionError) when
    the entry cannot be read: the caller decides how to say so. `writing(path)`: is that file still open
    for writing (OpenWrites)."""
    if names.ignored(name) or name == READY_MARKER:
        return None
    try:
        st = os.lstat(inbox / name)
    except FileNotFoundError:
        return None
    if not stat.S_ISDIR(st.st_mode):
        being_written = (name,) if writing(str(inbox / name)) else ()
        return Snapshot(name, False, (_info(name, st),), False, names.partial_write(name), being_written)
    files: list[FileInfo] = []
    open_now: list[str] = []
    ready = partial = False
    try:
        with os.scandir(inbox / name) as it:
            for entry in it:
                if entry.name == READY_MARKER:
                    ready = True
                    continue
                if is_own_temp(entry.name):
                    continue  # our own write cut short by a kill (e.g. error.json's temp): nobody is writing
                if names.partial_write(entry.name):
                    partial = True
                if names.ignored(entry.name):
                    continue
                files.append(_info(f"{name}/{entry.name}", entry.stat(follow_symlinks=False)))
                if writing(entry.path):
                    open_now.append(files[-1].rel)
    except FileNotFoundError:
        return None
    files.sort(key=lambda f: f.rel)
    return Snapshot(name, True, tuple(files), ready, partial, tuple(sorted(open_now)))


@dataclass
class Tracked:
    snap: Snapshot
    changed_at: float


class StabilityTracker:
    """Remembers each entry's last signature and when it last changed (a monotonic clock)."""

    def __init__(self, settle_seconds: float) -> None:
        self.settle = settle_seconds
        self.entries: dict[str, Tracked] = {}

    def observe(self, snap: Snapshot, now: float) -> bool:
        """Record a fresh snapshot; True when it differs from the last one (or is new)."""
        old = self.entries.get(snap.name)
        if old is not None and old.snap.signature == snap.signature:
            old.snap = snap
            return False
        self.entries[snap.name] = Tracked(snap, now)
        return True

    def forget(self, name: str) -> None:
        self.entries.pop(name, None)

    def stable_at(self, name: str) -> float:
        """The moment the entry counts as completely written, if nothing changes before then."""
        return self.entries[name].changed_at + self.settle
