"""Inputs under work/ that the store does not know are never deleted.

A database restored without its WAL (or a row lost any other way) leaves work/<job-id>/in/ behind with no
job. Those inputs go back to the inbox, where intake takes them again; if the inbox already holds those
names they go to failed/recovered-<job-id>/ with error.json saying why. An ERROR line says what was found
and where it went, so an operator sees that the database lost something.
"""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath

from heygem_daemon.config import Config
from heygem_daemon.failures import Kind, Problem, error_record, write_error_json
from heygem_daemon.fs.ops import is_own_temp, move, remove_tree
from heygem_daemon.intake.pairing import MANIFEST_NAMES
from heygem_daemon.log import get_logger
from heygem_daemon.state import Store

log = get_logger("heygem.orphans")
INPUTS = "in"


def unknown_inputs(cfg: Config, store: Store) -> list[Path]:
    """work/<id>/in/ folders holding files while the store has no job <id>."""
    found = []
    for entry in sorted(os.scandir(cfg.folder("work")), key=lambda e: e.name):
        # Dot folders are engine caches (work/.cache), not jobs.
        if entry.name.startswith(".") or not entry.is_dir(follow_symlinks=False):
            continue
        if holds_inputs(Path(entry.path)) and store.jobs.state(entry.name) is None:
            found.append(Path(entry.path) / INPUTS)
    return found


def holds_inputs(job_dir: Path) -> bool:
    inputs = job_dir / INPUTS
    return inputs.is_dir() and not inputs.is_symlink() and any(inputs.iterdir())


def send_back(cfg: Config, inputs: Path) -> Path:
    """Put one orphaned in/ folder where a person (or intake) can use it; returns where it went."""
    job_id = inputs.parent.name
    for left in inputs.iterdir():
        if is_own_temp(left.name):
            remove_tree(left)
    files = sorted(p.name for p in inputs.iterdir())
    inbox = cfg.folder("inbox")
    if _loose_pair(inputs, files) and not any((inbox / f).exists() for f in files):
        for name in files:
            move(inputs / name, inbox / name)
        inputs.rmdir()
        dest = inbox
    elif not (inbox / f"recovered-{job_id}").exists():
        dest = inbox / f"recovered-{job_id}"
        move(inputs, dest)
    else:
        dest = cfg.folder("failed") / f"recovered-{job_id}"
        move(inputs, dest)
        write_error_json(dest, error_record(dest.name, "recovery", [Problem(
            Kind.INTERNAL, "recovery", "the daemon's database did not know this job (restored without its -wal "
                                       "file?); its inputs were kept here",
            "drop these files into the inbox again to make the videos")], job_id=job_id))
    log.error("found inputs of a job the database does not know; not deleting them", job_id=job_id, files=files,
              moved_to=str(dest), hint="the database was probably restored without its -wal file; "
                                       "check outputs/ for videos already made")
    return dest


def rescue_unknown_inputs(cfg: Config, store: Store) -> list[Path]:
    """At start-up: every orphaned in/ folder sent back; returns where each went."""
    return [send_back(cfg, inputs) for inputs in unknown_inputs(cfg, store)]


def _loose_pair(inputs: Path, files: list[str]) -> bool:
    """Two plain files sharing a stem, as a loose pair is staged: they go back as loose files."""
    if len(files) != 2 or any(f in MANIFEST_NAMES or f.startswith(".") for f in files):
        return False
    stems = {PurePosixPath(f).stem.casefold() for f in files}
    return len(stems) == 1 and all((inputs / f).is_file() and not (inputs / f).is_symlink() for f in files)
