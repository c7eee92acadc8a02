"""Claim a planned job (inbox -> work/<job-id>/in, then queued) or reject one (inbox -> failed/<name>/).

Order makes crashes harmless: the store row (`detected`, with where files go) is written before any move,
and the row advances only after the move; `recover_detected` puts half-moved files back in the inbox.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from heygem_daemon.config import Config
from heygem_daemon.notify.targets import screen_job_targets
from heygem_daemon.failures import ERROR_FILE, Problem, error_record, warnings_of, write_error_json
from heygem_daemon.fs.ops import display_name, move, remove_tree
from heygem_daemon.intake.inspect import Inspection
from heygem_daemon.intake.pairing import Plan
from heygem_daemon.log import get_logger
from heygem_daemon.state import Job, NewTask, Store

if TYPE_CHECKING:  # generation imports intake's archive_dir; the claim only needs the type here
    from heygem_daemon.generation.lifecycle import LifeCycle

log = get_logger("heygem.claim")


def fingerprint(plan: Plan, digests: dict[str, str], engine: str, preset: str) -> str:
    """Same inputs (by content) + same options = same result, whatever the files are called."""
    pairs = sorted((digests[p.audio], digests[p.portrait]) for p in plan.pairs)
    doc = json.dumps({"pairs": pairs, "engine": engine, "preset": preset, "options": plan.options},
                     sort_keys=True)
    return hashlib.sha256(doc.encode()).hexdigest()


def archive_dir(cfg: Config, job_name: str) -> Path:
    return cfg.folder("archive") / time.strftime("%Y-%m-%d") / job_name


def _taken_names(cfg: Config) -> set[str]:
    """Names already used on disk (e.g. by jobs from before the state was reset) are not reused."""
    taken: set[str] = set()
    for key in ("outputs", "failed"):
        try:
            taken.update(p.name for p in cfg.folder(key).iterdir())
        except FileNotFoundError:
            pass
    return taken


def _stage_sources(inbox: Path, sources: list[str], staging: Path, is_folder: bool) -> None:
    if is_folder:
        staging.parent.mkdir(parents=True, exist_ok=True)
        move(inbox / sources[0], staging)
        return
    staging.mkdir(parents=True, exist_ok=True)
    for rel in sources:
        move(inbox / rel, staging / PurePosixPath(rel).name)


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
        spec: dict[str, Any] = {
            "sources": plan.sources, "folder": is_folder, "engine": engine, "preset": preset,
            "options": plan.options, "digests": insp.digests, "priority": plan.priority,
            "pairs": [{"audio": _staged(p.audio), "portrait": _staged(p.portrait), "name": p.name}
                      for p in plan.pairs],
        }
        self._notify_spec(spec, plan.name_hint, plan.notify)
        if not plan.upload:
            spec["upload"] = False
        job = self.store.jobs.create(plan.name_hint, spec, fp, insp.owner, _taken_names(self.cfg))
        original = self.store.jobs.find_duplicate(fp, self.cfg.dedupe.window_hours * 3600)
        if original is not None and original.id != job.id:
            staging = archive_dir(self.cfg, job.name)
            self._record_staging(job, spec, staging)
            _stage_sources(self.inbox, plan.sources, staging, is_folder)
            job = self.life.duplicate(self.store.jobs.get(job.id), original)
            log.info("duplicate drop, not generated again", job_id=job.id, job=job.name,
                     original=original.name, outputs=str(self.cfg.folder("outputs") / original.name))
            return job
        staging = self.cfg.folder("work") / job.id / "in"
        self._record_staging(job, spec, staging)
        _stage_sources(self.inbox, plan.sources, staging, is_folder)
        out_dir = self.cfg.folder("outputs") / job.name
        job = self.life.queue(self.store.jobs.get(job.id), [
            NewTask(p["name"], p["audio"], p["portrait"], str(out_dir / f"{p['name']}.mp4")) for p in spec["pairs"]
        ])
        log.info("job claimed", job_id=job.id, job=job.name, tasks=len(plan.pairs), owner=insp.owner,
                 engine=engine, preset=preset, priority=plan.priority)
        return job

    def reject(self, name_hint: str, sources: list[str], problems: list[Problem], is_folder: bool,
               stage: str = "intake", notify: list[str] | None = None) -> Job:
        spec: dict[str, Any] = {"sources": sources, "folder": is_folder}
        self._notify_spec(spec, name_hint, notify)
        job = self.store.jobs.create(name_hint, spec, taken=_taken_names(self.cfg))
        staging = self.cfg.folder("failed") / job.name
        self._record_staging(job, spec, staging)
        _stage_sources(self.inbox, sources, staging, is_folder)
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
