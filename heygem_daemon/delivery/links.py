"""Presigned GET links that name the file for the browser, and the links.json / links.txt people open."""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import quote

from anyascii import anyascii
from botocore.client import BaseClient

from heygem_daemon.delivery.report import size_text
from heygem_daemon.fs.ops import atomic_write_json, atomic_write_text

LINKS_JSON = "links.json"
HIDDEN_TEMPS = ".heygem-tmp"
"""outputs/.heygem-tmp/: where files for outputs/ are written before they are renamed into place, so a write cut
short by a kill leaves its temp there (for the temp sweep), never in a folder people open."""


@dataclass(frozen=True)
class LinkEntry:
    file: str
    """Name relative to the batch folder."""
    size: int
    path: str | None
    """Where the file lies on this machine; None for a zip streamed straight into the bucket."""
    sha256: str | None = None
    key: str | None = None
    link: str | None = None
    """Presigned GET link; None in local-only mode (the path is the link then)."""
    expires_at: str | None = None


def _ascii_fallback(base: str) -> str:
    """The name for clients that ignore filename*: transliterated (陈老师 -> ChenLaoShi, Grüße -> Grusse), never
    a bare `.mp4` (a hidden file for curl -OJ). A name with nothing alphanumeric left (only symbols) becomes
    `video-<8 hex of the name>.mp4`, unique per name."""
    stem, dot, suffix = base.rpartition(".") if "." in base.lstrip(".") else (base, "", "")
    ascii_stem = _ascii(stem)
    if not any(c.isalnum() for c in ascii_stem):
        ascii_stem = f"video-{hashlib.sha256(base.encode()).hexdigest()[:8]}"
    return ascii_stem + (dot + (_ascii(suffix) or "bin") if dot else "")


def _ascii(text: str) -> str:
    return "".join(c if c.isalnum() or c in "._- " else "_" for c in anyascii(text)).strip()


def content_disposition(filename: str) -> str:
    """`attachment` with the base name; RFC 6266 filename*=UTF-8'' for names that are not plain ASCII."""
    base = filename.rsplit("/", 1)[-1]
    fallback = _ascii_fallback(base)
    if fallback == base:
        return f'attachment; filename="{base}"'
    return f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{quote(base, safe='')}"


def link_seconds(hours: float) -> int:
    """s3.link_expiry_hours as the whole seconds a presigned link takes (at least one: fractions are for tests)."""
    return max(1, round(hours * 3600))


def presign_get(client: BaseClient, bucket: str, key: str, filename: str, expires_in: int) -> str:
    return client.generate_presigned_url(
        "get_object", ExpiresIn=expires_in,
        Params={"Bucket": bucket, "Key": key, "ResponseContentDisposition": content_disposition(filename)})


def iso_utc(when: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(when))


def listed(folder: Path, rel: str, size: int) -> bool:
    """Whether `folder`'s links.json lists `rel` (relative to the folder) at this size: a video delivered
    before, even if the store lost its record since (a WAL lost with a crash, a database restored from backup)."""
    try:
        with open(folder / LINKS_JSON, "rb") as fh:
            doc = json.load(fh)
    except (OSError, ValueError):
        return False
    files = doc.get("files") if isinstance(doc, dict) else None
    return isinstance(files, list) and any(
        isinstance(f, dict) and f.get("file") == rel and f.get("size") == size for f in files)


def write_links(folder: Path, stem: str, batch: str, files: list[LinkEntry], zip_entry: LinkEntry | None,
                temps: Path) -> Path:
    """`<stem>.json` and `<stem>.txt` in `folder`, both replaced atomically (a reader never sees half); their
    temps are written in `temps` (HIDDEN_TEMPS, same filesystem)."""
    folder.mkdir(parents=True, exist_ok=True)
    temps.mkdir(exist_ok=True)
    doc = {"job": batch, "written_at": iso_utc(time.time()), "files": [asdict(f) for f in files],
           "zip": asdict(zip_entry) if zip_entry else None}
    target = folder / f"{stem}.json"
    atomic_write_json(target, doc, temps)
    lines = [f"{batch}: {len(files)} video(s)", ""]
    for f in [*files, *([zip_entry] if zip_entry else [])]:
        lines.append(f"{f.file}  ({size_text(f.size)}" + (f", sha256 {f.sha256}" if f.sha256 else "") + ")")
        lines.append(f"  {f.link or f.path}")
        if f.expires_at:
            lines.append(f"  link valid until {f.expires_at}")
        lines.append("")
    atomic_write_text(folder / f"{stem}.txt", "\n".join(lines), temps)
    return target
