"""A finished set of uploads becomes a job: checked as intake checks files (type, size, duration), then
moved into the inbox as `<name>/` with job.yaml and `.ready`, which the daemon takes like any drop."""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import yaml

from heygem_daemon.config import Config
from heygem_daemon.engines.registry import engine_names
from heygem_daemon.failures import Problem
from heygem_daemon.fs.ops import move
from heygem_daemon.intake.claim import taken_names
from heygem_daemon.intake.pairing import READY_MARKER, FileInfo, Wait, implicit_pairs, safe_name
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


def _check_pairing(folder: str, uploads: list[Upload], file_names: list[str]) -> None:
    """The daemon pairs the folder by intake's rule (job.yaml lists no pairs): a set it would refuse is
    refused now, in intake's words, before anything moves."""
    files: list[FileInfo] = []
    for upload, name in zip(uploads, file_names):
        st = os.stat(upload.data)
        files.append(FileInfo(f"{folder}/{name}", st.st_size, st.st_mtime_ns, st.st_mode))
    paired = implicit_pairs(folder, files)
    problem = paired.problem if isinstance(paired, Wait) else paired  # no partner arrives later on the web
    if isinstance(problem, Problem):
        raise _refuse(problem.reason, problem.hint)


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


def hand_over(cfg: Config, uploads: Uploads, user: str, form: JobForm,
              known: Callable[[str], bool]) -> tuple[str, int, int]:
    """Check the set and move it into the inbox. Returns the folder's name, the files and their bytes;
    raises UploadRefused (nothing moved) when the set is not a job."""
    _check_form(cfg, form)
    found = [uploads.get(i, user) for i in form.ids]
    if any(u is None for u in found):
        raise _refuse("an upload of this job has expired or was never made", "upload the files again")
    sets = [u for u in found if u is not None]
    if any(not u.complete for u in sets):
        raise _refuse("not every file has finished uploading", "wait for every bar to reach 100 %, then send")
    name = safe_name(form.name or Path(sets[0].name).stem)
    file_names = _file_names(sets)
    _check_pairing(name, sets, file_names)
    for upload in sets:
        _probe(cfg, upload)
    staging = uploads.root / f".set-{secrets.token_hex(8)}"
    staging.mkdir(mode=0o770)
    for upload, file_name in zip(sets, file_names):
        os.rename(upload.data, staging / file_name)
    taken = taken_names(cfg)  # what the claim avoids too, so the job keeps this name
    target = _free(cfg.folder("inbox"), name, lambda n: known(n) or n in taken)
    manifest = {"name": target.name, "engine": form.engine, "preset": form.preset, "priority": form.priority,
                "upload": form.upload}
    (staging / "job.yaml").write_text(yaml.safe_dump(manifest, sort_keys=False), encoding="utf-8")
    (staging / READY_MARKER).touch()
    move(staging, target)
    for upload in sets:
        uploads.remove(upload)
    return target.name, len(sets), sum(u.length for u in sets)
