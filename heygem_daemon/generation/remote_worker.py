"""`heygem-daemon worker`: a Celery worker on a GPU host running the daemon's engines.

One pool child per device (CUDA_VISIBLE_DEVICES is set in the child before any engine loads), each
engine built once per child and kept. A task writes `<output>.<attempt>.<pid>.writing.part`, renames it to
`<output>.<attempt>.part` when the engine is done, and reports; the daemon checks and renames it into
place. A redelivered task whose part (or final output) already exists returns at once.
A task sent with `transfer: s3` shares no folder with the daemon: see generation/s3_worker.py.

Before it consumes, the worker checks its own set-up (generation/remote_setup.py) and waits, saying why in
Redis, until it passes; a set-up problem found in a task sends the task back uncounted and quarantines the
worker (it stops consuming). A broker that refuses the worker's password ends it (exit 2: systemd shows it
failed), as does a broker unreachable for BROKER_WAIT_SECONDS at start (exit 1: systemd restarts it).
"""

from __future__ import annotations

import dataclasses
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any, Callable

import redis
from billiard.process import current_process
from celery import Celery
from celery.signals import task_revoked, worker_process_init

from heygem_daemon.config import Config, ConfigError
from heygem_daemon.failures import Kind, backoff_delay
from heygem_daemon.generation.celery_app import TASK_NAME, decode, fence_holds, make_app, render_time_limit
from heygem_daemon.generation.remote_setup import (
    Presence, SetupProblem, engine_problem, missing_input, report_problem, setup_problems,
)
from heygem_daemon.generation.s3_worker import S3Side, TaskFailed, discard_scratch, generate_s3, sweep_ended
from heygem_daemon.generation.workers import run_engine
from heygem_daemon.log import get_logger, setup_logging

log = get_logger("heygem.remote_worker")
_child: dict[str, Any] = {"device": "cpu", "label": "cpu", "engines": {}}
FENCE_RETRY_SECONDS = (0.5, 5.0)
"""Backoff between reads of a fence Redis does not answer: first delay, longest delay."""
FENCE_MARGIN_SECONDS = 10.0
"""The fence is given up this long before Celery's hard time limit would kill the task."""
SETUP_RETRY_SECONDS = (5.0, 60.0)
"""Backoff between set-up checks of a worker that does not pass: first delay, longest delay."""
BROKER_WAIT_SECONDS = 120.0
"""How long a starting worker waits for Redis before it exits for systemd to restart it."""


def child_label(devices: list[str], index: int) -> str:
    """How `status` names pool child `index`: its configured device (with the child's number when several
    children share one device)."""
    device = devices[index % len(devices)]
    return device if devices.count(device) == 1 else f"{device}#{index}"


def child_device(devices: list[str], index: int) -> str:
    """The device of pool child `index`, as the engine sees it once CUDA_VISIBLE_DEVICES names one card."""
    device = devices[index % len(devices)]
    if device == "cpu":
        return "cpu"
    os.environ["CUDA_VISIBLE_DEVICES"] = device.partition(":")[2] or "0"
    return "cuda:0"


class _Beats:
    """The engine's Reporter: progress and heartbeats become Celery task state (PROGRESS), at most once per
    beat_seconds. A broker that is briefly away must not fail the render: a missed beat is only a beat."""

    def __init__(self, task: Any, meta: dict[str, Any], every: float) -> None:
        self.task, self.meta, self.every = task, meta, every
        # Celery keeps the running request per thread: beats sent from a transfer's helper thread name it.
        self.task_id = task.request.id
        self.at = 0.0
        self.progress = 0.0

    def __call__(self, fraction: float) -> None:
        self.progress = float(fraction)
        self.heartbeat()

    def heartbeat(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self.at < self.every:
            return
        self.at = now
        try:
            self.task.update_state(task_id=self.task_id, state="PROGRESS",
                                   meta={**self.meta, "progress": self.progress, "beat": time.time()})
        except Exception as exc:  # Redis away: the render goes on, the daemon waits for it
            log.warning("cannot report progress", error=str(exc))


def generate(task: Any, payload: dict[str, Any], engine_settings: dict[str, dict[str, Any]],
             devices: list[str], s3: S3Side, queue: str) -> dict[str, Any]:
    """One task; a set-up problem of this worker quarantines it and sends the task back uncounted."""
    spec = decode(payload["spec"], _child["device"])
    host = f"{socket.gethostname()}:{os.getpid()}"
    meta = {"host": task.request.hostname or host, "devices": devices, "device": _child["label"],
            "task": spec.name, "attempt": payload["attempt"]}
    try:
        if problem := engine_problem(s3.cfg, payload["engine"]):
            raise problem
        return {**meta, **_generate(task, payload, spec, engine_settings, meta, s3)}
    except SetupProblem as problem:
        return {**meta, **quarantine(task, queue, problem)}


def quarantine(task: Any, queue: str, problem: SetupProblem) -> dict[str, Any]:
    """This worker stops consuming (its main process cancels the queue's consumer) and says why in Redis; the
    task goes back to the daemon, which sends it again without counting the attempt."""
    host = task.request.hostname
    log.error("worker set-up problem: this worker takes no more tasks until it is fixed and restarted",
              host=host, reason=problem.reason, hint=problem.hint)
    report_problem(task.app.backend.client, host, [problem])
    try:
        task.app.control.cancel_consumer(queue, destination=[host])
    except Exception as exc:  # Redis away: the next task finds the same problem before it renders
        log.warning("cannot stop consuming", error=str(exc))
    return {"ok": False, "setup": True, "kind": Kind.SETUP.value, "reason": problem.reason, "hint": problem.hint}


def _generate(task: Any, payload: dict[str, Any], spec: Any, engine_settings: dict[str, dict[str, Any]],
              meta: dict[str, Any], s3: S3Side) -> dict[str, Any]:
    done = spec.output
    if payload.get("transfer") == "s3":
        assert s3.cfg.workers.remote is not None
        beats = _Beats(task, meta, payload["beat_seconds"])
        beats.heartbeat(force=True)
        deadline = time.monotonic() + render_time_limit(s3.cfg.workers.remote) - FENCE_MARGIN_SECONDS
        fence = _fence(task.app.backend.client, spec.task_id, task.request.id, s3.broker, deadline)
        return generate_s3(s3, task, payload, _child["engines"], engine_settings, _child["device"], beats, fence,
                           deadline)
    if (done.is_file() and done.stat().st_size) or Path(payload["final"]).is_file():
        return {"ok": True}
    if problem := missing_input([spec.audio, spec.portrait]):
        raise problem
    # Two runs of one attempt may overlap (a redelivery while the first still renders): each writes its own.
    writing = done.with_name(done.name.removesuffix(".part") + f".{os.getpid()}.writing.part")
    beats = _Beats(task, meta, payload["beat_seconds"])
    beats.heartbeat(force=True)
    try:
        spec.workdir.mkdir(parents=True, exist_ok=True)
        outcome = run_engine(_child["engines"], engine_settings, payload["engine"],
                             dataclasses.replace(spec, output=writing), beats)
        if outcome[0] == "error":
            _, kind, reason, hint, dependency = outcome
            return {"ok": False, "kind": kind, "reason": reason, "hint": hint, "dependency": dependency}
        if Path(payload["final"]).is_file():  # another run of this task made it first: one output only
            return {"ok": True}
        os.replace(writing, done)
        return {"ok": True}
    finally:
        writing.unlink(missing_ok=True)


def _fence(client: Any, task_id: int, celery_id: str, broker: str, deadline: float) -> Callable[[], bool]:
    """Whether this attempt is still the task's current one, read from the broker's Redis. The upload is
    never completed unconfirmed, and a finished render is never thrown away because Redis blinked: while
    Redis does not answer, the read is tried again with backoff (the transfer's heartbeats go on) until
    `deadline` (monotonic; just before the task's hard time limit), and only then is it an outage."""
    def holds() -> bool:
        tries = 0
        while True:
            try:
                confirmed = fence_holds(client, task_id, celery_id)
            except Exception as exc:
                tries += 1
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TaskFailed(Kind.OUTAGE, f"cannot confirm the attempt is still current: {exc}",
                                     "the task broker was away until the task's time limit; the task waits "
                                     "and runs again", broker) from exc
                if tries == 1:
                    log.warning("cannot read the attempt's fence; the finished upload waits for Redis",
                                celery_id=celery_id, error=str(exc))
                time.sleep(min(left, backoff_delay(tries, *FENCE_RETRY_SECONDS)))
                continue
            if tries:
                log.info("attempt's fence read once Redis answered", celery_id=celery_id, tries=tries)
            return confirmed
    return holds


def worker_app(cfg: Config, queue: str) -> Celery:
    assert cfg.workers.remote is not None
    app = make_app(cfg.workers.remote)
    devices = list(cfg.workers.devices)
    settings = {name: dict(raw) for name, raw in cfg.engines.items()}
    s3 = S3Side(cfg)

    @worker_process_init.connect(weak=False)
    def _bind_device(**_: Any) -> None:
        index = getattr(current_process(), "index", 0) or 0
        _child["device"], _child["label"] = child_device(devices, index), child_label(devices, index)

    @task_revoked.connect(weak=False)
    def _revoked(request: Any = None, **_: Any) -> None:
        # The main process, once the daemon revoked the attempt (given up, cancelled) and its pool child was
        # killed: what the attempt left goes now, not at a sweep a day later.
        if cfg.workers.remote is not None and cfg.workers.remote.transfer == "s3" and request is not None:
            threading.Thread(target=_discard_later, args=(cfg, request.id), name="discard-scratch",
                             daemon=True).start()

    @app.task(bind=True, name=TASK_NAME)
    def _generate(self: Any, payload: dict[str, Any]) -> dict[str, Any]:
        return generate(self, payload, settings, devices, s3, queue)

    return app


def _discard_later(cfg: Config, celery_id: str) -> None:
    time.sleep(1.0)  # the killed pool child is gone by then: nothing writes into its scratch folder any more
    # A client and store of its own: the main process forks the pool's new children, which must not inherit
    # the S3Side they use (its SQLite connection above all).
    discard_scratch(S3Side(cfg), celery_id)


def broker_client(cfg: Config) -> redis.Redis:
    """The worker's own connection to Redis, once Redis answers with the worker's password. ConfigError when
    the password is refused (restarting cannot fix it); RuntimeError when Redis is away for BROKER_WAIT_SECONDS."""
    from heygem_daemon.generation.celery_app import broker_name

    assert cfg.workers.remote is not None
    client = redis.Redis.from_url(cfg.workers.remote.broker_url, socket_connect_timeout=5, socket_timeout=10)
    name, deadline, tries = broker_name(cfg.workers.remote), time.monotonic() + BROKER_WAIT_SECONDS, 0
    while True:
        try:
            client.ping()
            return client
        except redis.AuthenticationError as exc:
            raise ConfigError(f"the {name} refuses this worker's password ({exc}): give workers.remote.broker_url "
                              "the password of Redis's requirepass (HEYGEM_WORKERS__REMOTE__BROKER_URL in "
                              "heygem-worker.env)") from None
        except redis.ResponseError as exc:  # NOAUTH: Redis wants a password the URL does not give
            raise ConfigError(f"the {name} wants a password: {exc}; put it in workers.remote.broker_url") from None
        except redis.RedisError as exc:
            tries += 1
            if time.monotonic() >= deadline:
                raise RuntimeError(f"the {name} did not answer for {BROKER_WAIT_SECONDS:.0f} s: {exc}") from None
            if tries == 1:
                log.warning("waiting for the task broker", broker=name, error=str(exc))
            time.sleep(backoff_delay(tries, 0.5, 10.0))


def wait_for_setup(cfg: Config, host: str, presence: Presence) -> None:
    """Take no task until this host's set-up passes its check; meanwhile the daemon sees why."""
    tries = 0
    while problems := setup_problems(cfg, host):
        tries += 1
        presence.problem(problems)
        for p in problems:
            log.error("worker set-up problem: no task is taken until it is fixed", reason=p.reason, hint=p.hint)
        time.sleep(backoff_delay(tries, *SETUP_RETRY_SECONDS))
    presence.clear()
    if tries:
        log.info("worker set-up passes its check now; taking tasks", checks=tries + 1)


def run_worker(cfg: Config, queue: str | None, hostname: str | None) -> int:
    """Serve `queue` (default: the first in workers.remote.queues) until stopped; ConfigError when the config
    says nothing usable for a worker."""
    remote = cfg.workers.remote
    if remote is None:
        raise ConfigError("workers.remote is not set: give it broker_url and queues (README \"Many GPU hosts\")")
    if not cfg.workers.devices:
        raise ConfigError("workers.devices: list this host's devices, e.g. [cuda:0, cuda:1]")
    queue = queue or next(iter(remote.queues))
    if queue not in remote.queues:
        raise ConfigError(f"queue {queue!r} is not in workers.remote.queues ({', '.join(remote.queues)})")
    # The journal keeps it, as for the daemon.
    setup_logging(None, cfg.logging.level, console_stream=cfg.logging.console_stream)
    app = worker_app(cfg, queue)
    name = hostname or f"heygem@{socket.gethostname()}"
    try:
        client = broker_client(cfg)
    except RuntimeError as exc:
        log.error("task broker unreachable; exiting for systemd to start the worker again", error=str(exc))
        return 1
    presence = Presence(client, name, queue, list(cfg.workers.devices))
    presence.start()
    try:
        wait_for_setup(cfg, name, presence)
        if remote.transfer == "s3":
            sweep_ended(S3Side(cfg), client)  # what attempts left when this worker was killed
        app.worker_main(["worker", "--pool", "prefork", "--concurrency", str(len(cfg.workers.devices)),
                         "--queues", queue, "--hostname", name, "--loglevel", cfg.logging.level.upper(),
                         "--without-gossip", "--without-mingle", "-O", "fair"])
    finally:
        presence.leave()
    return 0
