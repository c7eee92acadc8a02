"""Resumable uploads on disk: work/.uploads/<id>/ holds `data` (the bytes so far) and `info.json` (owner,
declared length, file name). Plain files, no starlette, so the daemon's cleanup can sweep them.

An id is 32 random hex digits (128 bits) and belongs to the user who made it: anyone else is told it does
not exist. An upload untouched for web.upload_expiry_hours is gone (the `web_uploads` sweep removes it).

Disk: an upload holds its whole length from the moment it is made. What every live upload has still to
write counts as used, so twenty uploads made at once cannot together push work/ under
disk_guard.min_free_gb; the same sum is checked again before each PATCH (the disk may have filled since).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import threading
import time
import unicodedata
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from heygem_daemon.config import Config
from heygem_daemon.fs.ops import atomic_write_json
from heygem_daemon.intake.pairing import safe_name
from heygem_daemon.media.kinds import MediaKind, kind_of

UPLOADS_DIR = ".uploads"
DATA = "data"
INFO = "info.json"
_ID = re.compile(r"^[0-9a-f]{32}$")
HOUR = 3600.0

if TYPE_CHECKING:
    from heygem_daemon.ops.cleanup import Sweep


class UploadRefused(Exception):
    """An upload that cannot be made: `status` is the HTTP answer, `reason` and `hint` are for the person."""

    def __init__(self, status: int, reason: str, hint: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.hint = hint


@dataclass(frozen=True)
class Upload:
    id: str
    user: str
    length: int
    name: str
    created: float
    folder: Path

    @property
    def data(self) -> Path:
        return self.folder / DATA

    @property
    def offset(self) -> int:
        return self.data.stat().st_size

    @property
    def complete(self) -> bool:
        return self.offset == self.length

    def touched(self) -> float:
        return self.data.stat().st_mtime


def clean_name(raw: str) -> str:
    """The file name as sent, refused when it names a path or holds control characters, then made safe."""
    if not raw or raw in (".", "..") or "/" in raw or "\\" in raw or os.path.isabs(raw):
        raise UploadRefused(400, f"file name {raw!r} is a path, not a name",
                            "upload a file by its plain name (no folders, no ..)")
    if any(unicodedata.category(ch) == "Cc" for ch in raw):
        raise UploadRefused(400, "file name holds control characters", "rename the file and upload it again")
    stem, ext = os.path.splitext(raw)
    return safe_name(stem, "file") + ext.lower()


class Uploads:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.root = cfg.folder("work") / UPLOADS_DIR
        self.root.mkdir(mode=0o770, exist_ok=True)
        self._making = threading.Lock()  # the room check and the new folder, as one step

    @property
    def expiry(self) -> float:
        return self.cfg.web.upload_expiry_hours * HOUR

    def expires_at(self, upload: Upload) -> float:
        return upload.touched() + self.expiry

    def create(self, user: str, length: int, raw_name: str) -> Upload:
        limit = self.cfg.web.max_upload_mb * 2**20
        name = clean_name(raw_name)
        if kind_of(name) is MediaKind.OTHER:
            raise UploadRefused(415, f"{name} is not an audio, script, image or video file",
                                "upload WAV, MP3, M4A, FLAC, OGG or OPUS audio or a .txt script, and JPEG, PNG, "
                                "WebP, MP4, MOV or WebM portraits")
        if length <= 0:
            raise UploadRefused(400, f"{name} is empty", "pick the file again")
        if length > limit:
            raise UploadRefused(413, f"{name} is {length / 2**20:.0f} MB, over the {self.cfg.web.max_upload_mb:g} "
                                "MB upload limit", "shorten or compress it, or ask the operator to raise "
                                "web.max_upload_mb")
        with self._making:
            self.check_room(name, length)
            upload_id = secrets.token_hex(16)
            folder = self.root / upload_id
            folder.mkdir(mode=0o770)
            (folder / DATA).touch(mode=0o660)
            upload = Upload(upload_id, user, length, name, time.time(), folder)
            info = {k: v for k, v in asdict(upload).items() if k != "folder"}
            atomic_write_json(folder / INFO, info)
        return upload

    def reserved(self, but: str = "") -> int:
        """Bytes the live uploads (all but the one named) have still to write: held against the disk guard."""
        total, now = 0, time.time()
        for entry in os.scandir(self.root):
            if entry.name == but or not _ID.match(entry.name):
                continue
            try:
                length = json.loads(Path(entry.path, INFO).read_text(encoding="utf-8"))["length"]
                data = os.stat(Path(entry.path, DATA))
            except (OSError, ValueError, KeyError, TypeError):
                continue  # being made, handed over or swept right now: it holds nothing
            if data.st_mtime + self.expiry >= now:
                total += max(0, int(length) - data.st_size)
        return total

    def check_room(self, name: str, need: int, but: str = "") -> None:
        """`need` more bytes for `name`, with what the other uploads hold, must leave disk_guard.min_free_gb."""
        free = shutil.disk_usage(self.root).free
        held = self.reserved(but)
        guard = self.cfg.disk_guard.min_free_gb * 2**30
        if free - held - need < guard:
            raise UploadRefused(507, f"not enough free space for {name}: it needs {need / 2**30:.2f} GB, "
                                f"{free / 2**30:.2f} GB are free, uploads in progress hold {held / 2**30:.2f} GB "
                                f"and disk_guard.min_free_gb = {self.cfg.disk_guard.min_free_gb:g} stays free",
                                "try again once other uploads have finished, or ask the operator to free space")

    def check_patch_room(self, upload: Upload) -> None:
        """Before a PATCH: the rest of this upload still fits beside the others (the disk may have filled)."""
        self.check_room(upload.name, upload.length - upload.offset, but=upload.id)

    def get(self, upload_id: str, user: str) -> Upload | None:
        """The upload, if it exists, belongs to `user` and has not expired."""
        if not _ID.match(upload_id):
            return None
        folder = self.root / upload_id
        try:
            info = json.loads((folder / INFO).read_text(encoding="utf-8"))
            upload = Upload(folder=folder, **info)
            expired = upload.touched() + self.expiry < time.time()
        except (FileNotFoundError, ValueError, TypeError):
            return None
        return upload if info["user"] == user and not expired else None

    def remove(self, upload: Upload) -> None:
        shutil.rmtree(upload.folder, ignore_errors=True)

    def remove_id(self, upload_id: str, user: str) -> None:
        found = self.get(upload_id, user)
        if found is not None:
            self.remove(found)


def _touched(folder: str) -> float:
    """When bytes last arrived (the data file), else when the folder was made."""
    try:
        return os.lstat(os.path.join(folder, DATA)).st_mtime
    except FileNotFoundError:
        return os.lstat(folder).st_mtime


def expired_uploads(sweep: Sweep) -> None:
    """Uploads from the web console untouched for web.upload_expiry_hours: cut off and never resumed,
    or finished but never handed over as a job."""
    root = sweep.cfg.folder("work") / UPLOADS_DIR
    cutoff = sweep.now - sweep.cfg.web.upload_expiry_hours * HOUR
    if not root.is_dir():
        return
    for entry in os.scandir(root):
        if not entry.is_dir(follow_symlinks=False):
            continue
        try:
            old = _touched(entry.path) < cutoff
        except FileNotFoundError:
            continue
        if old:
            sweep.remove(root / entry.name)
