"""One stored (uncompressed) zip of a batch's videos, written front to back into any stream.

zipfile writes to a stream it cannot seek with data descriptors after each entry, and switches to
zip64 by itself for entries or archives over 4 GiB, so the zip can go straight into an S3 multipart
upload: memory holds one copy buffer, never the archive. MP4 is already compressed, so deflate would
only burn CPU.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
import zipfile
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from heygem_daemon.delivery.names import safe_relpath
from heygem_daemon.fs.ops import temp_name

COPY_BUFFER = 1024 * 1024
ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)  # the earliest time a zip header can hold


def entry_names(rels: list[str]) -> list[str]:
    """Sanitised, unique entry names: no `..`, nothing absolute; clashes get ` (2)`, ` (3)`..."""
    seen: set[str] = set()
    names = []
    for rel in rels:
        name = safe_relpath(rel)
        stem, suffix, n = PurePosixPath(name).with_suffix(""), PurePosixPath(name).suffix, 1
        while name.casefold() in seen:
            n += 1
            name = f"{stem} ({n}){suffix}"
        seen.add(name.casefold())
        names.append(name)
    return names


def _info(path: Path, name: str) -> zipfile.ZipInfo:
    st = path.stat()
    stamp = max(time.localtime(st.st_mtime)[:6], ZIP_EPOCH)
    info = zipfile.ZipInfo(name, date_time=stamp)
    info.compress_type = zipfile.ZIP_STORED
    info.file_size = st.st_size  # known up front, so zipfile picks zip64 for big entries by itself
    info.external_attr = 0o644 << 16
    return info


class _Hashing:
    """Passes writes on and hashes them. It has no seek/tell, so zipfile writes front to back (data
    descriptors) and never rewrites a header: the hash is the archive's, computed without a second read."""

    def __init__(self, out: BinaryIO) -> None:
        self.out, self.sha = out, hashlib.sha256()

    def write(self, data: bytes) -> int:
        self.sha.update(data)
        return self.out.write(data)

    def flush(self) -> None:
        self.out.flush()


def write_zip(files: list[tuple[Path, str]], out: BinaryIO) -> str:
    """Write (path, name-in-batch) pairs as a stored zip into `out`; returns the archive's sha256."""
    names = entry_names([rel for _, rel in files])
    hashing = _Hashing(out)
    with zipfile.ZipFile(hashing, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:  # type: ignore[call-overload]
        for (path, _), name in zip(files, names):
            with open(path, "rb") as src, zf.open(_info(path, name), "w") as dst:
                shutil.copyfileobj(src, dst, COPY_BUFFER)
    return hashing.sha.hexdigest()


def write_local_zip(files: list[tuple[Path, str]], dest: Path, temps: Path) -> tuple[int, str]:
    """The zip beside the videos (local-only mode), written in `temps` (same filesystem, where people do not
    look) and renamed into place only once complete: (size, sha256)."""
    temps.mkdir(exist_ok=True)
    tmp = temp_name(dest, folder=temps)
    try:
        with open(tmp, "wb") as fh:
            sha256 = write_zip(files, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest.stat().st_size, sha256
