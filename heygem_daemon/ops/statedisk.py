"""The state disk (the filesystem of the database, `folders.state`) full: nothing can be recorded, so nothing
may start that would need recording. An outage of the whole daemon, not of one task.

It begins when SQLite answers SQLITE_FULL to any write in any thread (`Database.full_since`), or when the
free space there drops under `MIN_FREE` before one does. While it lasts the daemon claims nothing and starts
no task (`service.py` holds intake and the slots; chat and delivery wait), a slot whose render finished keeps
its outcome until it can be recorded (`workers.Slot`), `status` says why (`daemon.json`, written over itself
when no new copy fits) and the operator is alerted once, straight through the chat targets: the outbox is in
the full database. It ends by itself once the folder has `RESUME_FREE` and takes a real write.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Callable

from heygem_daemon.fs.ops import temp_name
from heygem_daemon.log import get_logger
from heygem_daemon.ops.sdnotify import Notifier
from heygem_daemon.state.db import Database

log = get_logger("heygem.statedisk")
MIB = 1024 ** 2
# Under this the disk counts as full before SQLite has to say so (the WAL grows by pages as it writes).
MIN_FREE = 1 * MIB
# Room needed to go on again, well above MIN_FREE so a disk hovering at the edge does not flap.
RESUME_FREE = 8 * MIB
PROBE_BYTES = 256 * 1024
ALERT_KEY = "state-disk-full"
# While it waits to start, the daemon asks systemd for this much more start time, this often.
START_EXTEND_SECONDS = 30.0
START_STATUS_EVERY = 10.0


class StateDisk:
    """Called from the daemon's main loop; `full` says why the daemon waits, or None."""

    def __init__(self, folder: Path, db: Database | None, alert_now: Callable[[str, str], object],
                 usage: Callable[[str], "shutil._ntuple_diskusage"] = shutil.disk_usage) -> None:
        self.folder, self.db, self.alert_now, self.usage = folder, db, alert_now, usage
        self.full: str | None = None

    def check(self) -> bool:
        """Look at the disk; True when the outage began or ended now."""
        free = self._free()
        if self.full is None:
            if self._full_since() is None and (free is None or free >= MIN_FREE):
                return False
            self._begin(free)
            return True
        if free is not None and free >= RESUME_FREE and self._takes_a_write():
            if self.db is not None:
                self.db.writable_again()
            log.info("state disk has room again; the daemon goes on", folder=str(self.folder),
                     free_mib=round(free / MIB, 1), full_for_seconds=round(time.time() - self._since))
            self.full = None
            return True
        return False

    def _full_since(self) -> float | None:
        return self.db.full_since if self.db is not None else None

    def _begin(self, free: int | None) -> None:
        self._since = self._full_since() or time.time()
        if self.db is not None:
            self.db.full_since = self._since  # writers learn it before they try
        room = f"{free / MIB:.1f} MiB free" if free is not None else "cannot tell the free space"
        self.full = (f"state disk full: {self.folder} ({room}); nothing can be recorded, so no job is claimed and "
                     f"no task starts until there is room ({RESUME_FREE // MIB} MiB)")
        log.error("state disk full; the daemon waits until there is room (nothing is claimed, no task starts, "
                  "finished renders are held)", folder=str(self.folder), free_mib=round((free or 0) / MIB, 1))
        self.alert_now(ALERT_KEY, f"The state disk is full: {self.folder} ({room}). The daemon cannot record "
                                  "anything, so it claims no new job and starts no task; renders that finish are "
                                  "held until they can be recorded. Free space there: it goes on by itself.")

    def _free(self) -> int | None:
        try:
            return self.usage(str(self.folder)).free
        except OSError:
            return None

    def _takes_a_write(self) -> bool:
        """A real write of some size, so a quota or a read-only remount does not pass for room."""
        probe = temp_name(self.folder / "room-check")
        try:
            with open(probe, "wb") as fh:
                fh.write(b"\0" * PROBE_BYTES)
                fh.flush()
                os.fsync(fh.fileno())
            return True
        except OSError:
            return False
        finally:
            probe.unlink(missing_ok=True)


def wait_for_room(folder: Path, stopping: Callable[[], bool], alert_now: Callable[[str, str], object],
                  systemd: Notifier) -> bool:
    """Before the store is opened: on a full state disk SQLite cannot even open it (its -shm file), so the
    daemon waits here — said once, alerted once, systemd's start timeout stretched — until there is room.
    False when a stop came first."""
    disk = StateDisk(folder, None, alert_now)
    disk.check()
    told = 0.0
    while disk.full is not None:
        if stopping():
            return False
        if time.monotonic() - told >= START_STATUS_EVERY:
            told = time.monotonic()
            systemd.send(f"STATUS={disk.full}", f"EXTEND_TIMEOUT_USEC={int(START_EXTEND_SECONDS * 1_000_000)}")
        time.sleep(0.2)
        disk.check()
    return True
