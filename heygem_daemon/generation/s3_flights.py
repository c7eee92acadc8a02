"""`workers.remote.transfer: s3` in the dispatcher: its flights' inputs staged and videos downloaded on a few
transfer threads (generation/s3_transfer.py does the bucket's side), so the dispatch loop only hands them over
and collects them and a big video never holds up other tasks. A download the object store (or the disk) cannot
serve now is tried again with backoff, the flight kept and the outage shown like the broker's: the video is safe
in the bucket, so it is never rendered again.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from heygem_daemon.clock import Clock
from heygem_daemon.config import Config
from heygem_daemon.engines.base import TaskSpec
from heygem_daemon.failures import Kind, backoff_delay
from heygem_daemon.generation.lifecycle import JobFinished, LifeCycle
from heygem_daemon.generation.remote_flight import Flight, drop_stale_parts, internal
from heygem_daemon.generation.s3_transfer import S3Transfer, TransferTrouble
from heygem_daemon.generation.workers import Attempt, record
from heygem_daemon.log import get_logger
from heygem_daemon.state import Task

log = get_logger("heygem.remote")


class S3Flights:
    def __init__(self, cfg: Config, life: LifeCycle, clock: Clock, stopping: threading.Event) -> None:
        assert cfg.workers.remote is not None
        self.cfg, self.life, self.clock = cfg, life, clock
        """`cfg` is the live one (the dispatcher's `apply`): backoff is read per download."""
        self.transfer = S3Transfer(cfg, life.store, stopping)
        self._threads = ThreadPoolExecutor(cfg.workers.remote.transfer_threads, thread_name_prefix="remote-transfer")
        self._cleanup: Future[None] | None = None
        life.events.subscribe(JobFinished, self.transfer.job_finished)

    # --- at send ---

    def payload(self, payload: dict[str, Any], task: Task, spec: TaskSpec) -> dict[str, Any]:
        """The task's payload with its inputs' links and its object (stages the inputs: a transfer thread's)."""
        return {**payload, "transfer": "s3", **self.transfer.payload(task, spec)}

    def stage(self, flight: Flight, payload: dict[str, Any], spec: TaskSpec) -> None:
        """The flight is sent once its `transfer` has put the inputs in the bucket and made the payload."""
        flight.transfer = self._threads.submit(self.payload, payload, flight.task, spec)

    # --- at finish ---

    def download(self, flight: Flight, report: dict[str, Any]) -> None:
        """A success: its video, at the task's key, is downloaded into the part on a transfer thread."""
        flight.report = report
        self._download(flight)

    def retry_due(self, flight: Flight) -> None:
        """A download that waits in the bucket is tried again once its backoff is over."""
        if self.clock.monotonic() >= flight.retry_at:
            self._download(flight)

    def _download(self, flight: Flight) -> None:
        flight.transfer = self._threads.submit(self.transfer.fetch, flight.task, flight.part, flight.report)

    def downloaded(self, flight: Flight) -> bool:
        """The download's outcome. The video, recorded as uploaded, is checked and renamed by `record` (so
        delivery never uploads it again; a failed check takes that record back). The object store or the
        disk away: the flight stays and the download is tried again later. True once the attempt is settled."""
        task, bound, seconds = flight.task, flight.log, flight.seconds(self.clock.monotonic())
        try:
            registered = flight.collect()
        except TransferTrouble as trouble:
            if trouble.attempt.kind is Kind.OUTAGE:
                self._later(flight, trouble.attempt)
                return False
            record(self.life, flight.device, task, flight.part, trouble.attempt, bound, seconds)
            return True
        except Exception as exc:
            bound.exception("cannot finish a remote video")
            record(self.life, flight.device, task, flight.part, internal(exc, "finish the video"), bound, seconds)
            return True
        if flight.trouble is not None:
            bound.info("remote video downloaded after waiting", dependency=flight.trouble.dependency,
                       waited_seconds=round(time.time() - flight.waiting_since, 1))
        try:
            record(self.life, flight.device, task, flight.part, Attempt(True), bound, seconds)
        finally:
            if registered is not None and not Path(task.output).is_file():
                self.life.store.deliveries.forget(registered.id)
        drop_stale_parts(task)
        return True

    def _later(self, flight: Flight, trouble: Attempt) -> None:
        """The video is safe in the bucket: wait with backoff, no attempt used, nothing rendered again."""
        if flight.trouble is None:
            flight.waiting_since = time.time()
        flight.trouble, flight.tries = trouble, flight.tries + 1
        delay = backoff_delay(flight.tries, self.cfg.workers.backoff_seconds, self.cfg.workers.backoff_max_seconds)
        flight.retry_at = self.clock.monotonic() + delay
        flight.log.warning("remote video cannot be downloaded now; it waits in the bucket", reason=trouble.reason,
                           dependency=trouble.dependency, tries=flight.tries, retry_seconds=round(delay, 1))

    @staticmethod
    def waiting(flights: Iterable[Flight]) -> list[dict[str, Any]]:
        """Finished videos waiting for their dependency, one entry per dependency. Read from other threads:
        `flights` is a snapshot, and a flight's `trouble` is never taken back."""
        by_dependency: dict[str, list[tuple[Attempt, float]]] = {}
        for f in flights:
            if (trouble := f.trouble) is not None:
                by_dependency.setdefault(trouble.dependency, []).append((trouble, f.waiting_since))
        return [{"dependency": dependency, "since": min(since for _, since in waiting), "tasks": len(waiting),
                 "reason": waiting[0][0].reason} for dependency, waiting in sorted(by_dependency.items())]

    def discard(self, flight: Flight) -> None:
        """The task was cancelled while its finished video waited in the bucket: the video goes."""
        key = self.life.store.tasks.get(flight.task.id).object_key
        if key:
            self._threads.submit(self.transfer.delete_video, key)

    def ended_unfinished(self, flight: Flight) -> None:
        """An attempt that was sent ended without a video: what it began uploading at the task's key goes."""
        key = self.life.store.tasks.get(flight.task.id).object_key
        if key:
            self._threads.submit(self.transfer.abort_uploads, key)

    # --- upkeep ---

    def clean_staged(self) -> None:
        """The staged inputs of ended jobs go on a transfer thread, one sweep at a time."""
        if self._cleanup is not None and not self._cleanup.done():
            return
        if self._cleanup is not None and self._cleanup.exception() is not None:
            log.error("deleting staged remote inputs failed; tried again", error=repr(self._cleanup.exception()))
        self._cleanup = self._threads.submit(self.transfer.delete_ended)

    def shutdown(self) -> None:
        """Stopping: transfers leave off at their next chunk (`stopping`); those not begun never start."""
        self._threads.shutdown(wait=True, cancel_futures=True)
