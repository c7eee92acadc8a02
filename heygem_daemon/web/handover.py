"""A finished set of uploads becomes a job: checked as intake checks files (type, size, duration), then
moved into the inbox as `<name>/` with job.yaml and `.ready`, which the daemon takes like any drop.

Every way this can go wrong is a refusal with a reason, never a half move: a set naming one upload twice
is refused before anything moves; sets are handed over one at a time, so a second submit of the same set
finds its uploads gone; a move that fails puts every file back.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from heygem_daemon.config import Config
from heygem_daemon.engines.registry import engine_names
from heygem_daemon.fs.ops import move
from heygem_daemon.intake.claim import taken_names
from heygem_daemon.intake.pairing import READY_MARKER, FileInfo, Rejection, plan_folder, safe_name
from heygem_daemon.intake.probe import ProbeError, probe_input
from heygem_daemon.media.face_spec import FaceRule
from heygem_daemon.web.uploads import Upload, UploadRefused, Uploads


@dataclass(frozen=True)
class JobForm:
    ids: list[str]
    name: str
    engine: str
    preset: str
    priority: str
    upload: bool
    extra: dict[str, Any] = field(default_factory=dict)
    """More job.yaml keys (pairs, notify, face_box, options), checked by intake's own rules."""


# One set at a time, from its first look at the uploads to their removal: a second submit of the same set
# (a double click) then finds them gone instead of probing or moving files the first one is moving.
_MOVING = threading.Lock()


def _refuse(reason: str, hint: str) -> UploadRefused:
    return UploadRefused(422, reason, hint)


def _check_form(cfg: Config, form: JobForm) -> None:
    if form.engine not in engine_names(cfg):
        raise _refuse(f"engine {form.engine!r} is not set up here", f"pick one of {', '.join(engine_names(cfg))}")
    if form.preset not in cfg.presets:
        raise _refuse(f"preset {form.preset!r} is not defined", f"pick one of {', '.join(sorted(cfg.presets))}")
    if form.priority not in ("high", "normal", "low"):
        raise _refuse(f"priority {form.priority!r} is unknown", "pick high, normal or low")
    if not 2 <= len(form.ids) <= cfg.web.max_files:
        raise _refuse(f"{len(form.ids)} file(s) uploaded", f"a job needs 2 to {cfg.web.max_files} files")
    if len(set(form.ids)) != len(form.ids):
        raise _refuse("the same upload is listed twice", "remove the repeated file from the list and send again")


def _file_names(uploads: list[Upload]) -> list[str]:
    """Each upload's name in the job folder: a name already taken gets -2, -3 ... before its extension."""
    names: list[str] = []
    for upload in uploads:
        stem, ext = os.path.splitext(upload.name)
        file_name, n = upload.name, 1
        while file_name in names:
            n += 1
            file_name = f"{stem}-{n}{ext}"
        names.append(file_name)
    return names


def _manifest(form: JobForm, name: str) -> dict[str, Any]:
    return {"name": name, "engine": form.engine, "preset": form.preset, "priority": form.priority,
            "upload": form.upload, **form.extra}


def _check_plan(cfg: Config, folder: str, uploads: list[Upload], file_names: list[str],
                manifest: dict[str, Any]) -> None:
    """The daemon plans the folder by intake's rules (job.yaml, then the pairing): a set it would refuse is
    refused now, in intake's words, before anything moves."""
    files: list[FileInfo] = []
    for upload, name in zip(uploads, file_names):
        st = os.stat(upload.data)
        files.append(FileInfo(f"{folder}/{name}", st.st_size, st.st_mtime_ns, st.st_mode))
    # timed out: no partner arrives later on the web
    outcome = plan_folder(folder, files, yaml.safe_dump(manifest).encode(), True, set(engine_names(cfg)),
                          set(cfg.presets))
    if isinstance(outcome, Rejection):
        raise _refuse(outcome.problems[0].reason, outcome.problems[0].hint)


def _probe(cfg: Config, upload: Upload) -> None:
    """The intake's checks, on the file under its own name (the messages name it)."""
    named = upload.folder / upload.name
    os.link(upload.data, named)
    try:
        # Whether a face is needed depends on the engine: the daemon checks that when it takes the job.
        probe_input(named, cfg.limits, FaceRule.NONE)
    except ProbeError as exc:
        raise _refuse(exc.reason, exc.hint) from None
    finally:
        named.unlink()


def _free(inbox: Path, name: str, known: Callable[[str], bool]) -> Path:
    """A folder name free in the inbox and in the store, so the job keeps it and its page is /jobs/<name>."""
    n = 1
    while True:
        target = inbox / (name if n == 1 else f"{name}-{n}")
        if not target.exists() and not target.is_symlink() and not known(target.name):
            return target
        n += 1


def _uploads(uploads: Uploads, user: str, ids: list[str]) -> list[Upload]:
    found = [uploads.get(i, user) for i in ids]
    sets = [u for u in found if u is not None]
    if len(sets) != len(found):
        raise _refuse("an upload of this job is gone: sent already (a second click?) or expired",
                      "look for the job on the Jobs page, or upload the files again")
    if any(not u.complete for u in sets):
        raise _refuse("not every file has finished uploading", "wait for every bar to reach 100 %, then send")
    return sets


def _move_in(cfg: Config, uploads: Uploads, sets: list[Upload], file_names: list[str], form: JobForm, name: str,
             known: Callable[[str], bool]) -> Path:
    """Stage the files with job.yaml and .ready beside the uploads, then move the folder into the inbox in one
    step; on any failure the files go back to their uploads and the staging folder goes."""
    staging = uploads.root / f".set-{secrets.token_hex(8)}"
    staging.mkdir(mode=0o770)
    moved: list[tuple[Upload, str]] = []
    target = None
    try:
        for upload, file_name in zip(sets, file_names):
            os.rename(upload.data, staging / file_name)
            moved.append((upload, file_name))
        taken = taken_names(cfg)  # what the claim avoids too, so the job keeps this name
        target = _free(cfg.folder("inbox"), name, lambda n: known(n) or n in taken)
        (staging / "job.yaml").write_text(yaml.safe_dump(_manifest(form, target.name), sort_keys=False),
                                          encoding="utf-8")
        (staging / READY_MARKER).touch()
        move(staging, target)
    except OSError as exc:
        if target is not None and target.exists():
            return target  # handed over; only the staging's removal failed (the web_uploads sweep takes it)
        for upload, file_name in moved:
            with contextlib.suppress(OSError):
                os.rename(staging / file_name, upload.data)
        shutil.rmtree(staging, ignore_errors=True)
        raise UploadRefused(503, f"the files could not be moved into the inbox: {exc.strerror or exc}",
                            "press Send again; if it fails again, tell the operator (the uploads are kept)") from None
    return target


def hand_over(cfg: Config, uploads: Uploads, user: str, form: JobForm,
              known: Callable[[str], bool]) -> tuple[str, int, int]:
    """Check the set and move it into the inbox. Returns the folder's name, the files and their bytes;
    raises UploadRefused (nothing moved) when the set is not a job."""
    _check_form(cfg, form)
    with _MOVING:
        sets = _uploads(uploads, user, form.ids)
        name = safe_name(form.name or Path(sets[0].name).stem)
        file_names = _file_names(sets)
        _check_plan(cfg, name, sets, file_names, _manifest(form, name))
        for upload in sets:
            _probe(cfg, upload)
        target = _move_in(cfg, uploads, sets, file_names, form, name, known)
        for upload in sets:
            uploads.remove(upload)
    return target.name, len(sets), sum(u.length for u in sets)
