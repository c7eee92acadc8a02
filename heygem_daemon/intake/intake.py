"""The intake loop: inbox events and rescans in, claimed or rejected jobs out.

One thread owns all intake state, so a pair is never claimed twice; watchers only mark names dirty.
"""

from __future__ import annotations

import heapq
import os
import stat
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Callable

from heygem_daemon.config import Config
from heygem_daemon.failures import Kind, Problem
from heygem_daemon.fs.ops import move_blocker
from heygem_daemon.fs.watcher import OpenWrites
from heygem_daemon.intake.claim import ClaimBlocked, Claimer, recover_detected
from heygem_daemon.intake.inspect import Inspection, Inspector
from heygem_daemon.intake.pairing import (
    MANIFEST_NAMES, MAX_MANIFEST_BYTES, FileInfo, Outcome, Plan, Rejection, Wait, entry_problem, plan_folder,
    plan_loose, safe_name,
)
from heygem_daemon.fs.stability import NameFilter, Snapshot, StabilityTracker, snapshot
from heygem_daemon.log import get_logger
from heygem_daemon.media.face_spec import FaceRule

log = get_logger("heygem.intake")
RETRY_AFTER_ERROR = 5.0
HOLD_RECHECK = 1.0
BLOCKED_MAX_WAIT = 300.0
WARN_EVERY = 600.0
"""The same warning about the same entry (unreadable, cannot be moved) is repeated at most this often."""


@dataclass
class Probing:
    plan: Plan
    is_folder: bool
    engine: str
    preset: str
    future: Future[Inspection]
    generation: int
    signatures: dict[str, tuple]
    tries: int
    started: float


def group_key(snap: Snapshot) -> str:
    return f"d:{snap.name}" if snap.is_dir else f"f:{PurePosixPath(snap.name).stem.casefold()}"


class Intake:
    def __init__(self, cfg: Config, store_claimer: Claimer, inspector: Inspector, engines: set[str],
                 needs_face: Callable[[str], FaceRule], on_queued: Callable[[], None],
                 clock: Callable[[], float] = time.monotonic,
                 on_alert: Callable[[str, str], object] | None = None) -> None:
        self.cfg = cfg
        self.inbox = cfg.folder("inbox")
        self.claimer = store_claimer
        self.inspector = inspector
        self.engines = engines
        self.needs_face = needs_face
        self.on_queued = on_queued
        self.on_alert = on_alert
        """Tells the operator (dedupe key, text): a full disk holding claims is an outage, not a failure."""
        self.clock = clock
        self.names = NameFilter(cfg.watcher)
        self.tracker = StabilityTracker(cfg.watcher.settle_seconds)
        self.writes = OpenWrites()
        """Which inbox files are still open for writing (the inotify observer keeps it; polling: empty)."""
        self.wake = threading.Event()
        self.hold = threading.Event()
        """Set while nothing may be claimed (draining, disk low): entries wait in the inbox, still watched."""
        self._lock = threading.Lock()
        self._dirty: set[str] = set()
        self._rescan = True
        self._next_rescan = 0.0
        self._due: list[tuple[float, str]] = []
        self._members: dict[str, set[str]] = {}
        self._key_of: dict[str, str] = {}
        self._probing: dict[str, Probing] = {}
        self._new_cfg: Config | None = None
        self._blocked: dict[str, int] = {}
        """Groups whose files cannot be moved now, with how many tries failed (for the backoff)."""
        self._warned: dict[str, float] = {}
        self._undo_cut_claims = False

    def set_config(self, cfg: Config) -> None:
        """Live config (SIGHUP): settle time, timeouts, limits, name patterns; called from the main thread,
        applied by the intake thread at its next step."""
        with self._lock:
            self._new_cfg = cfg
            self._rescan = True
        self.wake.set()

    def undo_cut_claims(self) -> None:
        """After the state disk was full: a claim whose files moved but whose `queued` could not be recorded
        is undone (files back to the inbox, claimed again) at the next step, in this thread, which is the only
        one that claims — so no claim in progress is taken for a cut one."""
        self._undo_cut_claims = True
        self.wake.set()

    # --- called from watcher threads ------------------------------------------------------------

    def touch(self, path: str | None) -> None:
        """Something happened at `path` (absolute); None asks for a full rescan."""
        with self._lock:
            if path is None:
                self._rescan = True
            else:
                top = self._top_name(path)
                if top:
                    self._dirty.add(top)
        self.wake.set()

    def _top_name(self, path: str) -> str | None:
        try:
            rel = os.path.relpath(path, self.inbox)
        except ValueError:
            return None
        if rel == "." or rel.startswith(".." + os.sep) or rel == "..":
            return None
        return rel.split(os.sep, 1)[0]

    # --- the loop -------------------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                timeout = self.step()
            except Exception:
                # The thread must outlive any one bad step: a silent dead intake claims nothing, ever.
                log.exception("intake step failed; carrying on", retry_seconds=RETRY_AFTER_ERROR)
                timeout = RETRY_AFTER_ERROR
            self.wake.wait(timeout)
            self.wake.clear()

    def _warn_once(self, what: str, now: float, message: str, **fields: object) -> bool:
        """Log a warning about `what`, then stay quiet about it for WARN_EVERY seconds; True if logged."""
        if now < self._warned.get(what, -WARN_EVERY) + WARN_EVERY:
            return False
        self._warned = {w: t for w, t in self._warned.items() if now < t + WARN_EVERY}
        self._warned[what] = now
        log.warning(message, **fields)
        return True

    def step(self) -> float:
        """Process everything pending; return how long the loop may sleep."""
        now = self.clock()
        with self._lock:
            new_cfg, self._new_cfg = self._new_cfg, None
            dirty, self._dirty = self._dirty, set()
            rescan = self._rescan or now >= self._next_rescan
            self._rescan = False
        if self._undo_cut_claims:
            self._undo_cut_claims = False
            recover_detected(self.cfg, self.claimer.store)
        if new_cfg is not None:
            self.cfg = self.claimer.cfg = new_cfg
            self.names = NameFilter(new_cfg.watcher)
            self.tracker.settle = new_cfg.watcher.settle_seconds
        if rescan:
            dirty |= self._list_inbox() | set(self._key_of)
            self._next_rescan = now + self.cfg.watcher.rescan_seconds
        for name in dirty:
            self._observe(name, now)
        self._collect_probes(now)
        while self._due and self._due[0][0] <= now:
            _, key = heapq.heappop(self._due)
            self._evaluate_safely(key, now)
        horizon = min([self._next_rescan] + ([self._due[0][0]] if self._due else []))
        return max(0.0, min(horizon - self.clock(), 1.0 if self._probing else 60.0))

    def _list_inbox(self) -> set[str]:
        try:
            return set(os.listdir(self.inbox))
        except OSError as exc:
            log.error("cannot list the inbox; is the share mounted?", inbox=str(self.inbox), error=exc.strerror)
            return set()

    def _schedule(self, when: float, key: str) -> None:
        heapq.heappush(self._due, (when, key))

    def _observe(self, name: str, now: float) -> None:
        try:
            snap = snapshot(self.inbox, name, self.names, self.writes.writing)
        except OSError as exc:
            # One entry the daemon may not read (chmod 000) must not stop everyone else's jobs.
            self._warn_once(f"read:{name}", now, "cannot read an inbox entry; skipping it until it can be read",
                            entry=name, error=exc.strerror,
                            hint=f"let the daemon's user read it (chmod -R a+rX '{name}') or remove it")
            snap = None
        if snap is None:
            key = self._key_of.pop(name, None)
            self.tracker.forget(name)
            if key is not None:
                self._members.get(key, set()).discard(name)
                if self._members.get(key):
                    self._schedule(now, key)
                else:
                    self._members.pop(key, None)
                    self._blocked.pop(key, None)
            return
        key = group_key(snap)
        self._key_of[name] = key
        self._members.setdefault(key, set()).add(name)
        if self.tracker.observe(snap, now):
            self._schedule(now if snap.ready_marker else self.tracker.stable_at(name), key)

    def _evaluate_safely(self, key: str, now: float) -> None:
        try:
            self._evaluate(key, now)
        except ClaimBlocked as blocked:
            self._wait_blocked(key, blocked.failure, now)
        except Exception:
            log.exception("intake step failed; will try again", group=key)
            self._schedule(now + RETRY_AFTER_ERROR, key)

    def _evaluate(self, key: str, now: float) -> None:
        members = sorted(self._members.get(key, ()))
        if not members or key in self._probing:
            return
        if self.hold.is_set():
            self._schedule(now + HOLD_RECHECK, key)
            return
        snaps = [self.tracker.entries[m].snap for m in members]
        if snaps[0].is_dir and not snaps[0].files:
            return  # an empty folder, or one of droppings only (.DS_Store, Thumbs.db): not a job, left alone
        ready_at = max(self.tracker.stable_at(m) for m in members)
        if snaps[0].is_dir and snaps[0].ready_marker:
            ready_at = min(ready_at, now)
        if any(s.partial for s in snaps) or now < ready_at:
            self._schedule(max(ready_at, now + self.tracker.settle), key)
            return
        if any(s.writing for s in snaps):
            self._wait_for_writer(key, members, snaps, now)
            return
        blocker = self._move_blocker(snaps) or self._unreadable(snaps)
        if blocker is not None:
            self._wait_blocked(key, blocker, now)
            return
        timed_out = now >= ready_at + self.cfg.watcher.pair_timeout
        outcome = self._pair(snaps, timed_out)
        if isinstance(outcome, Wait):
            self._schedule(ready_at + self.cfg.watcher.pair_timeout, key)
        elif isinstance(outcome, Rejection):
            self.claimer.reject(outcome.name_hint, outcome.sources, outcome.problems, snaps[0].is_dir,
                                notify=outcome.notify)
            self._drop(members, now)
        else:
            self._start_probe(key, outcome, snaps)

    def _wait_for_writer(self, key: str, members: list[str], snaps: list[Snapshot], now: float) -> None:
        """A file written to and not closed yet is still arriving, however long its writer pauses (Wi-Fi, VPN,
        an SMB client): wait for the close, up to stalled_upload_seconds without new data, then refuse it."""
        limit = self.cfg.watcher.stalled_upload_seconds
        stalled_at = max(self.tracker.entries[m].changed_at for m in members) + limit
        if now < stalled_at:
            self._schedule(stalled_at, key)  # the close event wakes the group earlier
            return
        open_files = ", ".join(w for s in snaps for w in s.writing)
        problem = Problem.of_input(
            open_files, f"upload stalled: {open_files} is still open for writing but no data arrived for "
                        f"{limit / 60:g} min",
            "the copy or upload stopped (a dropped connection, a sleeping laptop); copy the whole file again")
        first = snaps[0]
        stem = PurePosixPath(first.name).stem if not first.is_dir else first.name
        self.claimer.reject(safe_name(stem), members if not first.is_dir else [first.name], [problem], first.is_dir)
        self._drop(members, now)

    def _move_blocker(self, snaps: list[Snapshot]) -> Problem | None:
        """Checked before any row or folder exists: files the daemon cannot move wait where they are."""
        for snap in snaps:
            why = move_blocker(self.inbox / snap.name)
            if why is not None:
                return Problem(Kind.SETUP, "intake", *why)
        return None

    def _unreadable(self, snaps: list[Snapshot]) -> Problem | None:
        """A file the daemon may not read (chmod 000) waits, like an unreadable folder: its owner can fix it."""
        for snap in snaps:
            for f in snap.files:
                if stat.S_ISREG(f.mode) and not os.access(self.inbox / f.rel, os.R_OK, effective_ids=True):
                    return Problem(Kind.SETUP, "intake", f"the daemon's user cannot read {f.rel}",
                                   f"let it read the file (chmod a+r '{f.rel}') or remove it; it is taken as "
                                   "soon as it can be read")
        return None

    def _wait_blocked(self, key: str, failure: Problem, now: float) -> None:
        """Try again with backoff (5 s doubling to 5 min); one warning, not one per try."""
        tries = self._blocked.get(key, 0) + 1
        self._blocked[key] = tries
        delay = min(BLOCKED_MAX_WAIT, RETRY_AFTER_ERROR * 2 ** (tries - 1))
        if self._warn_once(f"move:{key}:{failure.reason}", now, "inbox entry waits: it cannot be taken now",
                           group=key, kind=failure.kind.value, reason=failure.reason, hint=failure.hint,
                           retry_seconds=delay) and failure.kind is Kind.OUTAGE and self.on_alert is not None:
            self.on_alert("intake-disk-full", f"New jobs wait in the inbox: {failure.reason}. {failure.hint}")
        self._schedule(now + delay, key)

    def _pair(self, snaps: list[Snapshot], timed_out: bool) -> Outcome:
        if not snaps[0].is_dir:
            return plan_loose([s.files[0] for s in snaps], timed_out)
        folder = snaps[0]
        manifests = [f for f in folder.files if f.name in MANIFEST_NAMES]
        files = [f for f in folder.files if f.name not in MANIFEST_NAMES]
        manifest_bytes = None
        if manifests:
            problem = entry_problem(manifests[0])
            if problem:
                return Rejection(folder.name, [folder.name], [problem])
            manifest_bytes = self._read_manifest(manifests[0])
            if manifest_bytes is None:
                return Rejection(folder.name, [folder.name], [Problem.of_input(
                    manifests[0].rel, f"job.yaml is larger than {MAX_MANIFEST_BYTES // 1024} KiB",
                    "job.yaml holds a few options and pairs; check you saved the right file")])
        return plan_folder(folder.name, files, manifest_bytes, timed_out,
                           self.engines, set(self.cfg.presets))

    def _read_manifest(self, info: FileInfo) -> bytes | None:
        fd = os.open(self.inbox / info.rel, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        with os.fdopen(fd, "rb") as fh:
            data = fh.read(MAX_MANIFEST_BYTES + 1)
        return None if len(data) > MAX_MANIFEST_BYTES else data

    def _start_probe(self, key: str, plan: Plan, snaps: list[Snapshot], tries: int = 1) -> None:
        engine = plan.engine or self.cfg.engine.name
        preset = plan.preset or self.cfg.engine.preset
        fut, gen = self.inspector.submit(self.inbox, plan.inputs, self.cfg.limits, self.needs_face(engine),
                                         plan.face_box)
        fut.add_done_callback(lambda _f: self.wake.set())
        self._probing[key] = Probing(plan, snaps[0].is_dir, engine, preset, fut, gen,
                                     {s.name: s.signature for s in snaps}, tries, self.clock())
        log.debug("checking inputs", group=key, inputs=len(plan.inputs))

    def _collect_probes(self, now: float) -> None:
        if self.hold.is_set():
            return
        for key, p in list(self._probing.items()):
            if not p.future.done():
                continue
            del self._probing[key]
            try:
                self._finish_probe(key, p, now)
            except ClaimBlocked as blocked:
                self._wait_blocked(key, blocked.failure, now)
            except Exception:
                log.exception("claim failed; will try again", group=key)
                self._schedule(now + RETRY_AFTER_ERROR, key)

    def _finish_probe(self, key: str, p: Probing, now: float) -> None:
        insp = self.inspector.outcome(p.future, p.generation)
        log.debug("inputs checked", group=key, seconds=round(now - p.started, 3))
        current = {n: snapshot(self.inbox, n, self.names, self.writes.writing) for n in p.signatures}
        if any(s is None or s.signature != p.signatures[n] for n, s in current.items()):
            for n in current:
                self._observe(n, now)
            self._schedule(now, key)
            return
        members = list(p.signatures)
        if insp is None and p.tries < 2:
            self._start_probe(key, p.plan, [s for s in current.values() if s], p.tries + 1)
            return
        if insp is None:
            insp = Inspection([Problem.of_input(", ".join(p.plan.inputs), "crashed the media decoder",
                                                "the file is probably corrupt; re-export it and drop it again")])
        grace = self.cfg.watcher.incomplete_grace_seconds
        young_until = max(self.tracker.entries[n].changed_at for n in members) + grace
        if insp.incomplete and now < young_until:
            # What a cut-short file looks like is also what a file still arriving looks like (a writer that
            # closes between chunks, or polling mode, where closes are not seen): give it time first.
            log.info("an input looks cut short; waiting in case it is still arriving", group=key,
                     files=insp.incomplete, retry_seconds=round(young_until - now, 1))
            self._schedule(young_until, key)
            return
        if insp.problems:
            self.claimer.reject(p.plan.name_hint, p.plan.sources, insp.problems, p.is_folder,
                                notify=p.plan.notify)
        else:
            self.claimer.claim(p.plan, insp, p.engine, p.preset, p.is_folder)
            self.on_queued()
        self._drop(members, now)

    def _drop(self, members: list[str], now: float) -> None:
        """Forget entries that left the inbox; a group member that arrived meanwhile is looked at again."""
        for name in members:
            self._blocked.pop(self._key_of.get(name, ""), None)
            key = self._key_of.pop(name, None)
            self.tracker.forget(name)
            if key is None:
                continue
            rest = self._members.get(key, set())
            rest.discard(name)
            if rest:
                self._schedule(now, key)
            else:
                self._members.pop(key, None)
