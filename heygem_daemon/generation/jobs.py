"""Where a job's files go at each step of its life cycle (the states themselves are lifecycle.py's)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from heygem_daemon.config import Config
from heygem_daemon.failures import ERROR_FILE, write_error_json
from heygem_daemon.fs.ops import move, remove_tree
from heygem_daemon.intake.claim import archive_dir
from heygem_daemon.intake.pairing import READY_MARKER
from heygem_daemon.state import Job


def _relocate_inputs(job: Job, dest: Path) -> None:
    staging = Path(job.spec["staging"])
    if staging.exists() and not dest.exists():
        dest.parent.mkdir(parents=True, exist_ok=True)
        move(staging, dest)


def archive_inputs(cfg: Config, job: Job) -> Path:
    """Every video made: the inputs to archive/<day>/<name>/, work/ removed. Returns where they are."""
    dest = archive_dir(cfg, job.name)
    _relocate_inputs(job, dest)
    remove_tree(cfg.folder("work") / job.id)
    return dest


def file_failed(cfg: Config, job: Job, record: dict[str, Any]) -> Path:
    """Some video could not be made: the inputs to failed/<name>/ with error.json, work/ removed."""
    dest = cfg.folder("failed") / job.name
    _relocate_inputs(job, dest)
    write_error_json(dest, record)
    remove_tree(cfg.folder("work") / job.id)
    return dest


def drop_empty_outputs(cfg: Config, job: Job) -> None:
    """Workers make outputs/<job>/ before the first attempt; a job without a video must not leave it behind
    (people would look there for a video, and the name stays free for a retry)."""
    try:
        (cfg.folder("outputs") / job.name).rmdir()
    except OSError:
        pass  # not there, or something is in it (another tool's file): leave it


def output_made(output: str) -> bool:
    """After a crash: did the task's video make it (renamed from .part)? The .part is removed either way."""
    final = Path(output)
    Path(output + ".part").unlink(missing_ok=True)
    return final.is_file() and final.stat().st_size > 0


def inputs_of(job: Job) -> Path | None:
    """Where a failed job's inputs are now (a retry cut short by a crash may have moved them to work/)."""
    for key in ("inputs_at", "staging"):
        if job.spec.get(key) and Path(job.spec[key]).exists():
            return Path(job.spec[key])
    return None


def stage_for_retry(cfg: Config, job: Job) -> Path | None:
    """The inputs back to work/<id>/in for another go; None when they are gone."""
    inputs = inputs_of(job)
    if inputs is None:
        return None
    (inputs / ERROR_FILE).unlink(missing_ok=True)
    staging = cfg.folder("work") / job.id / "in"
    if inputs != staging:
        staging.parent.mkdir(parents=True, exist_ok=True)
        move(inputs, staging)
    return staging


def send_back_to_intake(cfg: Config, job: Job) -> Path:
    """A job refused at intake goes back through the inbox as a folder, marked ready, after the fix."""
    inputs = inputs_of(job)
    target = cfg.folder("inbox") / job.name
    if target.exists():
        target = target.with_name(f"{job.name}-retry-{time.strftime('%H%M%S')}")
    if inputs is not None and inputs.is_dir():
        (inputs / ERROR_FILE).unlink(missing_ok=True)
        move(inputs, target)
        (target / READY_MARKER).touch()
    return target
