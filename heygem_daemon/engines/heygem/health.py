"""What the workers saw of each service, for `status`, `doctor` and the operator's alerts.

Workers run in their own processes and the daemon reads what they saw, so each service has a small JSON
file beside its lock (`<data_dir>/.heygem-daemon-locks/<key>.json`). Only the holder of the service's
lease writes it (see pool.py), so writers never race; readers get whole files (atomic replace)."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Literal

from heygem_daemon.engines.heygem.client import HeygemClient, unanswered
from heygem_daemon.engines.heygem.pool import ServicePool, health_file
from heygem_daemon.engines.heygem.settings import Endpoint
from heygem_daemon.fs.ops import atomic_write_json

Outcome = Literal["ok", "busy", "down"]
# "ok" is seen at every poll of a render; written again at most this often, enough for `status`. Busy
# and down are written each time (every busy_retry_interval): how long they last is what matters.
_OK_REFRESH_SECONDS = 15.0


@dataclass(frozen=True)
class Health:
    url: str
    last_seen: float = 0.0
    """When a worker last asked the service."""
    last_ok: float | None = None
    down_since: float | None = None
    """No answer at all since then (container down or restarting)."""
    busy_since: float | None = None
    """Answering 10001 to us since then: a job that is not ours holds it."""
    reason: str = ""

    def saw(self, outcome: Outcome, now: float, reason: str = "") -> Health:
        if outcome == "ok":
            return replace(self, last_seen=now, last_ok=now, down_since=None, busy_since=None, reason="")
        if outcome == "busy":
            return replace(self, last_seen=now, down_since=None, busy_since=self.busy_since or now, reason="")
        return replace(self, last_seen=now, down_since=self.down_since or now, busy_since=None, reason=reason)


def read_health(path: Path, url: str) -> Health | None:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        return Health(**{**raw, "url": url})
    except (OSError, ValueError, TypeError):
        return None


class HealthBook:
    """One worker's writer for one service's file."""

    def __init__(self, path: Path, url: str) -> None:
        self.path, self.url = path, url
        self._written: tuple[Outcome, float] | None = None

    def saw(self, outcome: Outcome, reason: str = "") -> None:
        now = time.time()
        if (outcome == "ok" and self._written and self._written[0] == "ok"
                and now - self._written[1] < _OK_REFRESH_SECONDS):
            return
        current = read_health(self.path, self.url) or Health(self.url)
        try:
            atomic_write_json(self.path, asdict(current.saw(outcome, now, reason)))
        except OSError:
            return  # bookkeeping for the operator: never a reason to fail a job
        self._written = (outcome, now)


def probe(endpoint: Endpoint, timeout: float) -> bool:
    """Whether a service that was down answers now, for the daemon's outage watch. What it saw is written
    only under the service's lease (one writer per file); a worker holding it writes its own."""
    if not endpoint.data_dir.is_dir():
        return False  # not mounted: no task can use the service, answer or not
    why = unanswered(HeygemClient(endpoint.url, timeout))
    lease = ServicePool([endpoint]).try_acquire(0)
    if lease is not None:
        with lease:
            HealthBook(health_file(endpoint), endpoint.url).saw("down" if why else "ok", why)
    return not why
