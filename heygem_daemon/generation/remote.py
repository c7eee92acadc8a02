"""The daemon's side of remote generation: keep up to N tasks in flight per Celery queue, through the
same life cycle as a local slot (`take`, then `record`: check the MP4, rename `.part`, done or failed).

Progress and heartbeats come from the result backend (PROGRESS state), every flight's in one read per
poll. The daemon keeps only Celery ids, never an `AsyncResult`: one would subscribe to the task's result
channel, which the daemon never reads, and every heartbeat published there piles up until Redis drops
the connection (client-output-buffer-limit pubsub). A worker silent for
`workers.stall_seconds` is given up on: its Celery task is revoked and the attempt fails like a crashed
local worker, so the task runs again elsewhere. A broker that cannot be reached is an outage: tasks wait
without using attempts and the operator is alerted (OutageWatch); renders already running carry on.

A render outlives the daemon: each attempt's Celery id is stored before it is sent, a stop leaves renders
running, and the next start adopts them (follows the same Celery task) instead of sending them again.

A task Redis no longer holds would wait for ever: its message lost with Redis's data (restarted without
persistence, the last second of an append-only file), never sent (the daemon died between storing its id
and sending it), or revoked before a crash. A task silent that long (PENDING for `workers.stall_seconds`)
is looked for in the queue and among the tasks workers hold; missing at two looks a poll apart, it is sent
again, its attempt not counted. Renders that still run beat again before then and are left alone.

With `transfer: s3` the data goes through the bucket instead of a shared folder (generation/s3_transfer.py):
each send carries input links and the task's one object key, with a fence in Redis naming the attempt that
may complete the upload; a success is downloaded into the attempt's part and finished like any other. The
inputs' staging and the download run on a few transfer threads: the loop only hands them over and collects
them, so a big video never holds up other tasks. A flight whose transfer runs is not followed meanwhile. A
download the object store (or the disk) cannot serve now is tried again with backoff, the flight kept and
the outage shown like the broker's: the video is safe in the bucket, so it is never rendered again.
"""

from __future__ import annotations

import functools
import json
import threading
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

from redis.exceptions import TimeoutError as RedisTimeout

from heygem_daemon.clock import SYSTEM_CLOCK, Clock
from heygem_daemon.config import Config, Remote
from heygem_daemon.failures import Kind, backoff_delay
from heygem_daemon.generation.celery_app import (
    TASK_NAME, attempt_part, broker_name, drop_fence, encode, fence_key, make_app, map_path, render_time_limit,
    set_fence,
)
from heygem_daemon.generation.lifecycle import CANCELLED_HINT, CANCELLED_REASON, JobFinished, LifeCycle
from heygem_daemon.generation.s3_transfer import S3Transfer, TransferTrouble
from heygem_daemon.generation.workers import Attempt, record, record_failure, task_spec
from heygem_daemon.log import get_logger
from heygem_daemon.state import CANCELLING, Task

log = get_logger("heygem.remote")
RUNNING_STATES = ("STARTED", "PROGRESS")
READY_STATES = ("SUCCESS", "FAILURE")
LOST_REASON = "the task broker no longer holds this task (Redis restarted without its data?)"
FENCE_LOST_REASON = ("the worker found this attempt's fence gone from Redis (lost with its data, or expired) and "
                     "aborted its upload")
UNACKED_KEY = "unacked"
"""Where kombu's Redis transport keeps the messages workers hold (late acks): [message, exchange, key]."""


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


class RemoteDispatcher:
    name = "remote"

    def __init__(self, cfg: Config, life: LifeCycle, clock: Clock = SYSTEM_CLOCK) -> None:
        assert cfg.workers.remote is not None
        self.cfg, self.life, self.store, self.clock = cfg, life, life.store, clock
        self.remote: Remote = cfg.workers.remote
        self.app = make_app(self.remote, sender=True)
        self.wake, self.stop_event, self.hold = threading.Event(), threading.Event(), threading.Event()
        self.transfer = S3Transfer(cfg, life.store, self.stop_event) if self.remote.transfer == "s3" else None
        self._transfers = ThreadPoolExecutor(self.remote.transfer_threads, thread_name_prefix="remote-transfer")
        self._cleanup: Future[None] | None = None
        if self.transfer is not None:
            life.events.subscribe(JobFinished, self.transfer.job_finished)
        self.flights: dict[str, list[Flight]] = {q: [] for q in self.remote.queues}
        self.workers: dict[str, dict[str, Any]] = {}
        self._workers_lock = threading.Lock()  # `status` and metrics read them from other threads
        self.broker_down_since: float | None = None
        self._pause_until = 0.0
        self._thread = threading.Thread(target=self._run, name="remote-dispatch", daemon=True)

    # --- Component ---

    def start(self) -> None:
        self._adopt()
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        self.stop_event.set()
        self.wake.set()
        self._thread.join(timeout)

    def alive(self) -> bool:
        return self._thread.is_alive()

    def apply(self, cfg: Config) -> None:
        """Attempts, backoff and stall time are read per task; the broker and queues need a restart."""
        self.cfg = cfg

    def notify(self) -> None:
        self.wake.set()

    def drain(self) -> None:
        self.hold.set()
        self.wake.set()

    def busy(self) -> bool:
        return any(self.flights.values())

    def describe(self) -> list[dict[str, Any]]:
        """Each remote worker heard from: host, its devices, what it runs now, its last heartbeat."""
        with self._workers_lock:
            return [dict(w, tasks=dict(w["tasks"])) for _, w in sorted(self.workers.items())]

    def broker(self) -> dict[str, Any]:
        return {"broker": broker_name(self.remote), "down_since": self.broker_down_since,
                "in_flight": {q: len(f) for q, f in self.flights.items()},
                "downloads_waiting": self._downloads_waiting()}

    def outages(self) -> list[dict[str, Any]]:
        """For OutageWatch: the broker away (tasks in flight wait for it too; none is recorded as waiting), and
        the object store (or disk) that finished videos wait for to be downloaded."""
        broker = [] if self.broker_down_since is None else [
            {"dependency": broker_name(self.remote), "since": self.broker_down_since,
             "tasks": sum(len(f) for f in self.flights.values()), "reason": "cannot reach Redis"}]
        return broker + self._downloads_waiting()

    def _downloads_waiting(self) -> list[dict[str, Any]]:
        """Read from other threads: a snapshot of the flights, whose `trouble` is never taken back."""
        by_dependency: dict[str, list[tuple[Attempt, float]]] = {}
        for flights in list(self.flights.values()):
            for f in list(flights):
                if (trouble := f.trouble) is not None:
                    by_dependency.setdefault(trouble.dependency, []).append((trouble, f.waiting_since))
        return [{"dependency": dependency, "since": min(since for _, since in waiting), "tasks": len(waiting),
                 "reason": waiting[0][0].reason} for dependency, waiting in sorted(by_dependency.items())]

    def adoptable(self) -> frozenset[int]:
        """Tasks still running on a queue we serve, from before a restart: recovery leaves them running."""
        return frozenset(task.id for task, _ in self.store.tasks.running_remote() if _queue(task) in self.flights)

    def _adopt(self) -> None:
        now = self.clock.monotonic()
        for task, celery_id in self.store.tasks.running_remote():
            queue = _queue(task)
            if queue in self.flights:
                part = attempt_part(task.output, task.attempts)
                self.flights[queue].append(Flight(task, queue, celery_id, part, now, now))
                log.info("remote task adopted after a restart", job_id=task.job_id, task_id=task.id, task=task.name,
                         queue=queue, attempt=task.attempts, celery_id=celery_id)

    # --- the loop ---

    def _run(self) -> None:
        while not self.stop_event.is_set():
            try:
                self.step()
            except Exception:
                log.exception("remote dispatch step failed; trying again")
            self.wake.wait(self.remote.poll_seconds)
            self.wake.clear()
        self._leave_running()

    def step(self) -> None:
        if self.transfer is not None:
            self._clean_staged()
        cancelling = {job.id for job in self.store.jobs.select((CANCELLING,))} if self.busy() else set()
        states = self._states()
        held = functools.cache(self._held_by_broker)  # asked at most once a step, only when needed
        for queue, flights in self.flights.items():
            for flight in list(flights):
                if self._settled(flight, flight.task.job_id in cancelling, states, held):
                    flights.remove(flight)
            while (not self.hold.is_set() and self.clock.monotonic() >= self._pause_until
                   and len(flights) < self.remote.queues[queue]):
                task = self.life.take(f"remote:{queue}")
                if task is None:
                    break
                flight = self._send(task, queue)
                if flight is None:
                    break
                flights.append(flight)

    def _advance(self, flight: Flight, cancelled: bool, states: dict[str, dict[str, Any]] | None,
                 held: Callable[[], set[str] | None]) -> bool:
        """Move the flight on; True once its attempt is settled."""
        if flight.transfer is not None:  # staging or downloading: not followed (nor found silent) meanwhile
            if self.stop_event.is_set() or not flight.transfer.done():
                return False
            return self._fetched(flight) if flight.report is not None else self._staged(flight, cancelled)
        if flight.report is not None:  # done remotely; its video waits in the bucket for the store to be back
            if cancelled:
                return self._finish(flight, Attempt(False, CANCELLED_REASON, CANCELLED_HINT, Kind.BAD_INPUT))
            if self.clock.monotonic() >= flight.retry_at:
                self._fetch(flight)
            return False
        return self._follow(flight, cancelled, states, held)

    def _send(self, task: Task, queue: str) -> Flight | None:
        """Send the task, or with transfer s3 hand its inputs' staging to a transfer thread (the flight is sent
        once they are in the bucket: `_staged`); None when it could not even start (the attempt is settled)."""
        part = attempt_part(task.output, task.attempts)
        flight = Flight(task, queue, None, part, 0.0, 0.0)
        try:
            engine, spec = task_spec(self.cfg, self.life, task, f"remote:{queue}")
            spec = replace(spec, output=part)
            part.parent.mkdir(parents=True, exist_ok=True)
            payload = {"engine": engine, "attempt": task.attempts, "beat_seconds": self.remote.beat_seconds,
                       "final": str(map_path(Path(task.output), self.remote.path_map)),
                       "spec": encode(spec, self.remote.path_map)}
        except Exception as exc:
            self._bound(flight).exception("cannot prepare a remote task")
            self._finish(flight, _internal(exc))
            return None
        if self.transfer is None:
            return self._launch(flight, payload)
        flight.transfer = self._transfers.submit(self._s3_payload, payload, task, spec)
        return flight

    def _staged(self, flight: Flight, cancelled: bool) -> bool:
        """The flight's inputs are in the bucket: send it. True when its attempt ended instead."""
        assert flight.transfer is not None
        done, flight.transfer = flight.transfer, None
        try:
            payload = done.result()
        except TransferTrouble as trouble:  # the bucket cannot take the inputs now: the task waits
            self._pause_until = self.clock.monotonic() + self.cfg.workers.backoff_seconds
            return self._finish(flight, trouble.attempt)
        except Exception as exc:
            self._bound(flight).exception("cannot prepare a remote task")
            return self._finish(flight, _internal(exc))
        if cancelled:
            return self._finish(flight, Attempt(False, CANCELLED_REASON, CANCELLED_HINT, Kind.BAD_INPUT))
        return self._launch(flight, payload) is None

    def _launch(self, flight: Flight, payload: dict[str, Any]) -> Flight | None:
        """Send the attempt, its Celery id stored first; None when the broker cannot take it (the task waits)."""
        task = flight.task
        celery_id = f"heygem-{task.id}-{task.attempts}-{uuid.uuid4().hex[:8]}"
        try:
            self.store.tasks.set_remote_id(task.id, celery_id)
            if self.transfer is not None:
                self._set_fence(task, celery_id)
            # The AsyncResult is dropped at once: that ends its result-channel subscription (see the top).
            self.app.send_task(TASK_NAME, args=[payload], queue=flight.queue, task_id=celery_id)
        except Exception as exc:  # kombu/redis: the broker cannot be reached
            self._broker_trouble(exc)
            self._pause_until = self.clock.monotonic() + self.cfg.workers.backoff_seconds
            self._finish(flight, Attempt(False, f"cannot reach the {broker_name(self.remote)}: {exc}",
                                         "start Redis (systemctl start redis-server) or fix "
                                         "workers.remote.broker_url; the task waits and is sent again by itself",
                                         Kind.OUTAGE, dependency=broker_name(self.remote)))
            return None
        self._broker_ok()
        flight.celery_id, flight.sent, flight.heard = celery_id, self.clock.monotonic(), self.clock.monotonic()
        self._bound(flight).info("task sent to a remote queue", celery_id=celery_id)
        return flight

    def _states(self) -> dict[str, dict[str, Any]] | None:
        """The Celery state of every flight, in one read of the backend; None when Redis cannot be reached.
        With transfer s3 the same read takes the fences of the attempts still rendering."""
        sent = [f for flights in self.flights.values() for f in flights if f.celery_id]
        if not sent:
            return {}
        ids = [f.celery_id for f in sent]
        fenced = [f for f in sent if self.transfer is not None and f.report is None]
        backend = self.app.backend
        try:
            values = backend.mget([backend.get_key_for_task(celery_id) for celery_id in ids]
                                  + [fence_key(f.task.id) for f in fenced])
        except Exception as exc:  # the backend (Redis) is away: renders go on; no stall is counted
            self._broker_trouble(exc)
            if isinstance(exc, RedisTimeout):  # it accepts but does not answer: a send would wait as long
                self._pause_until = self.clock.monotonic() + self.cfg.workers.backoff_seconds
            return None
        self._broker_ok()
        states = {celery_id: backend.decode_result(value) for celery_id, value in zip(ids, values) if value}
        self._fence_again([f for f, value in zip(fenced, values[len(ids):])
                           if value is None and states.get(f.celery_id or "", {}).get("status") not in READY_STATES])
        return states

    def _held_by_broker(self) -> set[str] | None:
        """Celery ids of the tasks Redis holds: waiting in our queues, or taken by a worker and not yet
        acknowledged (kombu's Redis transport layout). None when Redis cannot be asked."""
        client = self.app.backend.client
        try:
            waiting = [raw for queue in self.flights for raw in client.lrange(queue, 0, -1)]
            taken = [json.loads(raw)[0] for raw in client.hvals(UNACKED_KEY)]
        except Exception as exc:
            log.warning("cannot look for tasks in the broker", error=str(exc))
            return None
        held = set()
        for message in [*(json.loads(raw) for raw in waiting), *taken]:
            celery_id = message.get("headers", {}).get("id") if isinstance(message, dict) else None
            if celery_id:
                held.add(celery_id)
        return held

    def _settled(self, flight: Flight, cancelled: bool, states: dict[str, dict[str, Any]] | None,
                 held: Callable[[], set[str] | None]) -> bool:
        """`_advance`, with a flight that cannot be followed (its part unmovable, a report from a newer worker)
        ending as a failed attempt instead of stopping every other flight's follow-up."""
        try:
            return self._advance(flight, cancelled, states, held)
        except Exception as exc:
            log.exception("cannot finish a remote task; its attempt fails", task_id=flight.task.id,
                          task=flight.task.name, celery_id=flight.celery_id)
            try:
                record_failure(self.life, f"remote:{flight.queue}", flight.task,
                               Attempt(False, f"{type(exc).__name__}: {exc}", "the daemon could not finish the "
                                       "task; see the daemon log", Kind.INTERNAL),
                               log.bind(task_id=flight.task.id, job_id=flight.task.job_id))
            except Exception:
                log.exception("cannot record the failed attempt either; the task is left to recovery")
            return True

    def _follow(self, flight: Flight, cancelled: bool, states: dict[str, dict[str, Any]] | None,
                held: Callable[[], set[str] | None]) -> bool:
        """Settle the flight by its state; True once its attempt is settled."""
        if flight.part.is_file():
            # The worker renames its part only once the engine succeeded: done, even if its report was lost
            # with a broker that went away meanwhile.
            return self._finish(flight, Attempt(True))
        now = self.clock.monotonic()
        if states is None:
            flight.heard = now
            return False
        meta = states.get(flight.celery_id or "", {"status": "PENDING", "result": None})  # no answer yet: queued
        state, info = meta["status"], meta["result"]
        if state in RUNNING_STATES:
            self._heard(flight, info if isinstance(info, dict) else {}, now)
        if state == "SUCCESS":
            return self._finish(flight, _attempt_of(info), info if isinstance(info, dict) else None)
        if state == "FAILURE":
            self._finish(flight, self._failure(info))
            return True
        if cancelled:
            self._revoke(flight)
            self._finish(flight, Attempt(False, CANCELLED_REASON, CANCELLED_HINT, Kind.BAD_INPUT))
            return True
        if state in ("PENDING", "REVOKED") and self._gone(flight, state, now, held):
            log.warning("remote task no longer held by the broker; sending it again", task_id=flight.task.id,
                        task=flight.task.name, celery_id=flight.celery_id, state=state)
            self._finish(flight, Attempt(False, LOST_REASON, interrupted=True))
            return True
        stall = self.cfg.workers.stall_seconds
        if state in RUNNING_STATES and now - flight.heard > stall:
            self._revoke(flight)
            host = flight.meta.get("host", "?")
            self._finish(flight, Attempt(False, f"remote worker {host} silent for {stall:g} s (gone or hung)",
                                         "the task runs again on another worker"))
            return True
        return False

    def _failure(self, info: Any) -> Attempt:
        """A Celery task that raised, or that its worker killed at the time limit."""
        if type(info).__name__ == "WorkerLostError":  # the pool child died: a crash in the engine, or killed
            return Attempt(False, f"the worker process rendering the task died: {info}", "a crash in the engine "
                           "(CUDA fault, out of memory: see the worker host's journal); retried like a crashed "
                           "local worker")
        if type(info).__name__ == "TimeLimitExceeded":
            return Attempt(False, f"the render ran past {render_time_limit(self.remote):.0f} s and was stopped, before "
                           "Redis would hand it to a second worker", "raise workers.remote.visibility_timeout_seconds"
                           " above your longest render (README \"Many GPU hosts\")")
        return Attempt(False, f"remote worker error: {info!r}", "see the worker's log")

    def _gone(self, flight: Flight, state: str, now: float, held: Callable[[], set[str] | None]) -> bool:
        """Redis no longer holds the task: REVOKED (a crash came between revoking it and recording that), or
        silent for `stall_seconds` and missing from the queue and the workers' unacknowledged tasks at two
        looks at least a poll apart (a worker that took it meanwhile has marked it STARTED by then)."""
        if state == "REVOKED":
            return True
        stall = self.cfg.workers.stall_seconds
        if now - flight.heard <= stall or now < flight.look_at:
            return False
        found = held()
        if found is None:
            return False
        if flight.celery_id in found:
            flight.missing, flight.look_at = False, now + stall
            return False
        if flight.missing:
            return True
        flight.missing = True
        return False

    def _heard(self, flight: Flight, meta: dict[str, Any], now: float) -> None:
        beat = meta.get("beat")
        if flight.meta and beat == flight.beat:
            return
        flight.heard, flight.beat, flight.meta = now, beat, {**flight.meta, **meta}
        if "progress" in meta:
            self.store.tasks.set_progress(flight.task.id, float(meta["progress"]))
        host = meta.get("host")
        if host:
            with self._workers_lock:
                worker = self.workers.setdefault(host, {"host": host, "devices": [], "tasks": {}, "last_beat": None})
                worker["devices"] = meta.get("devices", worker["devices"])
                worker["tasks"][meta.get("device", "?")] = flight.task.name
                worker["last_beat"] = beat or time.time()

    def _finish(self, flight: Flight, result: Attempt, info: dict[str, Any] | None = None) -> bool:
        """Settle the attempt; False while a success's video is still to come from the bucket (transfer s3:
        `_fetched` settles it). `info`: the worker's report (with transfer s3, what it uploaded)."""
        task, bound = flight.task, self._bound(flight)
        with self._workers_lock:
            host = self.workers.get(flight.meta.get("host", ""))
            if host and host["tasks"].get(flight.meta.get("device")) == task.name:
                del host["tasks"][flight.meta["device"]]
        if self.transfer is not None:
            self._drop_fence(flight)
        now = self.store.tasks.get(task.id)
        if now.state != "running" or now.attempts != task.attempts:
            # An attempt the daemon already gave up on (or one a restart requeued): its result is not ours.
            flight.part.unlink(missing_ok=True)
            bound.warning("late result of an abandoned attempt discarded")
            return True
        if result.ok and not flight.part.exists() and Path(task.output).is_file():
            self.life.task_done(task)  # a redelivery of an attempt whose output was already renamed
        elif result.ok and self.transfer is not None:
            flight.report = info or {}
            self._fetch(flight)
            return False
        else:
            record(self.life, self._device(flight), task, flight.part, result, bound, self._seconds(flight))
        if result.ok:
            _drop_stale_parts(task)
        return True

    def _device(self, flight: Flight) -> str:
        return f"remote:{flight.queue}@{flight.meta.get('host', '?')}"

    def _bound(self, flight: Flight) -> Any:
        task = flight.task
        return log.bind(job_id=task.job_id, task_id=task.id, task=task.name, device=self._device(flight),
                        attempt=task.attempts)

    def _seconds(self, flight: Flight) -> float:
        return self.clock.monotonic() - flight.sent if flight.sent else 0.0

    def _revoke(self, flight: Flight) -> None:
        if flight.celery_id is None:
            return
        try:
            self.app.control.revoke(flight.celery_id, terminate=True, signal="SIGKILL")
        except Exception as exc:
            log.warning("cannot revoke a remote task", celery_id=flight.celery_id, error=str(exc))

    def _leave_running(self) -> None:
        """Stopping: renders on other hosts go on; the store keeps them running and the next start adopts them.
        Transfers leave off at their next chunk (`stop_event`): a download is done again once its flight is
        adopted; a task whose inputs were being staged was never sent, and the next start queues it again."""
        self._transfers.shutdown(wait=True, cancel_futures=True)
        left = [flight.task.name for flights in self.flights.values() for flight in flights]
        if left:
            log.info("remote renders carry on while the daemon is stopped; the next start picks them up",
                     tasks=len(left), names=left[:20])
        for flights in self.flights.values():
            flights.clear()

    # --- transfer: s3 (no shared folder: inputs as links, the video straight to its final key) ---

    def _s3_payload(self, payload: dict[str, Any], task: Task, spec: Any) -> dict[str, Any]:
        assert self.transfer is not None
        return {**payload, "transfer": "s3", **self.transfer.payload(task, spec)}

    def _set_fence(self, task: Task, celery_id: str) -> None:
        """Before the send: this attempt, and no other, may complete the upload to the task's key. It lives
        twice the visibility timeout, which the longest render stays under."""
        set_fence(self.app.backend.client, task.id, celery_id, 2 * self.remote.visibility_timeout_seconds)

    def _fence_again(self, flights: list[Flight]) -> None:
        """Fences gone while their attempt is still the current one (Redis lost its data; a task queued longer
        than the fence lives): set again, so the render's upload is not aborted. Only this thread sets or drops
        fences, and these flights were read before any of them was settled."""
        for flight in flights:
            assert flight.celery_id is not None
            self._bound(flight).warning("remote attempt's fence missing from Redis; set again",
                                        celery_id=flight.celery_id)
            try:
                self._set_fence(flight.task, flight.celery_id)
            except Exception as exc:  # Redis away again: the next poll tries again
                log.warning("cannot set a remote attempt's fence again", celery_id=flight.celery_id, error=str(exc))

    def _drop_fence(self, flight: Flight) -> None:
        """The attempt is over: a worker still running it aborts its upload instead of completing it."""
        if flight.celery_id is None:
            return
        try:
            drop_fence(self.app.backend.client, flight.task.id, flight.celery_id)
        except Exception as exc:  # Redis away: the next attempt's send replaces the fence; else it expires
            log.warning("cannot drop a remote attempt's fence", celery_id=flight.celery_id, error=str(exc))

    def _clean_staged(self) -> None:
        """The staged inputs of ended jobs go on a transfer thread, one sweep at a time."""
        assert self.transfer is not None
        if self._cleanup is not None and not self._cleanup.done():
            return
        if self._cleanup is not None and self._cleanup.exception() is not None:
            log.error("deleting staged remote inputs failed; tried again", error=repr(self._cleanup.exception()))
        self._cleanup = self._transfers.submit(self.transfer.delete_ended)

    def _fetch(self, flight: Flight) -> None:
        """Download the worker's upload into the part on a transfer thread (`S3Transfer.fetch`)."""
        assert self.transfer is not None
        flight.transfer = self._transfers.submit(self.transfer.fetch, flight.task, flight.part, flight.report)

    def _fetched(self, flight: Flight) -> bool:
        """The download's outcome. The video, recorded as uploaded, is checked and renamed by `record` (so
        delivery never uploads it again; a failed check takes that record back). The object store or the
        disk away: the flight stays and the download is tried again later. True once the attempt is settled."""
        assert flight.transfer is not None
        done, flight.transfer = flight.transfer, None
        task, bound = flight.task, self._bound(flight)
        try:
            registered = done.result()
        except TransferTrouble as trouble:
            if trouble.attempt.kind is Kind.OUTAGE:
                self._fetch_later(flight, trouble.attempt)
                return False
            record(self.life, self._device(flight), task, flight.part, trouble.attempt, bound, self._seconds(flight))
            return True
        except Exception as exc:
            bound.exception("cannot finish a remote video")
            record(self.life, self._device(flight), task, flight.part, _internal(exc, "finish the video"), bound,
                   self._seconds(flight))
            return True
        if flight.trouble is not None:
            bound.info("remote video downloaded after waiting", dependency=flight.trouble.dependency,
                       waited_seconds=round(time.time() - flight.waiting_since, 1))
        try:
            record(self.life, self._device(flight), task, flight.part, Attempt(True), bound, self._seconds(flight))
        finally:
            if registered is not None and not Path(task.output).is_file():
                self.store.deliveries.forget(registered.id)
        _drop_stale_parts(task)
        return True

    def _fetch_later(self, flight: Flight, trouble: Attempt) -> None:
        """The video is safe in the bucket: wait with backoff, no attempt used, nothing rendered again."""
        if flight.trouble is None:
            flight.waiting_since = time.time()
        flight.trouble, flight.tries = trouble, flight.tries + 1
        delay = backoff_delay(flight.tries, self.cfg.workers.backoff_seconds, self.cfg.workers.backoff_max_seconds)
        flight.retry_at = self.clock.monotonic() + delay
        self._bound(flight).warning("remote video cannot be downloaded now; it waits in the bucket",
                                    reason=trouble.reason, dependency=trouble.dependency, tries=flight.tries,
                                    retry_seconds=round(delay, 1))

    def _broker_trouble(self, exc: Exception) -> None:
        if self.broker_down_since is None:
            self.broker_down_since = time.time()
            log.error("task broker unreachable; remote tasks wait", broker=broker_name(self.remote), error=str(exc))

    def _broker_ok(self) -> None:
        if self.broker_down_since is not None:
            log.info("task broker reachable again", broker=broker_name(self.remote),
                     down_seconds=round(time.time() - self.broker_down_since, 1))
            self.broker_down_since = None


def _queue(task: Task) -> str:
    """The queue a remote attempt went to, from its device name `remote:<queue>`."""
    return (task.device or "").removeprefix("remote:")


def _drop_stale_parts(task: Task) -> None:
    """Parts of attempts abandoned before (a crash, a silent worker), once the output is in place."""
    for stale in Path(task.output).parent.glob(Path(task.output).name + ".*.part"):
        stale.unlink(missing_ok=True)


def _internal(exc: Exception, what: str = "send the task") -> Attempt:
    """A fault of the daemon's own: a counted attempt."""
    return Attempt(False, f"{type(exc).__name__}: {exc}", f"the daemon could not {what}; see the log", Kind.INTERNAL)


def _attempt_of(info: Any) -> Attempt:
    if not isinstance(info, dict):
        return Attempt(False, f"remote worker returned {info!r}", "worker and daemon versions differ?",
                       Kind.INTERNAL)
    if info.get("ok"):
        return Attempt(True)
    if info.get("superseded"):
        # `_finish` has discarded a report of an attempt the store no longer runs: this one is current, so its
        # fence was not given to another attempt but lost. Sent again, the attempt not counted.
        return Attempt(False, FENCE_LOST_REASON, "the task is sent again, its attempt not counted", interrupted=True)
    return Attempt(False, info.get("reason", "?"), info.get("hint", ""), Kind(info.get("kind", Kind.ENGINE.value)),
                   dependency=info.get("dependency", ""))
