"""logs/audit.log: one JSON line per delivered file and per zip — who dropped it, when, what went where —
and one per action a person took in the web console (upload, retry, cancel) with who took it.

Links are written without their query string: the signature and credential scope never reach the log.
Each line is appended with O_APPEND and fsynced before record() returns, so a line once acknowledged
survives a kill (or a power cut); opening by path each time follows logrotate moving the file away.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any

AUDIT_FILE = "audit.log"


def strip_query(url: str | None) -> str | None:
    return url.split("?", 1)[0] if url else url


class AuditLog:
    def __init__(self, logs_dir: Path) -> None:
        self.path = logs_dir / AUDIT_FILE
        self._lock = threading.Lock()

    def _append(self, line: str) -> None:
        data = (line + "\n").encode("utf-8")
        with self._lock:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
            try:
                while data:
                    data = data[os.write(fd, data):]
                os.fsync(fd)
            finally:
                os.close(fd)

    def record(self, event: str, *, job: str, job_id: str | None, owner: str | None, dropped_at: float | None,
               files: int, total_bytes: int, keys: list[str], links: list[str | None]) -> None:
        line: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "event": event, "job": job,
            "job_id": job_id, "owner": owner,
            "dropped_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(dropped_at)) if dropped_at else None,
            "files": files, "bytes": total_bytes, "keys": keys, "links": [strip_query(u) for u in links],
        }
        self._append(json.dumps(line, ensure_ascii=False))

    def action(self, event: str, *, user: str, job: str, **details: Any) -> None:
        """A person's request from the web console: what, by whom, for which job."""
        line = {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "event": event, "user": user,
                "job": job, **details}
        self._append(json.dumps(line, ensure_ascii=False))
