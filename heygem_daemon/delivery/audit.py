"""logs/audit.log: one JSON line per delivered file and per zip — who dropped it, when, what went where.

Links are written without their query string: the signature and credential scope never reach the log.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import time
from pathlib import Path
from typing import Any

AUDIT_FILE = "audit.log"


def strip_query(url: str | None) -> str | None:
    return url.split("?", 1)[0] if url else url


class AuditLog:
    def __init__(self, logs_dir: Path) -> None:
        self._logger = logging.getLogger("heygem.audit")
        self._logger.propagate = False
        self._logger.setLevel(logging.INFO)
        target = str(logs_dir / AUDIT_FILE)
        if not any(getattr(h, "baseFilename", None) == target for h in self._logger.handlers):
            # WatchedFileHandler reopens the file after logrotate moves it away.
            handler = logging.handlers.WatchedFileHandler(target, encoding="utf-8")
            handler.setFormatter(logging.Formatter("%(message)s"))
            self._logger.addHandler(handler)

    def record(self, event: str, *, job: str, job_id: str | None, owner: str | None, dropped_at: float | None,
               files: int, total_bytes: int, keys: list[str], links: list[str | None]) -> None:
        line: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "event": event, "job": job,
            "job_id": job_id, "owner": owner,
            "dropped_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(dropped_at)) if dropped_at else None,
            "files": files, "bytes": total_bytes, "keys": keys, "links": [strip_query(u) for u in links],
        }
        self._logger.info(json.dumps(line, ensure_ascii=False))
