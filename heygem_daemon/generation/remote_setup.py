"""A remote worker's own set-up, and what each worker tells the daemon about itself through Redis.

A wrong set-up on a worker host (its engine's section, the share it maps the daemon's folders to, the
bucket reached with its own key) is that worker's problem, not the task's. The worker checks it before it
takes any task and refuses to consume until the check passes; a problem found while running a task sends
the task back without using an attempt and stops the worker taking more (quarantine) until it is restarted.

Each worker keeps an entry in two Redis hashes the daemon reads for `status`, `doctor`, metrics and
alerts: `heygem:workers` (its queue and devices, refreshed every PRESENCE_SECONDS) and
`heygem:worker-problems` (why it takes no task). An entry not refreshed for PRESENCE_TTL_SECONDS is a
worker gone (hosts keep their clocks in step: presigned links need it too).
"""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from heygem_daemon.config import Config, ConfigError, Remote
from heygem_daemon.log import get_logger

log = get_logger("heygem.remote_worker")
WORKERS_KEY = "heygem:workers"
PROBLEMS_KEY = "heygem:worker-problems"
PRESENCE_SECONDS = 5.0
PRESENCE_TTL_SECONDS = 30.0
"""A worker entry older than this is a worker gone (six missed refreshes: room for clocks a little apart)."""
CHECK_FOLDER = "heygem-worker-check"


class SetupProblem(Exception):
    """Why this worker cannot run tasks, and what to fix on its host."""

    def __init__(self, reason: str, hint: str) -> None:
        super().__init__(reason)
        self.reason, self.hint = reason, hint


# --- the checks ---

def setup_problems(cfg: Config, host: str) -> list[SetupProblem]:
    """Everything wrong with this worker host's set-up, checked with its own permissions; [] when it may
    take tasks. Writes (and deletes) one small object in the bucket with transfer s3."""
    remote = cfg.workers.remote
    assert remote is not None
    problems = [p for p in (engine_problem(cfg, name) for name in _engine_names(cfg)) if p]
    if remote.transfer == "s3":
        problems += [p for p in (bucket_problem(cfg, host),) if p]
    else:
        problems += share_problems(remote)
    return problems


def _engine_names(cfg: Config) -> list[str]:
    from heygem_daemon.engines.registry import engine_names

    return engine_names(cfg)


def engine_problem(cfg: Config, name: str) -> SetupProblem | None:
    """The engine's section on this host is missing or invalid (the daemon's own may be fine)."""
    from heygem_daemon.engines.registry import settings_for

    try:
        settings_for(cfg, name)
    except ConfigError as exc:
        return SetupProblem(f"engine {name}: {exc}", f"give this worker's config the daemon's engines.{name} "
                            "section (README \"Many GPU hosts\")")
    return None


def share_problems(remote: Remote) -> list[SetupProblem]:
    """Each folder the path map names on this host must hold the daemon's folders and take new files:
    an unmounted share is an empty (or missing) mount point."""
    from heygem_daemon.ops.doctor import unwritable

    problems = []
    for daemon_path, here in sorted(remote.path_map.items()):
        folder = Path(here)
        fix = (f"mount the daemon's {daemon_path} at {here} (README \"Many GPU hosts\"), or fix "
               "workers.remote.path_map")
        if not folder.is_dir() or not any(folder.iterdir()):
            state = "empty" if folder.is_dir() else "missing"
            problems.append(SetupProblem(f"{here} (the daemon's {daemon_path}) is {state}: the share is not "
                                         "mounted", fix))
        elif problem := unwritable(folder):
            problems.append(SetupProblem(f"{here} (the daemon's {daemon_path}) is not writable ({problem})",
                                         "mount the share read-write for this worker's user (README \"Many GPU "
                                         "hosts\": the same uid/gid on every host)"))
    return problems


def missing_input(paths: list[Path]) -> SetupProblem | None:
    """A shared-folder task whose inputs this host cannot see: the daemon has them, so the share is the
    problem (unmounted, or mapped wrong), not the task."""
    for path in paths:
        if not path.is_file():
            return SetupProblem(f"cannot see the task's input {path}: the share is not mounted here, or "
                                "workers.remote.path_map maps the daemon's folders wrongly",
                                "mount the daemon's folders as workers.remote.path_map says, then restart the "
                                "worker")
    return None


def bucket_problem(cfg: Config, host: str) -> SetupProblem | None:
    """The bucket answers this worker's key where it uploads: a small object put, read back and deleted
    under the key prefix (a key allowed only there may be refused HeadBucket)."""
    from heygem_daemon.delivery.names import static_prefix
    from heygem_daemon.delivery.s3 import S3Failure, describe, make_client, probe_write

    s3 = cfg.s3
    if not s3.enabled:
        return SetupProblem("this worker has no s3 section, but workers.remote.transfer is s3",
                            "give the worker's config the daemon's s3 section (bucket, endpoint_url, key_prefix) "
                            "and its credentials")
    name = "".join(c if c.isalnum() or c in "-_.@" else "_" for c in host)
    key = f"{static_prefix(s3.key_prefix)}{CHECK_FOLDER}/{name}-{uuid.uuid4().hex[:8]}"
    try:
        client = make_client(s3)
        probe_write(client, s3.bucket, key)
    except Exception as exc:
        failure = exc if isinstance(exc, S3Failure) else describe(exc, s3.bucket)
        return SetupProblem(f"cannot write to bucket {s3.bucket!r} at {s3.endpoint_url or 'AWS'} under "
                            f"{static_prefix(s3.key_prefix) or '/'}: {failure.reason}",
                            f"{failure.hint}; the worker needs PutObject, GetObject, DeleteObject and "
                            "AbortMultipartUpload under the daemon's s3.key_prefix")
    return None


# --- what the worker tells the daemon ---

class Presence:
    """This worker's entries in Redis, refreshed by a thread of the worker's main process."""

    def __init__(self, client: Any, host: str, queue: str, devices: list[str]) -> None:
        self.client, self.host = client, host
        self.entry = {"host": host, "queue": queue, "devices": devices, "pid": os.getpid()}
        self._stop = threading.Event()
        self._clearing = False
        self._thread = threading.Thread(target=self._run, name="worker-presence", daemon=True)

    def start(self) -> None:
        self.beat()
        self._thread.start()

    def beat(self) -> None:
        try:
            if self._clearing:
                self.client.hdel(PROBLEMS_KEY, self.host)
                self._clearing = False
            self.client.hset(WORKERS_KEY, self.host, json.dumps({**self.entry, "beat": time.time()}))
        except Exception as exc:  # Redis away: Celery waits for it too; the next beat tries again
            log.warning("cannot tell the daemon this worker is alive", error=str(exc))

    def _run(self) -> None:
        while not self._stop.wait(PRESENCE_SECONDS):
            self.beat()

    def problem(self, problems: list[SetupProblem]) -> None:
        report_problem(self.client, self.host, problems)

    def clear(self) -> None:
        """The set-up passes (again): no problem to show (with Redis away now, the next beat clears it)."""
        self._clearing = True
        self.beat()

    def leave(self) -> None:
        self._stop.set()
        try:
            self.client.hdel(WORKERS_KEY, self.host)
            self.client.hdel(PROBLEMS_KEY, self.host)
        except Exception as exc:
            log.warning("cannot remove this worker's entry from Redis", error=str(exc))


def report_problem(client: Any, host: str, problems: list[SetupProblem]) -> None:
    """Say in Redis why `host` takes no task (the daemon shows it and alerts). The same problem said again
    keeps its first time: the daemon alerts once per problem, not once per check. Never raises."""
    entry = {"reason": "; ".join(p.reason for p in problems), "hint": "; ".join(p.hint for p in problems),
             "since": time.time()}
    try:
        said = client.hget(PROBLEMS_KEY, host)
        if said and json.loads(said).get("reason") == entry["reason"]:
            entry["since"] = json.loads(said)["since"]
        client.hset(PROBLEMS_KEY, host, json.dumps(entry))
    except Exception as exc:
        log.warning("cannot tell the daemon this worker's problem", error=str(exc))


@dataclass(frozen=True)
class WorkerEntry:
    """A worker as Redis says it: its queue and devices, and why it takes no task (None when healthy)."""

    host: str
    queue: str
    devices: list[str]
    beat: float
    problem: dict[str, Any] | None


def live_workers(client: Any, now: float | None = None) -> list[WorkerEntry]:
    """The workers that refreshed their entry within PRESENCE_TTL_SECONDS. Raises what Redis raises."""
    with client.pipeline(transaction=False) as pipe:
        workers, problems = pipe.hgetall(WORKERS_KEY).hgetall(PROBLEMS_KEY).execute()
    now = time.time() if now is None else now
    found = []
    for raw_host, raw in workers.items():
        host = raw_host.decode() if isinstance(raw_host, bytes) else raw_host
        try:
            entry = json.loads(raw)
            problem = json.loads(problems[raw_host]) if raw_host in problems else None
        except ValueError:
            continue
        if now - float(entry.get("beat", 0)) <= PRESENCE_TTL_SECONDS:
            found.append(WorkerEntry(host, entry.get("queue", "?"), entry.get("devices", []), entry["beat"], problem))
    return sorted(found, key=lambda w: w.host)


def unserved(queues: list[str], workers: list[WorkerEntry]) -> list[str]:
    """The queues no healthy live worker serves: their tasks would wait in Redis for ever."""
    served = {w.queue for w in workers if w.problem is None}
    return [q for q in queues if q not in served]
