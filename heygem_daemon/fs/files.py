"""Facts about a file that several stages need: its content digest and who owns it."""

from __future__ import annotations

import hashlib
import os
import pwd
from pathlib import Path

HASH_CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def file_owner(path: Path) -> str:
    return user_name(os.lstat(path).st_uid)


def user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def open_paths(proc: Path = Path("/proc")) -> set[str]:
    """Every path some process we may inspect holds open (Linux /proc/<pid>/fd): a temp file in this set
    still has a writer, whatever its age."""
    held: set[str] = set()
    for fd_dir in proc.glob("[0-9]*/fd"):
        try:
            fds = os.listdir(fd_dir)
        except OSError:  # gone, or another user's process
            continue
        for fd in fds:
            try:
                held.add(os.readlink(fd_dir / fd))
            except OSError:
                continue
    return held
