"""Claim a planned job (inbox -> work/<job-id>/in, then queued) or reject one (inbox -> failed/<name>/).

Order makes crashes harmless: the store row (`detected`, with where files go) is written before any move,
and the row advances only after the move; `recover_detected` puts half-moved files back in the inbox.
"""

from __future__ import annotations

import errno
import hashlib
import json
import shutil
import time
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from heygem_daemon.config import Config
from heygem_daemon.notify.targets import screen_job_targets
from heygem_daemon.failures import ERROR_FILE, Kind, Problem, error_record, warnings_of, write_error_json
from heygem_daemon.fs.ops import display_name, is_own_temp, move, remove_tree, same_filesystem
from heygem_daemon.intake.inspect import Inspection
from heygem_daemon.intake.pairing import Plan
from heygem_daemon.log import get_logger
from heygem_daemon.state import Job, NewTask, Store

if TYPE_CHECKING:  # generation imports intake's archive_dir; the claim only needs the type here
    from heygem_daemon.generation.lifecycle import LifeCycle

log = get_logger("heygem.claim")
GB = 1024 ** 3


class ClaimBlocked(Exception):
    """The inputs cannot be moved right now (permissions, disk space). Nothing was claimed: no row, no
    folder, every source still in the inbox; intake waits and tries again."""

    def __init__(self, failure: Problem) -> None:
        super().__init__(failure.reason)
        self.failure = failure


def fingerprint(plan: Plan, digests: dict[str, str], engine: str, preset: str) -> str:
    """Same inputs (by content) + same options = same result, whatever the files are called."""
    pairs = sorted((digests[p.audio], digests[p.portrait]) for p in plan.pairs)
    facts: dict[str, Any] = {"pairs": pairs, "engine": engine, "preset": preset, "options": plan.options}
    if plan.speech:  # only then: earlier jobs' fingerprints stay what they were
        facts["speech"] = plan.speech
    doc = json.dumps(facts, sort_keys=True)
    return hashlib.sha256(doc.encode()).hexdigest()


def archive_dir(cfg: Config, job_name: str) -> Path:
    return cfg.folder("archive") / time.strftime("%Y-%m-%d") / job_name


def taken_names(cfg: Config) -> set[str]:
    """Names already used on disk (e.g. by jobs from before the state was reset) are not reused."""
    taken: set[str] = set()
    for key in ("outputs", "failed"):
        try:
            taken.update(p.name for p in cfg.folder(key).iterdir())
        except FileNotFoundError:
            pass
    return taken


def _tree_bytes(path: Path) -> int:
    if not path.is_dir() or path.is_symlink():
        return path.lstat().st_size
    return sum(p.lstat().st_size for p in path.rglob("*") if not p.is_dir() or p.is_symlink())


def check_room(cfg: Config, inbox: Path, sources: list[str], root: Path) -> None:
    """A move to another filesystem copies: the whole job must fit on `root` and leave the disk guard's
    reserve, or one file of a pair lands there and the other cannot follow."""
    if same_filesystem(inbox, root):
        return
    need = sum(_tree_bytes(inbox / rel) for rel in sources)
    free = shutil.disk_usage(root).free
    reserve = cfg.disk_guard.min_free_gb * GB
    if free - need < reserve:
        raise ClaimBlocked(Problem(
            Kind.OUTAGE, "intake", f"{root.name}/ has {free / GB:.2f} GB free; this job needs {need / GB:.2f} GB "
            f"plus the {cfg.disk_guard.min_free_gb:g} GB reserve (disk_guard.min_free_gb)",
            f"free space on {root}; the files wait in the inbox until then"))


def _stage_sources(inbox: Path, sources: list[str], staging: Path, is_folder: bool) -> None:
    """All or nothing: a move that fails (disk full, permissions) puts back what had moved, removes what
    it made, and raises ClaimBlocked; the pair never splits."""
    made = staging.parent if staging.name == "in" else staging
    existed = made.exists()
    moved: list[tuple[Path, Path]] = []
    try:
        if is_folder:
            staging.parent.mkdir(parents=True, exist_ok=True)
            move(inbox / sources[0], staging)
            return
        staging.mkdir(parents=True, exist_ok=True)
        for rel in sources:
            move(inbox / rel, staging / PurePosixPath(rel).name)
            moved.append((staging / PurePosixPath(rel).name, inbox / rel))
    except OSError as exc:
        for done, back in reversed(moved):
            move(done, back)
        if not existed:
            remove_tree(made)
        kind = Kind.OUTAGE if exc.errno in (errno.ENOSPC, errno.EDQUOT) else Kind.SETUP
        hint = ("free space on the disk; the files wait in the inbox until then" if kind is Kind.OUTAGE else
                "let the daemon's user move the files: chmod g+w (or o+w) the dropped folder and the inbox, "
                "or drop them as a user in the daemon's group")
        raise ClaimBlocked(Problem(kind, "intake", f"cannot move {', '.join(sources)} out of the inbox "
                                   f"({exc.strerror})", hint)) from exc


def _staged(rel: str) -> str:
    """Where an inbox-relative input lives inside the staging folder: its base name."""
    return PurePosixPath(rel).name


class Claimer:
    """Moves the inputs; the job's states move through the life cycle."""

    def __init__(self, cfg: Config, life: LifeCycle) -> None:
        self.cfg = cfg
        self.life = life
        self.store = life.store
        self.inbox = cfg.folder("inbox")

    def claim(self, plan: Plan, insp: Inspection, engine: str, preset: str, is_folder: bool) -> Job:
        fp = fingerprint(plan, insp.digests, engine, preset)
        # Looked up before the new row exists (a `detected` job is never an original): a duplicate's files
        # go to archive/, not work/, and room is checked where they go.
        original = self.store.jobs.find_duplicate(fp, self.cfg.dedupe.window_hours * 3600)
        check_room(self.cfg, self.inbox, plan.sources, self.cfg.folder("work" if original is None else "archive"))
        spec: dict[str, Any] = {
            "sources": plan.sources, "folder": is_folder, "engine": engine, "preset": preset,
            "options": plan.options, "digests": insp.digests, "priority": plan.priority,
            "pairs": [{"audio": _staged(p.audio), "portrait": _staged(p.portrait), "name": p.name}
                      for p in plan.pairs],
        }
        self._notify_spec(spec, plan.name_hint, plan.notify)
        if plan.speech:
            spec["speech"] = plan.speech
        if not plan.upload:
            spec["upload"] = False
        job = self.store.jobs.create(plan.name_hint, spec, fp, insp.owner, taken_names(self.cfg))
        if original is not None:
            staging = archive_dir(self.cfg, job.name)
            self._record_staging(job, spec, staging)
            self._stage(job, plan.sources, staging, is_folder)
            job = self.life.duplicate(self.store.jobs.get(job.id), original)
            log.info("duplicate drop, not generated again", job_id=job.id, job=job.name,
                     original=original.name, outputs=str(self.cfg.folder("outputs") / original.name))
            return job
        staging = self.cfg.folder("work") / job.id / "in"
        self._record_staging(job, spec, staging)
        self._stage(job, plan.sources, staging, is_folder)
        out_dir = self.cfg.folder("outputs") / job.name
        job = self.life.queue(self.store.jobs.get(job.id), [
            NewTask(p["name"], p["audio"], p["portrait"], str(out_dir / f"{p['name']}.mp4")) for p in spec["pairs"]
        ])
        log.info("job claimed", job_id=job.id, job=job.name, tasks=len(plan.pairs), owner=insp.owner,
                 engine=engine, preset=preset, priority=plan.priority)
        return job

    def reject(self, name_hint: str, sources: list[str], problems: list[Problem], is_folder: bool,
               stage: str = "intake", notify: list[str] | None = None) -> Job:
        check_room(self.cfg, self.inbox, sources, self.cfg.folder("failed"))
        spec: dict[str, Any] = {"sources": sources, "folder": is_folder}
        self._notify_spec(spec, name_hint, notify)
        job = self.store.jobs.create(name_hint, spec, taken=taken_names(self.cfg))
        staging = self.cfg.folder("failed") / job.name
        self._record_staging(job, spec, staging)
        self._stage(job, sources, staging, is_folder)
        record = error_record(job.name, stage, problems, job_id=job.id,
                              files=sorted(display_name(_staged(s)) for s in sources),
                              **warnings_of(spec))
        write_error_json(staging, record)
        job = self.life.refuse(self.store.jobs.get(job.id), problems, record)
        log.warning("job rejected", job_id=job.id, job=job.name, stage=stage, reason=record["reason"],
                    hint=record["hint"], problems=len(problems))
        return job

    def _notify_spec(self, spec: dict[str, Any], name: str, urls: list[str] | None) -> None:
        """job.yaml's chat targets, screened by notify.job_targets and kept as digests only: the sender
        reads the URLs again from the job.yaml that travels with the inputs."""
        screened = screen_job_targets(urls, self.cfg.notify.job_targets)
        if screened.ids is not None:
            spec["notify_ids"] = screened.ids
        if screened.refused:
            spec["warnings"] = screened.refused
        for problem in screened.refused:
            log.warning("job.yaml chat target refused", job=name, reason=problem["reason"], hint=problem["hint"])

    def _stage(self, job: Job, sources: list[str], staging: Path, is_folder: bool) -> None:
        try:
            _stage_sources(self.inbox, sources, staging, is_folder)
        except ClaimBlocked:
            self.store.jobs.delete(job.id)  # everything is back in the inbox: the row never happened
            raise

    def _record_staging(self, job: Job, spec: dict[str, Any], staging: Path) -> None:
        spec["staging"] = str(staging)
        self.store.jobs.set_state(job.id, "detected", spec=spec)


def recover_detected(cfg: Config, store: Store) -> int:
    """Undo claims cut short by a crash: whatever already moved goes back to the inbox, the row goes."""
    inbox = cfg.folder("inbox")
    undone = 0
    for job in store.jobs.select(("detected",)):
        staging = Path(job.spec["staging"]) if "staging" in job.spec else None
        if staging is not None and staging.is_dir():
            (staging / ERROR_FILE).unlink(missing_ok=True)
            for left in staging.iterdir():
                if is_own_temp(left.name):  # e.g. error.json's temp, cut short by the crash
                    remove_tree(left)
        for rel in job.spec.get("sources", []):
            src = inbox / rel
            moved = staging if job.spec.get("folder") else (staging / _staged(rel) if staging else None)
            if moved is None or not (moved.exists() or moved.is_symlink()):
                continue
            # A staged copy exists only once it is complete, so any source left beside it is the leftover.
            remove_tree(src)
            src.parent.mkdir(parents=True, exist_ok=True)
            move(moved, src)
        if staging is not None:
            remove_tree(staging)
            if staging.name == "in":
                remove_tree(staging.parent)
        store.jobs.delete(job.id)
        undone += 1
        log.warning("interrupted claim undone; inputs are back in the inbox", job_id=job.id, job=job.name)
    return undone
