"""Which HeyGem service a task may use. Worker processes are separate, so the pool is a set of fcntl
lock files, one per service, in that service's own data folder (`<data_dir>/.heygem-daemon-locks/`):
holding the lock means "this service is running my job", also for daemons on other hosts sharing the
folder. The kernel drops a lock when its process dies, so a killed worker never leaves a service taken."""

from __future__ import annotations

import fcntl
import hashlib
from collections.abc import Collection
from pathlib import Path
from types import TracebackType
from typing import IO

from heygem_daemon.engines.heygem.settings import Endpoint

LOCK_DIR = ".heygem-daemon-locks"


def _key(url: str) -> str:
    return hashlib.sha256(url.encode()).hexdigest()[:16]


def lock_file(endpoint: Endpoint) -> Path:
    return endpoint.data_dir / LOCK_DIR / f"{_key(endpoint.url)}.lock"


def health_file(endpoint: Endpoint) -> Path:
    return endpoint.data_dir / LOCK_DIR / f"{_key(endpoint.url)}.json"


class Lease:
    def __init__(self, endpoint: Endpoint, handle: IO[str]) -> None:
        self.endpoint = endpoint
        self.url = endpoint.url
        self._handle = handle

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._handle.close()


class ServicePool:
    def __init__(self, endpoints: list[Endpoint]) -> None:
        self.endpoints = endpoints

    def try_acquire(self, start: int, skip: Collection[str] = ()) -> Lease | None:
        """A free service (trying from index `start` on, so tasks spread), or None when all are taken.
        Only services whose data folder is there (mounted) are offered: the caller checks that first."""
        for i in range(len(self.endpoints)):
            endpoint = self.endpoints[(start + i) % len(self.endpoints)]
            if endpoint.url in skip:
                continue
            path = lock_file(endpoint)
            path.parent.mkdir(exist_ok=True)  # never parents: an unmounted data_dir must stay absent
            handle = open(path, "a+", encoding="utf-8")
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.close()
                continue
            return Lease(endpoint, handle)
        return None
