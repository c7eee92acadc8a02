"""One attempt sent to a remote queue, as the dispatcher follows it, and what a Celery result means for it."""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from heygem_daemon.failures import Kind
from heygem_daemon.generation.lifecycle import CANCELLED_HINT, CANCELLED_REASON
from heygem_daemon.generation.workers import Attempt
from heygem_daemon.log import get_logger
from heygem_daemon.state import Task

log = get_logger("heygem.remote")
RUNNING_STATES = ("STARTED", "PROGRESS")
READY_STATES = ("SUCCESS", "FAILURE")
LOST_REASON = "the task broker no longer holds this task (Redis restarted without its data?)"
FENCE_LOST_REASON = ("the worker found this attempt's fence gone from Redis (lost with its data, or expired) and "
                     "aborted its upload")


@dataclass
class Flight:
    """One attempt sent to a queue, as the daemon follows it."""

    task: Task
    queue: str
    celery_id: str | None
    """None when it never left: sending failed."""
    part: Path
    sent: float
    heard: float
    """monotonic time of the last sign of life (sent, started, a new beat)."""
    beat: float | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    look_at: float = 0.0
    """monotonic time from which a silent flight may be looked for in the broker again."""
    missing: bool = False
    """Not found in the broker at the last look."""
    transfer: Future[Any] | None = None
    """Its inputs being staged (not sent yet) or, once `report` is set, its video downloaded, on a transfer
    thread."""
    report: dict[str, Any] | None = None
    """A success whose video is still to come from the bucket: the worker's report."""
    trouble: Attempt | None = None
    """Why the download failed while the video is safe in the bucket (an outage); tried again at `retry_at`."""
    waiting_since: float = 0.0
    tries: int = 0
    retry_at: float = 0.0

    @property
    def device(self) -> str:
        return f"remote:{self.queue}@{self.meta.get('host', '?')}"

    @property
    def log(self) -> Any:
        task = self.task
        return log.bind(job_id=task.job_id, task_id=task.id, task=task.name, device=self.device,
                        attempt=task.attempts)

    def seconds(self, now: float) -> float:
        """How long the attempt has run, by the monotonic `now`."""
        return now - self.sent if self.sent else 0.0

    def collect(self) -> Any:
        """The outcome of its finished transfer, which it no longer holds; raises what the transfer raised."""
        assert self.transfer is not None
        done, self.transfer = self.transfer, None
        return done.result()


def queue_of(task: Task) -> str:
    """The queue a remote attempt went to, from its device name `remote:<queue>`."""
    return (task.device or "").removeprefix("remote:")


def drop_stale_parts(task: Task) -> None:
    """Parts of attempts abandoned before (a crash, a silent worker), once the output is in place."""
    for stale in Path(task.output).parent.glob(Path(task.output).name + ".*.part"):
        stale.unlink(missing_ok=True)


def cancelled_attempt() -> Attempt:
    """The operator cancelled the job: the attempt ends it, without another."""
    return Attempt(False, CANCELLED_REASON, CANCELLED_HINT, Kind.CANCELLED)


def internal(exc: Exception, what: str = "send the task") -> Attempt:
    """A fault of the daemon's own: a counted attempt."""
    return Attempt(False, f"{type(exc).__name__}: {exc}", f"the daemon could not {what}; see the log", Kind.INTERNAL)


def attempt_of(info: Any) -> Attempt:
    """A worker's report (a SUCCESS result): the render's outcome."""
    if not isinstance(info, dict):
        return Attempt(False, f"remote worker returned {info!r}", "worker and daemon versions differ?",
                       Kind.INTERNAL)
    if info.get("ok"):
        return Attempt(True)
    if info.get("setup"):
        # The worker's own set-up failed (its endpoint, credentials, share, engine section) before it
        # rendered: it has stopped taking tasks; the task goes to another worker, its attempt not counted.
        log.warning("remote worker quarantined itself; its task is sent again", host=info.get("host", "?"),
                    reason=info.get("reason", "?"))
        return Attempt(False, f"worker {info.get('host', '?')} set-up problem: {info.get('reason', '?')}",
                       info.get("hint", ""), Kind.SETUP, interrupted=True)
    if info.get("superseded"):
        # `_finish` has discarded a report of an attempt the store no longer runs: this one is current, so its
        # fence was not given to another attempt but lost. Sent again, the attempt not counted.
        return Attempt(False, FENCE_LOST_REASON, "the task is sent again, its attempt not counted", interrupted=True)
    return Attempt(False, info.get("reason", "?"), info.get("hint", ""), Kind(info.get("kind", Kind.ENGINE.value)),
                   dependency=info.get("dependency", ""))


def failure_of(info: Any, time_limit: float) -> Attempt:
    """A Celery task that raised (a FAILURE result), or that its worker killed at `time_limit`."""
    if type(info).__name__ == "WorkerLostError":  # the pool child died: a crash in the engine, or killed
        return Attempt(False, f"the worker process rendering the task died: {info}", "a crash in the engine "
                       "(CUDA fault, out of memory: see the worker host's journal); retried like a crashed "
                       "local worker")
    if type(info).__name__ == "TimeLimitExceeded":
        return Attempt(False, f"the render ran past {time_limit:.0f} s and was stopped, before "
                       "Redis would hand it to a second worker", "raise workers.remote.visibility_timeout_seconds"
                       " above your longest render (README \"Many GPU hosts\")")
    return Attempt(False, f"remote worker error: {info!r}", "see the worker's log")
