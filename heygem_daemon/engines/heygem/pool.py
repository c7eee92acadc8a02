"""Which HeyGem service a task may use. Worker processes are separate, so the pool is a set of fcntl
lock files, one per service: holding the lock means "this service is running my job". The kernel drops
a lock when its process dies, so a killed worker never leaves a service marked as taken."""

from __future__ import annotations

import fcntl
import hashlib
from collections.abc import Collection
from pathlib import Path
from types import TracebackType
from typing import IO


class Lease:
    def __init__(self, url: str, handle: IO[str]) -> None:
        self.url = url
        self._handle = handle

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._handle.close()


class ServicePool:
    def __init__(self, urls: list[str], lock_dir: Path) -> None:
        self.urls = urls
        self.lock_dir = lock_dir

    def _lock_file(self, url: str) -> Path:
        return self.lock_dir / f"{hashlib.sha256(url.encode()).hexdigest()[:16]}.lock"

    def try_acquire(self, start: int, skip: Collection[str] = ()) -> Lease | None:
        """A free service (trying from index `start` on, so tasks spread), or None when all are taken."""
        self.lock_dir.mkdir(parents=True, exist_ok=True)
        for i in range(len(self.urls)):
            url = self.urls[(start + i) % len(self.urls)]
            if url in skip:
                continue
            handle = open(self._lock_file(url), "a+", encoding="utf-8")
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.close()
                continue
            return Lease(url, handle)
        return None
