"""Presigned GET links that name the file for the browser, and the links.json / links.txt people open."""

from __future__ import annotations

import time
import unicodedata
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import quote

from botocore.client import BaseClient

from heygem_daemon.fs.ops import atomic_write_json, atomic_write_text

LINKS_JSON = "links.json"


@dataclass(frozen=True)
class LinkEntry:
    file: str
    """Name relative to the batch folder."""
    size: int
    path: str
    """Where the file lies on this machine."""
    sha256: str | None = None
    key: str | None = None
    link: str | None = None
    """Presigned GET link; None in local-only mode (the path is the link then)."""
    expires_at: str | None = None


def content_disposition(filename: str) -> str:
    """`attachment` with the base name; RFC 6266 filename*=UTF-8'' for names that are not plain ASCII."""
    base = filename.rsplit("/", 1)[-1]
    fallback = unicodedata.normalize("NFKD", base).encode("ascii", "ignore").decode()
    fallback = "".join(c if c.isalnum() or c in "._- " else "_" for c in fallback).strip() or "video"
    if fallback == base:
        return f'attachment; filename="{base}"'
    return f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{quote(base, safe='')}"


def presign_get(client: BaseClient, bucket: str, key: str, filename: str, expires_in: int) -> str:
    return client.generate_presigned_url(
        "get_object", ExpiresIn=expires_in,
        Params={"Bucket": bucket, "Key": key, "ResponseContentDisposition": content_disposition(filename)})


def iso_utc(when: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(when))


def _human_size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.1f} {unit}" if unit != "B" else f"{n} B"
        size /= 1024
    return f"{n} B"


def write_links(folder: Path, stem: str, batch: str, files: list[LinkEntry], zip_entry: LinkEntry | None) -> Path:
    """`<stem>.json` and `<stem>.txt` in `folder`, both replaced atomically (a reader never sees half)."""
    folder.mkdir(parents=True, exist_ok=True)
    doc = {"job": batch, "written_at": iso_utc(time.time()), "files": [asdict(f) for f in files],
           "zip": asdict(zip_entry) if zip_entry else None}
    target = folder / f"{stem}.json"
    atomic_write_json(target, doc)
    lines = [f"{batch}: {len(files)} video(s)", ""]
    for f in [*files, *([zip_entry] if zip_entry else [])]:
        lines.append(f"{f.file}  ({_human_size(f.size)}" + (f", sha256 {f.sha256}" if f.sha256 else "") + ")")
        lines.append(f"  {f.link or f.path}")
        if f.expires_at:
            lines.append(f"  link valid until {f.expires_at}")
        lines.append("")
    atomic_write_text(folder / f"{stem}.txt", "\n".join(lines))
    return target
