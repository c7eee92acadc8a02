"""The daemon's side of remote generation: keep up to N tasks in flight per Celery queue, through the
same life cycle as a local slot (`take`, then `record`: check the MP4, rename `.part`, done or failed).

Progress and heartbeats come from the result backend (PROGRESS state), every flight's in one read per
poll (generation/remote_broker.py holds every call to Redis). A worker silent for
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

With `transfer: s3` the data goes through the bucket instead of a shared folder (generation/s3_flights.py):
each send carries input links and the task's one object key, with a fence in Redis naming the attempt that
may complete the upload; a success is downloaded into the attempt's part and finished like any other. A
flight whose transfer (staging, download) runs is not followed meanwhile.

Every worker keeps an entry in Redis (generation/remote_setup.py), read every PRESENCE_SECONDS: a queue no
healthy worker serves, and a worker quarantined by its own set-up problem, are outages (`status`, an alert
after `workers.outage_alert_seconds`).
"""

from __future__ import annotations

import functools
import threading
import time
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

from heygem_daemon.clock import SYSTEM_CLOCK, Clock
from heygem_daemon.config import Config, Remote
from heygem_daemon.failures import Kind
from heygem_daemon.generation.celery_app import attempt_part, encode, map_path, render_time_limit
from heygem_daemon.generation.lifecycle import LifeCycle
from heygem_daemon.generation.remote_broker import CeleryBroker
from heygem_daemon.generation.remote_flight import (
    LOST_REASON, READY_STATES, RUNNING_STATES, Flight, attempt_of, cancelled_attempt, drop_stale_parts, failure_of,
    internal, queue_of,
)
from heygem_daemon.generation.remote_roster import WorkerRoster
from heygem_daemon.generation.remote_setup import PRESENCE_SECONDS, unserved
from heygem_daemon.generation.s3_flights import S3Flights
from heygem_daemon.generation.s3_transfer import TransferTrouble
from heygem_daemon.generation.workers import Attempt, record, record_failure, task_spec
from heygem_daemon.log import get_logger
from heygem_daemon.state import CANCELLING, Task

log = get_logger("heygem.remote")
States = dict[str, dict[str, Any]]
"""Celery id -> its task's meta, from one poll."""
Held = Callable[[], set[str] | None]
"""The Celery ids Redis holds, asked at most once a step (None when Redis cannot be asked)."""


class RemoteDispatcher:
    name = "remote"

    def __init__(self, cfg: Config, life: LifeCycle, clock: Clock = SYSTEM_CLOCK) -> None:
        assert cfg.workers.remote is not None
        self.cfg, self.life, self.store, self.clock = cfg, life, life.store, clock
        self.remote: Remote = cfg.workers.remote
        self.celery = CeleryBroker(self.remote)
        self.app = self.celery.app  # tests and benches play the worker through it
        self.wake, self.stop_event, self.hold = threading.Event(), threading.Event(), threading.Event()
        self.s3 = S3Flights(cfg, life, clock, self.stop_event) if self.remote.transfer == "s3" else None
        self.transfer = self.s3.transfer if self.s3 is not None else None  # the bucket: tests and benches
        self.flights: dict[str, list[Flight]] = {q: [] for q in self.remote.queues}
        self.roster = WorkerRoster()
        self.unserved: dict[str, float] = {}
        """Queue -> since when (unix time) no healthy worker serves it (replaced whole: read by other threads)."""
        self._workers_at = 0.0
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
        if self.s3 is not None:
            self.s3.cfg = cfg

    def notify(self) -> None:
        self.wake.set()

    def drain(self) -> None:
        self.hold.set()
        self.wake.set()

    def busy(self) -> bool:
        return any(self.flights.values())

    def describe(self) -> list[dict[str, Any]]:
        return self.roster.describe()

    @property
    def broker_down_since(self) -> float | None:
        return self.celery.down_since

    def broker(self) -> dict[str, Any]:
        return {"broker": self.celery.name, "down_since": self.celery.down_since, "why": self.celery.why,
                "in_flight": {q: len(f) for q, f in self.flights.items()},
                "downloads_waiting": self._downloads_waiting(), "unserved": dict(self.unserved)}

    def outages(self) -> list[dict[str, Any]]:
        """For OutageWatch: the broker away (tasks in flight wait for it too; none is recorded as waiting), the
        object store (or disk) that finished videos wait for to be downloaded, queues no healthy worker serves
        and workers quarantined by their own set-up."""
        return (self.celery.outages(sum(len(f) for f in self.flights.values())) + self._downloads_waiting()
                + self._worker_outages())

    def _worker_outages(self) -> list[dict[str, Any]]:
        unserved_queues = [{"dependency": f"a worker for queue {q}", "since": since,
                            "tasks": len(self.flights.get(q, [])),
                            "reason": f"no healthy `heygem-daemon worker` serves queue {q}"}
                           for q, since in sorted(self.unserved.items())]
        return unserved_queues + [
            {"dependency": f"remote worker {w['host']}", "since": w["problem"]["since"], "tasks": 0,
             "reason": f"it takes no task, its set-up is wrong: {w['problem']['reason']} (fix: {w['problem']['hint']})"}
            for w in self.roster.describe() if w["alive"] and w["problem"]]

    def _downloads_waiting(self) -> list[dict[str, Any]]:
        """Read from other threads: on a snapshot of the flights."""
        return S3Flights.waiting([f for flights in list(self.flights.values()) for f in list(flights)])

    def adoptable(self) -> frozenset[int]:
        """Tasks still running on a queue we serve, from before a restart: recovery leaves them running."""
        return frozenset(task.id for task, _ in self.store.tasks.running_remote() if queue_of(task) in self.flights)

    def _adopt(self) -> None:
        now = self.clock.monotonic()
        for task, celery_id in self.store.tasks.running_remote():
            queue = queue_of(task)
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
        if self.s3 is not None:
            self.s3.clean_staged()
        self._read_workers()
        cancelling = {job.id for job in self.store.jobs.select((CANCELLING,))} if self.busy() else set()
        states = self._states()
        held = functools.cache(lambda: self.celery.held(self.flights))  # asked at most once a step, if needed
        for queue, flights in self.flights.items():
            for flight in list(flights):
                if self._settled(flight, flight.task.job_id in cancelling, states, held):
                    flights.remove(flight)
            while not self.hold.is_set() and not self._paused() and len(flights) < self.remote.queues[queue]:
                task = self.life.take(f"remote:{queue}")
                if task is None:
                    break
                sent = self._send(task, queue)
                if sent is None:
                    break
                flights.append(sent)

    def _read_workers(self) -> None:
        """Every PRESENCE_SECONDS: the workers alive, and the queues none of the healthy ones serves."""
        now = self.clock.monotonic()
        if now < self._workers_at or self.celery.down_since is not None:  # Redis away: its outage says enough
            return
        self._workers_at = now + PRESENCE_SECONDS
        entries = self.celery.workers()
        if entries is None:
            return
        self.roster.present(entries)
        missing = unserved(list(self.remote.queues), entries)
        for queue in missing:
            if queue not in self.unserved:
                log.error("no healthy remote worker serves a queue; its tasks wait in Redis", queue=queue,
                          quarantined=[e.host for e in entries if e.queue == queue and e.problem])
        for queue in set(self.unserved) - set(missing):
            log.info("a healthy remote worker serves the queue again", queue=queue)
        self.unserved = {q: self.unserved.get(q, time.time()) for q in missing}

    def _pause(self) -> None:
        """No send for a while: the broker or the bucket cannot take one now."""
        self._pause_until = self.clock.monotonic() + self.cfg.workers.backoff_seconds

    def _paused(self) -> bool:
        return self.clock.monotonic() < self._pause_until

    def _settled(self, flight: Flight, cancelled: bool, states: States | None, held: Held) -> bool:
        """`_advance`, with a flight that cannot be followed (its part unmovable, a report from a newer worker)
        ending as a failed attempt instead of stopping every other flight's follow-up."""
        try:
            return self._advance(flight, cancelled, states, held)
        except Exception as exc:
            flight.log.exception("cannot finish a remote task; its attempt fails", celery_id=flight.celery_id)
            try:
                self._end(flight)
                record_failure(self.life, flight.device, flight.task,
                               Attempt(False, f"{type(exc).__name__}: {exc}", "the daemon could not finish the "
                                       "task; see the daemon log", Kind.INTERNAL), flight.log)
            except Exception:
                flight.log.exception("cannot record the failed attempt either; the task is left to recovery")
            return True

    def _advance(self, flight: Flight, cancelled: bool, states: States | None, held: Held) -> bool:
        """Move the flight on; True once its attempt is settled."""
        if flight.transfer is not None:  # staging or downloading: not followed (nor found silent) meanwhile
            if self.stop_event.is_set() or not flight.transfer.done():
                return False
            return self._s3().downloaded(flight) if flight.report is not None else self._staged(flight, cancelled)
        if flight.report is not None:  # done remotely; its video waits in the bucket for the store to be back
            if cancelled:
                self._s3().discard(flight)
                return self._finish(flight, cancelled_attempt())
            self._s3().retry_due(flight)
            return False
        return self._follow(flight, cancelled, states, held)

    # --- send ---

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
            flight.log.exception("cannot prepare a remote task")
            self._finish(flight, internal(exc))
            return None
        if self.s3 is None:
            return self._launch(flight, payload)
        self.s3.stage(flight, payload, spec)
        return flight

    def _staged(self, flight: Flight, cancelled: bool) -> bool:
        """The flight's inputs are in the bucket: send it. True when its attempt ended instead. While sends
        are paused (a Redis that does not answer would hold the loop for each) it waits, staged."""
        if self._paused() and not cancelled:
            return False
        try:
            payload = flight.collect()
        except TransferTrouble as trouble:  # the bucket cannot take the inputs now: the task waits
            self._pause()
            return self._finish(flight, trouble.attempt)
        except Exception as exc:
            flight.log.exception("cannot prepare a remote task")
            return self._finish(flight, internal(exc))
        if cancelled:
            return self._finish(flight, cancelled_attempt())
        return self._launch(flight, payload) is None

    def _launch(self, flight: Flight, payload: dict[str, Any]) -> Flight | None:
        """Send the attempt, its Celery id stored first; None when the broker cannot take it (the task waits)."""
        task = flight.task
        celery_id = f"heygem-{task.id}-{task.attempts}-{uuid.uuid4().hex[:8]}"
        try:
            self.store.tasks.set_remote_id(task.id, celery_id)
            if self.s3 is not None:
                self.celery.set_fence(task.id, celery_id)
            self.celery.send(flight.queue, payload, celery_id)
        except Exception as exc:  # kombu/redis: the broker cannot be reached
            self.celery.away(exc)
            self._pause()
            self._finish(flight, self.celery.unreachable(exc))
            return None
        self.celery.back()
        flight.celery_id, flight.sent, flight.heard = celery_id, self.clock.monotonic(), self.clock.monotonic()
        flight.log.info("task sent to a remote queue", celery_id=celery_id)
        return flight

    # --- follow ---

    def _states(self) -> States | None:
        """The Celery state of every flight, in one read of the backend; None when Redis cannot be reached.
        With transfer s3 the same read takes the fences of the attempts still rendering."""
        sent = [(f, f.celery_id) for flights in self.flights.values() for f in flights if f.celery_id]
        if not sent:
            return {}
        fenced = [(f, celery_id) for f, celery_id in sent if self.s3 is not None and f.report is None]
        reading = self.celery.read([celery_id for _, celery_id in sent], [(f.task.id, c) for f, c in fenced])
        if reading is None:
            if self.celery.wedged:  # it accepts but does not answer: a send would wait as long
                self._pause()
            return None
        self._fence_again([(f, celery_id) for f, celery_id in fenced if celery_id in reading.unfenced
                           and reading.states.get(celery_id, {}).get("status") not in READY_STATES])
        return reading.states

    def _fence_again(self, fences: list[tuple[Flight, str]]) -> None:
        """Fences gone while their attempt is still the current one (Redis lost its data; a task queued longer
        than the fence lives): set again, so the render's upload is not aborted. Only this thread sets or drops
        fences, and these flights were read before any of them was settled."""
        for flight, celery_id in fences:
            flight.log.warning("remote attempt's fence missing from Redis; set again", celery_id=celery_id)
            try:
                self.celery.set_fence(flight.task.id, celery_id)
            except Exception as exc:  # Redis away again: the next poll tries again
                log.warning("cannot set a remote attempt's fence again", celery_id=celery_id, error=str(exc))

    def _follow(self, flight: Flight, cancelled: bool, states: States | None, held: Held) -> bool:
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
            return self._finish(flight, attempt_of(info), info if isinstance(info, dict) else None)
        if state == "FAILURE":
            return self._finish(flight, failure_of(info, render_time_limit(self.remote)))
        if cancelled:
            self._revoke(flight)
            return self._finish(flight, cancelled_attempt())
        if state in ("PENDING", "REVOKED") and self._gone(flight, state, now, held):
            flight.log.warning("remote task no longer held by the broker; sending it again",
                               celery_id=flight.celery_id, state=state)
            return self._finish(flight, Attempt(False, LOST_REASON, interrupted=True))
        stall = self.cfg.workers.stall_seconds
        if state in RUNNING_STATES and now - flight.heard > stall:
            self._revoke(flight)
            host = flight.meta.get("host", "?")
            return self._finish(flight, Attempt(False, f"remote worker {host} silent for {stall:g} s (gone or hung)",
                                                "the task runs again on another worker"))
        return False

    def _gone(self, flight: Flight, state: str, now: float, held: Held) -> bool:
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
        self.roster.heard(meta, flight.task.name)

    def _revoke(self, flight: Flight) -> None:
        if flight.celery_id is not None:
            self.celery.revoke(flight.celery_id)

    # --- finish ---

    def _finish(self, flight: Flight, result: Attempt, info: dict[str, Any] | None = None) -> bool:
        """Settle the attempt; False while a success's video is still to come from the bucket (transfer s3:
        `S3Flights.downloaded` settles it). `info`: the worker's report (with transfer s3, what it uploaded)."""
        task = flight.task
        self._end(flight)
        now = self.store.tasks.get(task.id)
        if now.state != "running" or now.attempts != task.attempts:
            # An attempt the daemon already gave up on (or one a restart requeued): its result is not ours.
            flight.part.unlink(missing_ok=True)
            flight.log.warning("late result of an abandoned attempt discarded")
            return True
        if result.ok and not flight.part.exists() and Path(task.output).is_file():
            self.life.task_done(task)  # a redelivery of an attempt whose output was already renamed
        elif result.ok and self.s3 is not None:
            self.s3.download(flight, info or {})
            return False
        else:
            record(self.life, flight.device, task, flight.part, result, flight.log,
                   flight.seconds(self.clock.monotonic()))
        if result.ok:
            drop_stale_parts(task)
        elif self.s3 is not None and flight.celery_id is not None:
            self.s3.ended_unfinished(flight)
        return True

    def _end(self, flight: Flight) -> None:
        """Whatever settles the attempt: its worker's device is free, and a worker still running it aborts its
        upload instead of completing it (its fence dropped)."""
        self.roster.released(flight.meta, flight.task.name)
        if self.s3 is not None and flight.celery_id is not None:
            self.celery.drop_fence(flight.task.id, flight.celery_id)

    def _s3(self) -> S3Flights:
        """Only flights of transfer s3 have a report or a transfer."""
        assert self.s3 is not None
        return self.s3

    def _leave_running(self) -> None:
        """Stopping: renders on other hosts go on; the store keeps them running and the next start adopts them.
        Transfers leave off at their next chunk (`stop_event`): a download is done again once its flight is
        adopted; a task whose inputs were being staged was never sent, and the next start queues it again."""
        if self.s3 is not None:
            self.s3.shutdown()
        left = [flight.task.name for flights in self.flights.values() for flight in flights]
        if left:
            log.info("remote renders carry on while the daemon is stopped; the next start picks them up",
                     tasks=len(left), names=left[:20])
        for flights in self.flights.values():
            flights.clear()
