"""The one owner of job and task transitions: the state machine, the fate of a failed attempt, and the
events that tell the rest of the daemon what happened.

Intake's claim, the worker slots, start-up recovery and the operator's requests (cancel, retry) all move
jobs and tasks through `LifeCycle`; a move the tables below do not allow raises `IllegalTransition`.

Crash safety: each step is recorded in the store before the next begins, and files move before the state
that says where they are. Events are emitted synchronously, after the files are where the event says and
before a job's final state is recorded, so a crash in between makes recovery finish the job again and
emit the event again; subscribers are idempotent (the outbox dedupes on its event keys).
"""

from __future__ import annotations

import re
import shlex
import threading
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import Any, Callable, TypeVar

from heygem_daemon.clock import SYSTEM_CLOCK, Clock
from heygem_daemon.config import Config
from heygem_daemon.failures import Kind, Problem, backoff_delay, error_record, warnings_of
from heygem_daemon.generation import jobs as files
from heygem_daemon.log import get_logger
from heygem_daemon.state import Job, NewTask, Store, Task

log = get_logger("heygem.lifecycle")
CANCELLED_REASON = "cancelled by the operator"
CANCELLED_HINT = "to make it after all: `heygem-daemon retry JOB` (or drop the files again)"


class JobState(str, Enum):
    DETECTED = "detected"  # a row exists; the inputs are moving (claim or refusal under way)
    QUEUED = "queued"
    RUNNING = "running"
    CANCELLING = "cancelling"  # the operator asked to stop it; the daemon ends it as failed
    GENERATED = "generated"  # every video made; the inputs are on their way to archive/
    DONE = "done"
    FAILED = "failed"
    RETRYING = "retrying"  # the operator asked for another go; the daemon carries it out
    RETRIED = "retried"  # refused at intake, sent back through the inbox as a new job


class TaskState(str, Enum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"


J, T = JobState, TaskState
JOB_MOVES: dict[JobState, frozenset[JobState]] = {
    J.DETECTED: frozenset({J.QUEUED, J.DONE, J.FAILED}),  # claimed, a duplicate, refused
    J.QUEUED: frozenset({J.RUNNING, J.CANCELLING}),
    J.RUNNING: frozenset({J.GENERATED, J.FAILED, J.CANCELLING}),
    J.CANCELLING: frozenset({J.GENERATED, J.FAILED}),  # the running tasks may all have made it
    J.GENERATED: frozenset({J.DONE}),
    J.DONE: frozenset(),
    J.FAILED: frozenset({J.RETRYING}),
    J.RETRYING: frozenset({J.QUEUED, J.RETRIED, J.FAILED}),
    J.RETRIED: frozenset(),
}
TASK_MOVES: dict[TaskState, frozenset[TaskState]] = {
    T.QUEUED: frozenset({T.RUNNING, T.FAILED}),  # taken by a slot; failed by a cancel
    T.RUNNING: frozenset({T.DONE, T.QUEUED, T.FAILED}),  # made; retried, waiting or interrupted; failed
    T.DONE: frozenset(),
    T.FAILED: frozenset({T.QUEUED}),  # retry
}
UNFINISHED = (J.QUEUED, J.RUNNING, J.GENERATED, J.CANCELLING)
# A job whose tasks all ended but that could not be finished (its files would not move) is tried again
# this often, not at every turn of the main loop.
FINISH_AGAIN_SECONDS = 60.0


class IllegalTransition(RuntimeError):
    pass


class JobError(Exception):
    """An operator request that cannot be carried out; the message says why."""


def check_job(now: str, to: JobState) -> None:
    if to not in JOB_MOVES[JobState(now)]:
        raise IllegalTransition(f"a job cannot go from {now} to {to.value}")


def check_task(now: str, to: TaskState) -> None:
    if to not in TASK_MOVES[TaskState(now)]:
        raise IllegalTransition(f"a task cannot go from {now} to {to.value}")


# --- events ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class JobQueued:
    job_id: str
    name: str
    tasks: int
    priority: str


@dataclass(frozen=True)
class TaskFinished:
    job_id: str
    task_id: int
    name: str
    output: str


@dataclass(frozen=True)
class TaskFailed:
    job_id: str
    task_id: int
    name: str
    problem: Problem
    state: TaskState
    """queued (tried again later) or failed (for good)."""


@dataclass(frozen=True)
class JobFinished:
    job: Job
    outcome: JobState
    """done or failed."""
    videos: list[str] = field(default_factory=list)
    """Outputs made (paths), also when the job failed in part."""
    problems: list[Problem] = field(default_factory=list)
    record: dict[str, Any] | None = None
    """error.json, for a failed job."""


@dataclass(frozen=True)
class JobRefused:
    """Refused at intake: the inputs are in failed/ with error.json."""

    job: Job
    problems: list[Problem]
    record: dict[str, Any]


E = TypeVar("E")


class Events:
    """A small in-process dispatcher. Handlers run in the emitting thread and must be quick (record, wake);
    a handler that raises is logged and does not stop the others or the transition."""

    def __init__(self) -> None:
        self._handlers: dict[type, list[Callable[[Any], None]]] = {}

    def subscribe(self, kind: type[E], handler: Callable[[E], None]) -> None:
        self._handlers.setdefault(kind, []).append(handler)

    def emit(self, event: object) -> None:
        for handler in self._handlers.get(type(event), []):
            try:
                handler(event)
            except Exception:
                log.exception("event handler failed", event=type(event).__name__)


# --- the life cycle -----------------------------------------------------------------------------------

class LifeCycle:
    def __init__(self, cfg: Config, store: Store, events: Events | None = None, clock: Clock = SYSTEM_CLOCK) -> None:
        self.cfg, self.store, self.clock = cfg, store, clock
        self.events = events or Events()
        # Slots and the main loop may both see a job's last task end: one of them finishes it.
        self._finishing = threading.Lock()
        self._finish_again_at = 0.0

    def _move(self, job: Job, to: JobState, **changes: Any) -> None:
        check_job(job.state, to)
        before = self.store.jobs.transition(job.id, to.value, [job.state], **changes)
        if before != job.state:
            raise IllegalTransition(f"job {job.name} is {before}, not {job.state}; cannot make it {to.value}")

    # --- intake ---

    def queue(self, job: Job, tasks: list[NewTask]) -> Job:
        """Claimed: the inputs are in work/; the tasks exist and are queued with the job, in one step."""
        check_job(job.state, J.QUEUED)
        self.store.jobs.queue(job.id, tasks)
        self.events.emit(JobQueued(job.id, job.name, len(tasks), job.spec.get("priority", "normal")))
        return self.store.jobs.get(job.id)

    def duplicate(self, job: Job, original: Job) -> Job:
        check_job(job.state, J.DONE)
        self.store.jobs.mark_duplicate(job.id, original.id)
        return self.store.jobs.get(job.id)

    def refuse(self, job: Job, problems: list[Problem], record: dict[str, Any]) -> Job:
        """The inputs are in failed/ with error.json: tell, then record (recovery undoes a claim cut short)."""
        check_job(job.state, J.FAILED)
        self.events.emit(JobRefused(job, problems, record))
        self._move(job, J.FAILED, error=record)
        return self.store.jobs.get(job.id)

    # --- slots ---

    def take(self, device: str) -> Task | None:
        return self.store.tasks.take_next(device, self.clock.time())

    def task_done(self, task: Task) -> None:
        """The output is in place (renamed from .part): the task is done."""
        check_task(task.state, T.DONE)
        if not self.store.tasks.finish(task.id):
            raise IllegalTransition(f"task {task.id} was not running; cannot make it done")
        self.events.emit(TaskFinished(task.job_id, task.id, task.name, task.output))
        self._finish_after_task(task.job_id)

    def _finish_after_task(self, job_id: str) -> None:
        # The task's end is recorded: a job that cannot be finished now (its files will not move) must not
        # turn into a failed attempt of a task that is over. `settle_requests` tries again later.
        try:
            self.finish_job(job_id)
        except Exception:
            log.exception("cannot finish the job now; will try again", job_id=job_id,
                          retry_in=FINISH_AGAIN_SECONDS)

    def interrupted(self, task: Task) -> None:
        """Stopped by shutdown: back to the queue, the attempt not counted."""
        check_task(task.state, T.QUEUED)
        self.store.tasks.requeue([task.id], reset_attempts=False)

    def attempt_failed(self, task: Task, problem: Problem, device: str, dependency: str = "") -> TaskState:
        """The one place a failed attempt's fate is decided, by the problem's kind (see failures.py)."""
        check_task(task.state, T.QUEUED)
        w, now = self.cfg.workers, self.clock.time()
        error: dict[str, Any] = {**problem.to_dict(), "attempt": task.attempts, "device": device}
        cancelled = self.store.jobs.state(task.job_id) == J.CANCELLING
        if not problem.kind.counts_attempt and not cancelled:
            last = task.last_error or {}
            error["since"] = last.get("since", now) if last.get("kind") == Kind.OUTAGE.value else now
            error["dependency"] = dependency or last.get("dependency") or problem.reason
            streak = self.store.tasks.outage_streak(task.id)
            delay = backoff_delay(streak + 1, w.backoff_seconds, w.backoff_max_seconds)
            state: TaskState | None = T.QUEUED if self.store.tasks.wait(task.id, error, now + delay) else None
        else:
            retry_at = None
            if problem.kind.retried and not cancelled and task.attempts < w.max_attempts:
                retry_at = now + backoff_delay(task.attempts, w.backoff_seconds, w.backoff_max_seconds)
            recorded = self.store.tasks.fail_attempt(task.id, error, retry_at)
            state = TaskState(recorded) if recorded else None
        if state is None:
            raise IllegalTransition(f"task {task.id} was not running; its failed attempt is not recorded")
        self.events.emit(TaskFailed(task.job_id, task.id, task.name, problem, state))
        if state is T.FAILED:
            self._finish_after_task(task.job_id)
        return state

    # --- finishing ---

    def finish_job(self, job_id: str) -> None:
        """Once every task has ended: inputs to archive/ (all made) or failed/ with error.json."""
        with self._finishing:
            tasks = self.store.tasks.select(job_id)
            if not tasks or any(t.state not in (T.DONE, T.FAILED) for t in tasks):
                return
            job = self.store.jobs.get(job_id)
            if job.state not in UNFINISHED:
                return
            failed = [t for t in tasks if t.state == T.FAILED]
            made = [t for t in tasks if t.state == T.DONE]
            if failed:
                self._finish_failed(job, failed, made)
            else:
                self._finish_done(job, made)

    def _finish_done(self, job: Job, made: list[Task]) -> None:
        if job.state != J.GENERATED:
            self._move(job, J.GENERATED)
            job = self.store.jobs.get(job.id)
        dest = files.archive_inputs(self.cfg, job)
        self.events.emit(JobFinished(job, J.DONE, [t.output for t in made]))
        self._move(job, J.DONE, spec={**job.spec, "inputs_at": str(dest)})
        log.info("job done", job_id=job.id, job=job.name, videos=len(made),
                 outputs=str(self.cfg.folder("outputs") / job.name))

    def _finish_failed(self, job: Job, failed: list[Task], made: list[Task]) -> None:
        problems = [_task_problem(t, job.name) for t in failed]
        record = error_record(job.name, "generate", problems, job_id=job.id, videos_made=[t.name for t in made],
                              outputs=str(self.cfg.folder("outputs") / job.name) if made else None,
                              **warnings_of(job.spec))
        dest = files.file_failed(self.cfg, job, record)
        if not made:
            files.drop_empty_outputs(self.cfg, job)
        # The inputs (job.yaml with its chat targets among them) are in failed/ now, before the store says so.
        job = replace(job, spec={**job.spec, "inputs_at": str(dest)})
        self.events.emit(JobFinished(job, J.FAILED, [t.output for t in made], problems, record))
        self._move(job, J.FAILED, error=record, spec=job.spec)
        log.warning("job failed", job_id=job.id, job=job.name, failed=len(failed), made=len(made),
                    reason=record["reason"], hint=record["hint"])

    def recover(self, adoptable: frozenset[int] = frozenset()) -> dict[str, int]:
        """After a crash or a stop: tasks left running are queued again (or done, if their output made it;
        or left running when `adoptable`: renders on other hosts the remote dispatcher picks up), jobs
        whose tasks all ended are finished (their events emitted again), and requests are carried out."""
        counts = {"requeued": 0, "completed": 0, "adopted": 0}
        for task in self.store.tasks.select(states=(T.RUNNING.value,)):
            if files.output_made(task.output):
                self.store.tasks.finish(task.id)
                counts["completed"] += 1
            elif task.id in adoptable:
                counts["adopted"] += 1
            else:
                self.store.tasks.requeue([task.id], reset_attempts=False)
                counts["requeued"] += 1
        for job in self.store.jobs.select(tuple(s.value for s in UNFINISHED)):
            self.finish_job(job.id)
        self.settle_requests()
        if counts["requeued"] or counts["completed"]:
            log.warning("recovered tasks interrupted by a crash", **counts)
        return counts

    # --- operator requests, carried out by the daemon ---

    def settle_requests(self) -> None:
        """Cancels: queued tasks fail and a job with nothing left running is finished (running tasks are
        stopped by their slot). Retries: the inputs go back to work/ and the failed tasks are queued.
        Now and then, jobs whose finishing failed are finished again."""
        if self.clock.time() >= self._finish_again_at:
            self._finish_again_at = self.clock.time() + FINISH_AGAIN_SECONDS
            for job_id in self.store.jobs.all_tasks_ended(tuple(s.value for s in UNFINISHED)):
                self._finish_after_task(job_id)
        for job in self.store.jobs.select((J.CANCELLING.value,)):
            self.store.jobs.cancel(job.id, _cancelled().to_dict())
            self.finish_job(job.id)
        for job in self.store.jobs.select((J.RETRYING.value,)):
            try:
                self._retry(job)
            except OSError as exc:  # the file system said no: the job stays asked-for, tried next round
                log.error("cannot carry out a retry yet", job_id=job.id, job=job.name, error=str(exc))

    def _retry(self, job: Job) -> None:
        if not self.store.tasks.select(job.id):
            target = files.send_back_to_intake(self.cfg, job)
            self._move(job, J.RETRIED)
            log.info("job sent back through intake", job_id=job.id, job=job.name, folder=str(target))
            return
        staging = files.stage_for_retry(self.cfg, job)
        if staging is None:
            problem = Problem(Kind.BAD_INPUT, "retry", "the inputs are no longer where the job left them",
                              "drop the files again instead")
            self._move(job, J.FAILED, error=error_record(job.name, "retry", [problem], job_id=job.id))
            log.error("retry impossible: inputs gone", job_id=job.id, job=job.name)
            return
        spec: dict[str, Any] = {**job.spec, "staging": str(staging)}
        spec.pop("inputs_at", None)
        queued = self.store.jobs.requeue_failed(job.id, J.RETRYING.value, spec)
        self.events.emit(JobQueued(job.id, job.name, queued, job.spec.get("priority", "normal")))
        log.info("job retried", job_id=job.id, job=job.name, tasks=queued)


def _task_problem(task: Task, job_name: str) -> Problem:
    """A task that failed for good, as error.json and the chat tell it: what its last attempt said, less
    the promise of another try (there is none now), with the command that runs it again."""
    err = task.last_error or {}
    problem = Problem.from_dict({"kind": Kind.INTERNAL.value, "stage": "generate", **err})
    hint, detail = _settled(problem.hint, job_name), _settled(problem.detail, job_name)
    if problem.kind.counts_attempt and problem.kind.retried:
        hint = "; ".join(filter(None, [hint, f"gave up after {task.attempts} attempt(s)"]))
    return replace(problem, hint=hint, detail=detail).about(f"{task.name} ({task.portrait} + {task.audio})")


# What an attempt's hint promised while another attempt was to come ("…; the task will be retried").
_PROMISE = re.compile(r"(the task will be retried|it will be restarted|the job is submitted again"
                      r"|the task waits\b.*|retried\b.*)", re.IGNORECASE)
_AND_PROMISE = re.compile(r" and the task will be retried", re.IGNORECASE)


def _settled(text: str, job_name: str) -> str:
    """`text`'s first line without retry promises, and `heygem-daemon retry JOB` naming the job."""
    first, _, rest = text.partition("\n")
    first = _AND_PROMISE.sub("", first)
    clauses = [c.strip() for c in first.split(";")]
    first = "; ".join(c for c in clauses if c and not _PROMISE.fullmatch(re.sub(r" once$", "", c)))
    first = first.replace("`heygem-daemon retry JOB`", f"`heygem-daemon retry {shlex.quote(job_name)}`")
    return "\n".join(filter(None, [first, rest]))


def _cancelled() -> Problem:
    # A cancel ends the job now, without another attempt (Kind.CANCELLED is never retried).
    return Problem(Kind.CANCELLED, "generate", CANCELLED_REASON, CANCELLED_HINT)


# --- the operator's side (CLI): requests the running daemon carries out ----------------------------------

def request_cancel(store: Store, ref: str) -> str:
    job = store.jobs.find(ref)
    if job is None:
        raise JobError(f"no job called {ref!r}; `heygem-daemon status` lists them")
    before, running = store.jobs.cancel(job.id, _cancelled().to_dict())
    if before not in (J.QUEUED, J.RUNNING, J.CANCELLING):
        raise JobError(f"job {job.name} is {before}; only queued or running jobs can be cancelled")
    stopping = f"its {running} running task(s) are stopped and " if running else ""
    return (f"{job.name}: cancelling; {stopping}its inputs go to failed/{job.name}/ with error.json "
            f"(`heygem-daemon retry {job.name}` runs it again).")


def request_retry(store: Store, ref: str) -> str:
    job = store.jobs.find(ref)
    if job is None:
        raise JobError(f"no job called {ref!r}; `heygem-daemon jobs --failed` lists them")
    if job.state == J.RETRYING:
        return f"{job.name}: a retry is already asked for."
    if job.state != J.FAILED:
        raise JobError(f"job {job.name} is {job.state}, not failed; only failed jobs can be retried")
    if files.inputs_of(job) is None:
        raise JobError(f"the inputs of {job.name} are no longer at {job.spec.get('inputs_at')}; "
                       "drop the files again instead")
    before = store.jobs.transition(job.id, J.RETRYING.value, [J.FAILED.value])
    if before != J.FAILED:
        raise JobError(f"job {job.name} became {before} meanwhile; nothing asked")
    queued = len(store.tasks.select(job.id, (T.FAILED.value,)))
    what = f"its {queued} failed task(s) are queued again" if queued else "its inputs go back through intake"
    return f"{job.name}: retry asked; {what}."
