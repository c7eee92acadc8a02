"""The device pool: one worker process per device slot runs engines; a thread in the daemon supervises it.

A CUDA fault or a segfault kills the worker, not the daemon. Supervisors pull tasks from the store,
forward progress, detect stalls, and retry with backoff.
"""

from __future__ import annotations

import errno
import multiprocessing
import os
import signal
import threading
import time
import traceback
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Callable, TypeVar

from heygem_daemon.clock import SYSTEM_CLOCK, Clock
from heygem_daemon.ops import metrics
from heygem_daemon.config import Config
from heygem_daemon.engines.base import EngineError, SpeechSpec, TaskSpec
from heygem_daemon.failures import Kind, Problem
from heygem_daemon.generation.lifecycle import CANCELLED_HINT, CANCELLED_REASON, LifeCycle, TaskState
from heygem_daemon.log import get_logger
from heygem_daemon.media.kinds import MediaKind, kind_of
from heygem_daemon.speech.step import CACHE_DIR as SPEECH_CACHE
from heygem_daemon.ops.diskguard import folder_fault
from heygem_daemon.proc import die_with_parent
from heygem_daemon.state import CANCELLING, Task
from heygem_daemon.state.db import StateFull

log = get_logger("heygem.workers")
PROGRESS_WRITE_INTERVAL = 0.5
BEAT_INTERVAL = 1.0
IDLE_POLL = 1.0
CANCEL_CHECK_INTERVAL = 1.0
# How often a slot holding an outcome the store could not take (its disk full) tries to record it again.
HOLD_RETRY_SECONDS = 0.5
T = TypeVar("T")
Held = Callable[[Callable[[], T]], T]


def at_once(call: Callable[[], T]) -> T:
    return call()


class _Reporter:
    """The worker's side of `engines.base.Reporter`: progress and heartbeats go up the pipe (beats at
    most once a second: the supervisor only needs to know the engine is alive)."""

    def __init__(self, conn: Connection, parent_pid: int) -> None:
        self.conn, self.parent_pid = conn, parent_pid
        self.beat_at = 0.0

    def __call__(self, fraction: float) -> None:
        self._alive()
        self.conn.send(("progress", float(fraction)))

    def heartbeat(self) -> None:
        now = time.monotonic()
        if now - self.beat_at >= BEAT_INTERVAL:
            self.beat_at = now
            self._alive()
            self.conn.send(("beat",))

    def _alive(self) -> None:
        if os.getppid() != self.parent_pid:
            os._exit(1)


def run_engine(engines: dict[str, Any], settings: dict[str, dict[str, Any]], name: str, spec: TaskSpec,
               progress: Any) -> tuple[str, ...]:
    """One generation in a worker (local or remote), the engine built once per process:
    ("done", output) or ("error", kind, reason, hint, dependency)."""
    from heygem_daemon.engines.registry import build_engine

    try:
        said = None
        if spec.speech is not None:
            from heygem_daemon.speech.step import spoken, write_subtitles

            spec, said = spoken(spec, engines, progress)
        engine = engines.get(name) or engines.setdefault(name, build_engine(name, settings.get(name, {})))
        made = engine.generate(spec, progress)
        if said:
            write_subtitles(spec.output.parent / spec.name, said)
        return ("done", str(made))
    except EngineError as exc:
        return ("error", exc.kind.value, exc.reason, exc.hint, exc.dependency)
    except Exception as exc:  # an engine bug: retry, and keep the traceback for the operator
        return crash_error(exc)


SPEAK_ONLY = ""
"""The engine name in a worker message that asks for the script's speech alone (generation/speech_ahead.py)."""


def run_speech(engines: dict[str, Any], spec: TaskSpec, progress: Any) -> tuple[str, ...]:
    """A script task's speech made into the cache, ahead of its render: ("done", "") or ("error", ...)."""
    from heygem_daemon.speech.step import spoken

    try:
        spoken(spec, engines, progress)
        return ("done", "")
    except EngineError as exc:
        return ("error", exc.kind.value, exc.reason, exc.hint, exc.dependency)
    except Exception as exc:
        return crash_error(exc)


def crash_error(exc: Exception) -> tuple[str, str, str, str, str]:
    """An exception the engine did not classify: a full disk is an outage, anything else an engine fault."""
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return ("error", Kind.OUTAGE.value, f"disk full: {exc}",
                "free space on the outputs/work disk; the task waits and runs again by itself", "disk space")
    tb = traceback.format_exc(limit=6)
    return ("error", Kind.ENGINE.value, f"{type(exc).__name__}: {exc}", f"engine crashed; see the log\n{tb}", "")


def worker_main(conn: Connection, device: str, engine_settings: dict[str, dict[str, Any]], parent_pid: int,
                niceness: int) -> None:
    """Worker process: build each engine once (models stay loaded), then run tasks as they come."""

    die_with_parent(parent_pid)
    # Generation is batch work: the daemon's intake and probes must win the CPU when they need it.
    os.nice(niceness)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    engines: dict[str, Any] = {}
    progress = _Reporter(conn, parent_pid)

    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg is None:
            return
        engine_name, spec = msg
        if engine_name == SPEAK_ONLY:
            conn.send(run_speech(engines, spec, progress))
        else:
            conn.send(run_engine(engines, engine_settings, engine_name, spec, progress))


class WorkerProcess:
    def __init__(self, device: str, engine_settings: dict[str, dict[str, Any]], niceness: int) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=worker_main, args=(child, device, engine_settings, os.getpid(), niceness),
                                name=f"heygem-worker-{device}", daemon=True)
        self.proc.start()
        child.close()

    def alive(self) -> bool:
        return self.proc.is_alive()

    def kill(self) -> None:
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join(5)
        self.conn.close()

    def close(self) -> None:
        try:
            self.conn.send(None)
        except OSError:
            pass
        self.proc.join(5)
        self.kill()


class Attempt:
    """Outcome of one attempt as the supervisor saw it."""

    def __init__(self, ok: bool, reason: str = "", hint: str = "", kind: Kind = Kind.ENGINE,
                 interrupted: bool = False, dependency: str = "") -> None:
        self.ok, self.reason, self.hint = ok, reason, hint
        self.kind, self.interrupted, self.dependency = kind, interrupted, dependency

    def problem(self) -> Problem:
        return Problem(self.kind, "generate", self.reason, self.hint.split("\n", 1)[0], self.hint)


def task_spec(cfg: Config, life: LifeCycle, task: Task, device: str) -> tuple[str, TaskSpec]:
    """The engine and the pure description of one task, as a local slot or a remote worker runs it."""
    job = life.store.jobs.get(task.job_id)
    work = cfg.folder("work") / job.id
    preset_name = job.spec.get("preset")
    try:
        preset = cfg.preset(preset_name)
    except KeyError:
        raise LookupError(f"preset {preset_name!r} is no longer in the config (removed by a reload?)") from None
    spec = TaskSpec(
        task_id=task.id, job_id=job.id, name=task.name,
        audio=work / "in" / task.audio, portrait=work / "in" / task.portrait,
        output=Path(task.output + ".part"), workdir=work / f"task-{task.id}",
        preset=preset, device=device,
        x264_preset=cfg.engine.x264_preset, options=job.spec.get("options", {}), store=life.store.path,
        speech=speech_spec(cfg, job.spec.get("speech") or {}) if kind_of(task.audio) is MediaKind.SCRIPT else None,
    )
    return job.spec.get("engine", cfg.engine.name), spec


def speech_spec(cfg: Config, chosen: dict[str, Any]) -> SpeechSpec:
    """The config's speech engine and settings, with a job's own (job.yaml `speech:`) over them."""
    name = chosen.get("engine") or cfg.speech.engine
    settings = {**cfg.speech.engines.get(name, {}), **{k: v for k, v in chosen.items() if k != "engine"}}
    return SpeechSpec(name, settings, cfg.folder("work") / SPEECH_CACHE, cfg.limits.max_script_chars,
                      cfg.speech.part_chars, cfg.speech.pause_seconds)


class Slot(threading.Thread):
    """Supervises one worker process bound to one device; tasks move through the life cycle."""

    def __init__(self, cfg: Config, life: LifeCycle, device: str, index: int, wake: threading.Event,
                 stop: threading.Event, engine_settings: dict[str, dict[str, Any]], hold: threading.Event,
                 clock: Clock = SYSTEM_CLOCK) -> None:
        super().__init__(name=f"slot-{device}-{index}", daemon=True)
        self.cfg, self.life, self.store, self.device = cfg, life, life.store, device
        self.wake, self.stop_event, self.clock = wake, stop, clock
        self.hold = hold
        self.engine_settings = engine_settings
        self.worker: WorkerProcess | None = None
        self.current: Task | None = None
        self.holding = False
        """An outcome waits here for the store to take it (its disk is full)."""

    def run(self) -> None:
        while not self.stop_event.is_set():
            if self.hold.is_set():  # draining for shutdown: finish what runs, take nothing new
                self.stop_event.wait(IDLE_POLL)
                continue
            if not self.step():
                self.wake.wait(self._idle_timeout())
                self.wake.clear()
        if self.worker:
            self.worker.close()

    def step(self) -> bool:
        """Take the next runnable task and run one attempt of it; False when none is due."""
        try:
            task = self.life.take(self.device)
        except StateFull:  # the daemon holds the slots meanwhile (ops/statedisk.py)
            return False
        except Exception:
            log.exception("cannot read the queue", device=self.device)
            return False
        if task is None:
            return False
        try:
            self._run_task(task)
        except Exception:  # the outcome could not be recorded: the slot lives on; recovery settles the task
            log.exception("cannot record a task's outcome", task_id=task.id, job_id=task.job_id)
        return True

    def _idle_timeout(self) -> float:
        nxt = self.store.tasks.next_wakeup()
        return IDLE_POLL if nxt is None else max(0.05, min(IDLE_POLL, nxt - self.clock.time()))

    def _run_task(self, task: Task) -> None:
        self.current = task
        bound = log.bind(job_id=task.job_id, task_id=task.id, task=task.name, device=self.device,
                         attempt=task.attempts)
        started = self.clock.monotonic()
        try:
            blocked = environment_fault(self.cfg)
            if blocked is not None:  # before any engine work: the task waits, its attempt not counted
                record_failure(self.life, self.device, task, blocked, bound, self._held)
                return
            engine, spec = task_spec(self.cfg, self.life, task, self.device)
            spec.workdir.mkdir(parents=True, exist_ok=True)
            spec.output.parent.mkdir(parents=True, exist_ok=True)
            bound.info("task started", engine=engine)
            result = self._attempt(engine, spec)
            seconds = self.clock.monotonic() - started
            outcome = "done" if result.ok else "interrupted" if result.interrupted else "failed"
            metrics.TASK_SECONDS.labels(self.device, outcome).observe(seconds)
            if outcome == "failed" and result.kind in (Kind.ENGINE, Kind.INTERNAL):
                result = environment_fault(self.cfg) or result  # e.g. outputs/ turned read-only mid-render
            record(self.life, self.device, task, spec.output, result, bound, seconds, self._held)
        except StateFull:  # only when stopping while an outcome was held: recovery settles it at the next start
            bound.warning("stopping with an outcome the full state disk could not take; the next start settles it")
        except Exception as exc:
            # Our own fault (a preset gone after a reload, a job's folder in the way): a counted attempt
            # with backoff like any failure, so it can never spin; work/ or outputs/ unusable is an outage.
            bound.exception("supervisor error")
            record_failure(self.life, self.device, task, environment_fault(self.cfg) or Attempt(
                False, f"{type(exc).__name__}: {exc}", "the daemon could not run the task; see the log", Kind.INTERNAL),
                bound, self._held)
        finally:
            self.current = None

    def _held(self, call: Callable[[], T]) -> T:
        """Record an outcome; while the store cannot take it (its disk is full) keep it here and try again. The
        slot takes no other task meanwhile and its worker is idle, so no result can ever be recorded against
        another task. A stop gives up holding: the task is still `running` in the store, which recovery
        settles (its output in place: done; else queued again, the attempt not counted)."""
        while True:
            try:
                result = call()
            except StateFull:
                if self.stop_event.is_set():
                    raise
                self.holding = True
                self.stop_event.wait(HOLD_RETRY_SECONDS)
                continue
            self.holding = False
            return result

    def _attempt(self, engine: str, spec: TaskSpec) -> Attempt:
        try:
            return self._follow(engine, spec)
        except BaseException:
            # The worker may still be rendering this task: were it kept, the next task would read this one's
            # answer. It goes with the attempt.
            self._drop_worker()
            raise

    def _follow(self, engine: str, spec: TaskSpec) -> Attempt:
        if self.worker is None or not self.worker.alive():
            self.worker = WorkerProcess(self.device, self.engine_settings, self.cfg.workers.nice)
        worker = self.worker
        try:
            worker.conn.send((engine, spec))
        except OSError:
            self._drop_worker()
            return Attempt(False, "worker process is not accepting work", "it will be restarted")
        last_beat = self.clock.monotonic()
        last_write = 0.0
        next_cancel_check = last_beat + CANCEL_CHECK_INTERVAL
        while True:
            if self.stop_event.is_set():
                self._drop_worker()
                return Attempt(False, "daemon stopping", interrupted=True)
            if self.clock.monotonic() >= next_cancel_check:
                next_cancel_check = self.clock.monotonic() + CANCEL_CHECK_INTERVAL
                if self.store.jobs.state(spec.job_id) == CANCELLING:
                    self._drop_worker()
                    return Attempt(False, CANCELLED_REASON, CANCELLED_HINT, Kind.CANCELLED)  # ends it, no retry
            if self.clock.monotonic() - last_beat > self.cfg.workers.stall_seconds:
                self._drop_worker()
                return Attempt(False, f"no heartbeat for {self.cfg.workers.stall_seconds:g} s (stalled)",
                               "the engine hung; it was restarted and the task will be retried")
            try:
                ready = worker.conn.poll(0.5)
                msg = worker.conn.recv() if ready else None
            except (EOFError, OSError):
                worker.proc.join(2)
                code = worker.proc.exitcode
                self._drop_worker()
                return Attempt(False, f"worker process died (exit code {code})",
                               "the engine crashed; the task will be retried")
            if msg is None:
                continue
            last_beat = self.clock.monotonic()
            kind = msg[0]
            if kind == "progress":
                if last_beat - last_write >= PROGRESS_WRITE_INTERVAL:
                    try:
                        self.store.tasks.set_progress(spec.task_id, msg[1])
                    except StateFull:  # progress is for show: the render goes on
                        pass
                    last_write = last_beat
            elif kind == "done":
                return Attempt(True)
            elif kind == "error":
                _, error_kind, reason, hint, dependency = msg
                return Attempt(False, reason, hint, Kind(error_kind), dependency=dependency)

    def _drop_worker(self) -> None:
        if self.worker is not None:
            self.worker.kill()
            self.worker = None


def environment_fault(cfg: Config) -> Attempt | None:
    """A folder every task needs (work/, outputs/) that cannot be written: an outage of the environment, so
    no task uses up its attempts on it (a job's own problem, such as a preset removed by a reload, still
    fails that job)."""
    fault = folder_fault(cfg)
    if fault is None:
        return None
    return Attempt(False, fault.reason, fault.hint, Kind.OUTAGE, dependency=fault.dependency)


def record(life: LifeCycle, device: str, task: Task, part: Path, result: Attempt, bound: Any,
           seconds: float, held: Held[Any] = at_once) -> None:
    """Finish an attempt, local or remote alike: a checked `.part` is renamed into place and the task is done;
    anything else goes through the life cycle's failure rules. `held` runs each store write (a slot keeps
    trying while the state disk is full); the file steps before it are done once."""
    if result.interrupted:
        part.unlink(missing_ok=True)
        held(lambda: life.interrupted(task))
        bound.info("task interrupted; requeued, the attempt not counted", reason=result.reason)
        return
    if result.ok:
        if not part.is_file() or part.stat().st_size == 0:
            result = Attempt(False, "engine reported success but wrote no output", "engine bug; retried")
        else:
            os.replace(part, task.output)
            bound.info("task done", output=task.output, seconds=round(seconds, 2))
            held(lambda: life.task_done(task))
            return
    part.unlink(missing_ok=True)
    record_failure(life, device, task, result, bound, held)


def record_failure(life: LifeCycle, device: str, task: Task, result: Attempt, bound: Any,
                   held: Held[TaskState] = at_once) -> None:
    state = held(lambda: life.attempt_failed(task, result.problem(), device, result.dependency))
    if result.kind is Kind.OUTAGE and state is TaskState.QUEUED:
        bound.warning("task waits for a dependency (attempt not counted)", reason=result.reason)
    else:
        bound.warning("task attempt failed", reason=result.reason, kind=result.kind.value,
                      retry=state is TaskState.QUEUED)


class WorkerPool:
    name = "workers"

    def __init__(self, cfg: Config, life: LifeCycle) -> None:
        self.wake = threading.Event()
        self.stop_event = threading.Event()
        self.hold = threading.Event()
        settings = {name: dict(raw) for name, raw in cfg.engines.items()}
        self.slots = [
            Slot(cfg, life, device, i, self.wake, self.stop_event, settings, self.hold)
            for device in cfg.workers.devices for i in range(cfg.workers.per_device)
        ]

    def start(self) -> None:
        for s in self.slots:
            s.start()

    def notify(self) -> None:
        self.wake.set()

    def stop(self, timeout: float = 30.0) -> None:
        self.stop_event.set()
        self.wake.set()
        for s in self.slots:
            s.join(timeout)

    def drain(self) -> None:
        """Take no new tasks; running ones carry on (`busy()` says when they are all done)."""
        self.hold.set()
        self.wake.set()

    def busy(self) -> bool:
        """A render runs (a slot holding an outcome for a full state disk does not count: a stop gives it up)."""
        return any(s.current is not None and not s.holding for s in self.slots)

    def alive(self) -> bool:
        return all(s.is_alive() for s in self.slots)

    def apply(self, cfg: Config) -> None:
        """Live config (SIGHUP): attempts, backoff, stall time, presets are read from it per task."""
        for s in self.slots:
            s.cfg = cfg

    def describe(self) -> list[dict[str, Any]]:
        return [{"slot": s.name, "device": s.device, "task": s.current.name if s.current else None}
                for s in self.slots]
