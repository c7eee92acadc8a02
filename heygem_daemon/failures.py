"""error.json: what went wrong, at which stage, and what a person should do about it."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from heygem_daemon.fsops import atomic_write_json

ERROR_FILE = "error.json"


def error_record(job_name: str, stage: str, problems: list[dict[str, str]], **extra: Any) -> dict[str, Any]:
    first = problems[0] if problems else {"file": "", "reason": "unknown error", "hint": ""}
    reason = f"{first['file']}: {first['reason']}" if first.get("file") else first["reason"]
    return {
        "job": job_name,
        "stage": stage,
        "reason": reason,
        "hint": first.get("hint", ""),
        "problems": problems,
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **extra,
    }


def write_error_json(folder: Path, record: dict[str, Any]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / ERROR_FILE
    atomic_write_json(path, record)
    return path


def warnings_of(spec: dict[str, Any]) -> dict[str, Any]:
    """A job's warnings (e.g. a refused job.yaml chat target) as error.json's `warnings`, when it has any."""
    return {"warnings": spec["warnings"]} if spec.get("warnings") else {}
