"""Names that leave the machine: zip entry names, object keys, zip file names. Never a path escape."""

from __future__ import annotations

import secrets
import time

TOKEN_BYTES = 12  # 96 random bits: a shared link's neighbours cannot be guessed


def safe_relpath(name: str) -> str:
    """A relative POSIX path without `..`, `.`, empty, drive or absolute parts; ValueError when nothing is left."""
    parts = name.replace("\\", "/").split("/")
    kept = [p for p in parts if p not in ("", ".", "..") and not (len(p) == 2 and p[1] == ":")]
    if not kept:
        raise ValueError(f"{name!r} has no usable file name")
    return "/".join(kept)


def object_key(template: str, job: str, file: str, when: float) -> str:
    """Render s3.key_prefix once per output; the key is stored, so retries reuse it (one object, ever)."""
    key = template.format(date=time.strftime("%Y-%m-%d", time.gmtime(when)), job=safe_relpath(job or "loose"),
                          token=secrets.token_hex(TOKEN_BYTES), file=safe_relpath(file))
    return key.lstrip("/")


def static_prefix(template: str) -> str:
    """The part of the key template before its first placeholder: where all our objects live."""
    return template.split("{", 1)[0].lstrip("/")


def zip_name(job_name: str, when: float) -> str:
    return f"{safe_relpath(job_name).replace('/', '_')}_{time.strftime('%Y%m%d_%H%M', time.localtime(when))}.zip"
