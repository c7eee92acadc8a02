"""Scheduled cleanup (APScheduler, in the daemon): sweeps that keep disks and the store bounded.

Each sweep is one function taking a `Sweep` and calling `sweep.remove(path)` for what must go; the
`Sweep` refuses anything outside the daemon's own folders, never follows a symlink, and counts the bytes.
A sweep's last run is kept in the store, so runs missed while the daemon was down happen once at start.

To add a sweep (delivery: uploaded outputs, expired zips, stale multipart uploads), write the function
in its own module and add one `SweepJob` line to `SWEEPS`.
"""

from __future__ import annotations

import importlib
import os
import re
import stat
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.interval import IntervalTrigger

from heygem_daemon.ops import metrics
from heygem_daemon.config import Config
from heygem_daemon.fs.files import open_paths
from heygem_daemon.fs.ops import is_own_temp, remove_tree
from heygem_daemon.log import get_logger
from heygem_daemon.ops.orphans import holds_inputs, send_back
from heygem_daemon.state import TERMINAL_JOB_STATES, Store

log = get_logger("heygem.cleanup")
DAY = 86400.0
HOUR = 3600.0
# The daemon owns these folders outright; the inbox belongs to the people dropping files.
OWNED_FOLDERS = ("work", "outputs", "failed", "archive")
OWN_TEMP_GRACE = 15 * 60.0
"""Our own hidden temps (zips, links.json, error.json, cross-disk moves) are written in seconds to minutes:
once this old and held open by no process, a kill cut their write short."""
_DATE_DIR = re.compile(r"^\d{4}-\d{2}-\d{2}$")
LOGGED_PATHS = 50


@dataclass
class Sweep:
    """One run of one sweep: what it may delete, and what it did."""

    cfg: Config
    store: Store
    now: float
    removed: list[str] = field(default_factory=list)
    freed: int = 0

    def remove(self, path: Path) -> None:
        """Delete a file or folder inside the daemon's own folders, without following symlinks."""
        parent = path.parent.resolve()
        target = parent / path.name
        roots = [self.cfg.folder(k).resolve() for k in OWNED_FOLDERS]
        if not any(target != r and target.is_relative_to(r) for r in roots):
            raise ValueError(f"refusing to delete {path}: not inside {', '.join(OWNED_FOLDERS)}")
        try:
            st = os.lstat(target)
        except FileNotFoundError:
            return
        if stat.S_ISLNK(st.st_mode):
            return  # not something the daemon made
        self.freed += tree_size(target)
        remove_tree(target)
        self.removed.append(str(target))


@dataclass(frozen=True)
class SweepJob:
    name: str
    every_hours: Callable[[Config], float]
    """How often it runs, read from the sweep's own config keys; 0 turns it off."""
    target: str
    """`module:function` taking a Sweep; imported when scheduled, so sweeps may live anywhere."""


SWEEPS: list[SweepJob] = [
    SweepJob("temp", lambda c: c.cleanup.temp_every_hours, "heygem_daemon.ops.cleanup:sweep_temp"),
    SweepJob("work", lambda c: c.cleanup.work_every_hours, "heygem_daemon.ops.cleanup:sweep_work"),
    SweepJob("archive", lambda c: c.cleanup.archive_every_hours, "heygem_daemon.ops.cleanup:sweep_archive"),
    SweepJob("rows", lambda c: c.cleanup.rows_every_hours, "heygem_daemon.ops.cleanup:sweep_rows"),
    SweepJob("outputs", lambda c: c.cleanup.outputs_every_hours, "heygem_daemon.delivery.sweeps:uploaded_outputs"),
    SweepJob("zips", lambda c: c.cleanup.zips_every_hours, "heygem_daemon.delivery.sweeps:expired_zips"),
    SweepJob("stale_uploads", lambda c: c.cleanup.stale_uploads_every_hours,
             "heygem_daemon.delivery.sweeps:stale_uploads"),
    SweepJob("heygem_codes", lambda c: c.cleanup.temp_every_hours, "heygem_daemon.engines.heygem.codes:sweep_codes"),
    SweepJob("speech_cache", lambda c: c.cleanup.temp_every_hours, "heygem_daemon.speech.sweep:sweep_speech_cache"),
    SweepJob("web_uploads", lambda c: c.web.uploads_every_hours, "heygem_daemon.web.uploads:expired_uploads"),
    SweepJob("backup", lambda c: c.cleanup.backup_every_hours, "heygem_daemon.ops.backup:backup_database"),
]


def tree_size(path: Path) -> int:
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        return st.st_size if stat.S_ISREG(st.st_mode) else 0
    total = 0
    for dirpath, _dirs, files in os.walk(path, followlinks=False):
        for name in files:
            try:
                st = os.lstat(os.path.join(dirpath, name))
            except FileNotFoundError:
                continue
            total += st.st_size if stat.S_ISREG(st.st_mode) else 0
    return total


def _older(path: str, cutoff: float) -> bool:
    try:
        return os.lstat(path).st_mtime < cutoff
    except FileNotFoundError:
        return False


# --- the sweeps ------------------------------------------------------------------------------------


def sweep_temp(sweep: Sweep) -> None:
    """Leftovers of interrupted writes: engine `.part` files older than cleanup.temp_hours that no running
    task is writing, and our own hidden temps (fs/ops.py OWN_TEMP) older than OWN_TEMP_GRACE that no
    process holds open."""
    part_cutoff = sweep.now - sweep.cfg.cleanup.temp_hours * HOUR
    own_cutoff = sweep.now - OWN_TEMP_GRACE
    busy = {os.path.abspath(t.output + ".part") for t in sweep.store.tasks.select(states=("running",))}
    held = open_paths()

    def leftover(path: str, name: str, parts: bool) -> bool:
        if is_own_temp(name):
            in_use = path in held or any(h.startswith(path + os.sep) for h in held)  # a folder still copying
            return not in_use and _older(path, own_cutoff)
        return parts and name.endswith(".part") and path not in busy and _older(path, part_cutoff)

    for key in ("outputs", "failed", "archive", "work"):
        parts = key != "work"  # engines keep their own scratch files under work/
        for dirpath, dirs, files in os.walk(sweep.cfg.folder(key), followlinks=False):
            for name in list(dirs):
                if leftover(os.path.join(dirpath, name), name, parts):
                    dirs.remove(name)  # a half-copied folder: take it whole, do not descend
                    sweep.remove(Path(dirpath, name))
            for name in files:
                if leftover(os.path.join(dirpath, name), name, parts):
                    sweep.remove(Path(dirpath, name))


def sweep_work(sweep: Sweep) -> None:
    """work/<job-id>/ of jobs that finished (or that the store no longer knows), once untouched for
    cleanup.temp_hours: the grace keeps a folder `retry` is just moving inputs into. Inputs of a job the
    store does not know are never deleted: they go back to the inbox (ops/orphans.py)."""
    cutoff = sweep.now - sweep.cfg.cleanup.temp_hours * HOUR
    work = sweep.cfg.folder("work")
    for entry in os.scandir(work):
        # Dot folders are engine caches (work/.cache/wav2lip-boxes), not jobs; they expire themselves.
        if entry.name.startswith(".") or not entry.is_dir(follow_symlinks=False) or not _older(entry.path, cutoff):
            continue
        state = sweep.store.jobs.state(entry.name)
        if state is None and holds_inputs(work / entry.name):
            send_back(sweep.cfg, work / entry.name / "in")
        if state is None or state in TERMINAL_JOB_STATES:
            sweep.remove(work / entry.name)


def sweep_archive(sweep: Sweep) -> None:
    """archive/<yyyy-mm-dd>/ once the whole day is older than cleanup.archive_days."""
    cutoff = sweep.now - sweep.cfg.cleanup.archive_days * DAY
    archive = sweep.cfg.folder("archive")
    for entry in os.scandir(archive):
        if not (_DATE_DIR.match(entry.name) and entry.is_dir(follow_symlinks=False)):
            continue
        try:
            day_start = time.mktime(time.strptime(entry.name, "%Y-%m-%d"))
        except ValueError:
            continue
        if day_start + DAY <= cutoff:
            sweep.remove(archive / entry.name)


def sweep_rows(sweep: Sweep) -> None:
    """Every table stays bounded. Jobs finished more than cleanup.rows_days ago (failed:
    cleanup.failed_rows_days) go with their tasks, attempts, batch, deliveries and upload parts; ad-hoc
    batches reported more than rows_days ago with their deliveries; sent or given-up notifications older
    than rows_days; upload parts of files delivered a day ago (they only serve a resume).

    A forgotten delivery whose video is still in outputs/ would be taken again by the outputs rescan, so
    its path stays in a small `delivered` marker, and a marker goes only once its file is gone (the
    `outputs` sweep or an operator removed it): rows of what is still on disk are bounded by outputs/."""
    c = sweep.cfg.cleanup
    rows_before = sweep.now - c.rows_days * DAY
    names = sweep.store.jobs.delete_finished(rows_before, sweep.now - c.failed_rows_days * DAY)
    sweep.removed.extend(f"job row {name}" for name in names)
    adhoc = sweep.store.deliveries.forget_reported_adhoc(rows_before)
    sweep.removed.extend(f"ad-hoc batch row {name}" for name in adhoc)
    if sent := sweep.store.outbox.forget_ended(rows_before):
        sweep.removed.append(f"{sent} notification rows")
    if parts := sweep.store.deliveries.forget_parts_of_ended(sweep.now):
        sweep.removed.append(f"{parts} upload part rows")
    gone = [p for p in sweep.store.deliveries.delivered_marks() if not os.path.lexists(p)]
    sweep.store.deliveries.forget_marks(gone)
    if gone:
        sweep.removed.append(f"{len(gone)} delivered markers of removed files")


# --- scheduling ------------------------------------------------------------------------------------


def _resolve(target: str) -> Callable[[Sweep], None]:
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)  # type: ignore[no-any-return]


class Cleanup:
    name = "cleanup"

    def __init__(self, cfg: Config, store: Store, clock: Callable[[], float] = time.time) -> None:
        self.cfg = cfg
        self.store = store
        self.clock = clock
        self.scheduler = BackgroundScheduler(timezone=timezone.utc)

    def start(self) -> None:
        self._schedule()
        self.scheduler.start()

    def stop(self) -> None:
        if self.scheduler.running:
            self.scheduler.shutdown(wait=True)

    def alive(self) -> bool:
        # APScheduler 3 runs its loop in BackgroundScheduler._thread and has no public liveness check.
        thread = getattr(self.scheduler, "_thread", None)
        return self.scheduler.running and thread is not None and thread.is_alive()

    def apply(self, cfg: Config) -> None:
        """New config (SIGHUP): sweeps read retentions when they run; intervals are rescheduled here."""
        self.cfg = cfg
        self.scheduler.remove_all_jobs()
        self._schedule()

    def _schedule(self) -> None:
        last = self.store.ops.cleanup_runs()
        now = self.clock()
        for job in SWEEPS:
            every = job.every_hours(self.cfg) * HOUR
            if every <= 0:
                continue
            # Missed while down (or never run): once now, however many runs were missed.
            prev = last.get(job.name)
            first = now if prev is None or prev + every <= now else prev + every
            self.scheduler.add_job(
                self.run, IntervalTrigger(seconds=every), args=[job], id=job.name, name=f"cleanup {job.name}",
                next_run_time=datetime.fromtimestamp(first, timezone.utc), coalesce=True, max_instances=1,
                misfire_grace_time=None, replace_existing=True)

    def run(self, job: SweepJob) -> Sweep:
        sweep = Sweep(self.cfg, self.store, self.clock())
        try:
            _resolve(job.target)(sweep)
        except Exception:
            log.exception("cleanup sweep failed; it runs again at its next time", sweep=job.name)
        self.store.ops.record_cleanup_run(job.name, sweep.now, len(sweep.removed), sweep.freed)
        metrics.CLEANUP_BYTES.labels(job.name).inc(sweep.freed)
        log.info("cleanup done", sweep=job.name, removed=len(sweep.removed), bytes_freed=sweep.freed,
                 paths=sweep.removed[:LOGGED_PATHS])
        return sweep
