"""The one failure model: a typed problem (kind, stage, reason, hint), and error.json built from problems.

Every stage (intake, engines, delivery, notifications) describes what went wrong with a `Problem`; its
`Kind` alone decides what happens next, so the rule lives in one place:

- ``bad_input``: the inputs cannot work. Fail now, no retry; the reason and hint go to the person.
- ``setup``: the daemon's own set-up is wrong (model file, encoder). Fail now; the operator fixes it and
  runs `retry`. Waiting on a timer would only burn attempts.
- ``engine``: the engine failed this time. A counted attempt, retried with backoff up to max_attempts.
- ``outage``: a dependency is out (engine service, S3, chat, disk full). Wait with backoff **without**
  using attempts; the operator is alerted after a while and `status` shows it.
- ``internal``: a fault outside the engine (our own code, the file system). A counted attempt with
  backoff, never a tight loop.
- ``cancelled``: the operator cancelled the job. It ends now, no retry; nothing needs fixing.
"""

from __future__ import annotations

import random
import time
from dataclasses import asdict, dataclass, replace
from enum import Enum
from pathlib import Path
from typing import Any

from heygem_daemon.fs.ops import atomic_write_json

ERROR_FILE = "error.json"


class Kind(str, Enum):
    BAD_INPUT = "bad_input"
    SETUP = "setup"
    ENGINE = "engine"
    OUTAGE = "outage"
    INTERNAL = "internal"
    CANCELLED = "cancelled"

    @property
    def retried(self) -> bool:
        """Another attempt may succeed (counted or not)."""
        return self in (Kind.ENGINE, Kind.OUTAGE, Kind.INTERNAL)

    @property
    def counts_attempt(self) -> bool:
        return self is not Kind.OUTAGE


@dataclass(frozen=True)
class Problem:
    kind: Kind
    stage: str
    reason: str
    hint: str = ""
    detail: str = ""
    file: str = ""
    """What the problem is about, as the person sees it (an input file, a task's pair); may be empty."""

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "kind": self.kind.value}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Problem:
        return cls(Kind(d.get("kind", Kind.ENGINE.value)), d.get("stage", ""), d.get("reason", ""),
                   d.get("hint", ""), d.get("detail", ""), d.get("file", ""))

    @classmethod
    def of_input(cls, file: str, reason: str, hint: str = "", stage: str = "intake") -> Problem:
        """Bad input found while pairing or probing: fail now, the reason and hint go to the person."""
        return cls(Kind.BAD_INPUT, stage, reason, hint, file=file)

    def about(self, file: str) -> Problem:
        return replace(self, file=file)

    @property
    def headline(self) -> str:
        return f"{self.file}: {self.reason}" if self.file else self.reason


def backoff_delay(attempt: int, base: float, cap: float) -> float:
    """Exponential backoff with full jitter: a crowd of retries does not come back in step."""
    return random.uniform(0.5, 1.0) * min(cap, base * (2 ** max(0, attempt - 1)))


def error_record(job_name: str, stage: str, problems: list[Problem], **extra: Any) -> dict[str, Any]:
    """error.json, the job's error and the failure message: the first problem headlines, all are listed."""
    first = problems[0] if problems else Problem(Kind.INTERNAL, stage, "unknown error")
    return {
        "job": job_name,
        "stage": stage,
        "kind": first.kind.value,
        "reason": first.headline,
        "hint": first.hint,
        "problems": [p.to_dict() for p in problems],
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
