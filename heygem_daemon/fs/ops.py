"""File moves and writes that are atomic where the filesystem allows and never lose data where it does not."""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat
import uuid
from pathlib import Path
from typing import Any


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def display_name(name: str) -> str:
    """A file name safe to print or put in JSON, even when it is not valid UTF-8 on disk."""
    return os.fsencode(name).decode("utf-8", "backslashreplace")


def move(src: Path, dst: Path) -> None:
    """Rename src to dst; across filesystems (inbox on a share) copy to a temp name, rename, then delete src.

    A crash mid-copy leaves src intact and only a hidden temp beside dst, so nothing is ever lost.
    """
    if dst.exists() or dst.is_symlink():
        raise FileExistsError(errno.EEXIST, "destination exists", str(dst))
    try:
        os.rename(src, dst)
        return
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
    tmp = dst.with_name(f".{dst.name}.{uuid.uuid4().hex[:8]}.moving")
    st = os.lstat(src)
    if stat.S_ISDIR(st.st_mode):
        shutil.copytree(src, tmp, symlinks=True, copy_function=_copy_entry)
        os.rename(tmp, dst)
        shutil.rmtree(src)
        return
    _copy_entry(str(src), str(tmp))
    os.rename(tmp, dst)
    os.unlink(src)


def _copy_entry(src: str, dst: str) -> str:
    """Copy one entry without following links or opening special files (a FIFO would block forever)."""
    st = os.lstat(src)
    if stat.S_ISLNK(st.st_mode):
        os.symlink(os.readlink(src), dst)
    elif stat.S_ISREG(st.st_mode):
        shutil.copy2(src, dst, follow_symlinks=False)
        with open(dst, "rb") as fh:
            os.fsync(fh.fileno())
    else:
        # FIFOs, sockets, devices hold no data of their own: an empty placeholder keeps the name visible.
        Path(dst).write_bytes(b"")
    return dst


def remove_tree(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    elif path.exists():
        shutil.rmtree(path, ignore_errors=True)
