"""File moves and writes that are atomic where the filesystem allows and never lose data where it does not."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import stat
import uuid
from pathlib import Path
from typing import Any

from heygem_daemon.fs.files import user_name

OWN_TEMP = re.compile(r"^\..+\.[0-9a-f]{8}\.(tmp|moving)$")
"""The hidden names this module writes through (`.<name>.<8 hex>.tmp|.moving`): never an input, and
safe to delete once no process holds them open."""


def temp_name(path: Path, suffix: str = "tmp", folder: Path | None = None) -> Path:
    """A hidden name that OWN_TEMP recognises (zips, links, error.json and moves use it): beside `path`, or in
    `folder` (on the same filesystem, since it is renamed onto `path`) where people do not look."""
    return (folder or path.parent) / f".{path.name}.{uuid.uuid4().hex[:8]}.{suffix}"


def is_own_temp(name: str) -> bool:
    return OWN_TEMP.match(name) is not None


def atomic_write_text(path: Path, text: str, temp_dir: Path | None = None) -> None:
    tmp = temp_name(path, folder=temp_dir)
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, data: Any, temp_dir: Path | None = None) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n", temp_dir)


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
    tmp = temp_name(dst, "moving")
    is_dir = stat.S_ISDIR(os.lstat(src).st_mode)
    try:
        if is_dir:
            shutil.copytree(src, tmp, symlinks=True, copy_function=_copy_entry)
        else:
            _copy_entry(str(src), str(tmp))
        os.rename(tmp, dst)
    except BaseException:
        # A full disk (ENOSPC) or a kill mid-copy: the source is intact, so the half copy is only waste.
        remove_tree(tmp)
        raise
    if is_dir:
        shutil.rmtree(src)
    else:
        os.unlink(src)


def same_filesystem(a: Path, b: Path) -> bool:
    return os.stat(a).st_dev == os.stat(b).st_dev


def move_blocker(path: Path) -> tuple[str, str] | None:
    """Why this process cannot move `path` out of its folder, and what fixes it (None when it can): renaming
    needs write access to the folder it leaves, a sticky folder (mode +t) only lets the entry's owner or the
    folder's owner rename, and a folder changing parents (or copied across filesystems, then deleted) needs
    write access to itself."""
    parent = path.parent
    st, pst = os.lstat(path), os.stat(parent)
    later = "; it is taken as soon as it can be moved"
    # Names only for the refusal text: a user look-up (NSS, maybe LDAP) on every inbox entry is not free.
    def me() -> str:
        return user_name(os.geteuid())

    if not os.access(parent, os.W_OK | os.X_OK, effective_ids=True):
        return (f"the daemon's user {me()} cannot write to {parent.name}/, so it cannot move {path.name} out",
                f"chmod g+w (or o+w) '{parent.name}' with the daemon's user in its group{later}")
    if pst.st_mode & stat.S_ISVTX and os.geteuid() not in (0, st.st_uid, pst.st_uid):
        # No mode bit helps here: only ownership counts in a sticky folder.
        return (f"{parent.name}/ is sticky (mode +t) and {path.name} belongs to {user_name(st.st_uid)}, "
                f"not to the daemon's user {me()}",
                f"make the daemon's user own the folder (chown {me()} '{parent.name}': a sticky folder's owner "
                f"may move anything in it) or clear its sticky bit (chmod -t '{parent.name}'){later}")
    if stat.S_ISDIR(st.st_mode) and not os.access(path, os.W_OK | os.X_OK, effective_ids=True):
        return (f"the folder {path.name} (owner {user_name(st.st_uid)}, mode {stat.filemode(st.st_mode)}) is not "
                f"writable by the daemon's user {me()}, so it cannot be moved",
                f"chmod g+w (or o+w) '{path.name}', or drop it as a user in the daemon's group{later}")
    return None


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
