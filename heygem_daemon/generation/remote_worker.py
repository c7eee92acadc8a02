"""`heygem-daemon worker`: a Celery worker on a GPU host running the daemon's engines.

One pool child per device (CUDA_VISIBLE_DEVICES is set in the child before any engine loads), each
engine built once per child and kept. A task writes `<output>.<attempt>.<pid>.writing.part`, renames it to
`<output>.<attempt>.part` when the engine is done, and reports; the daemon checks and renames it into
place. A redelivered task whose part (or final output) already exists returns at once.
A task sent with `transfer: s3` shares no folder with the daemon: see generation/s3_worker.py.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import time
from pathlib import Path
from typing import Any, Callable

from billiard.process import current_process
from celery import Celery
from celery.signals import worker_process_init

from heygem_daemon.config import Config, ConfigError
from heygem_daemon.failures import Kind, backoff_delay
from heygem_daemon.generation.celery_app import TASK_NAME, decode, fence_holds, make_app, render_time_limit
from heygem_daemon.generation.s3_worker import S3Side, TaskFailed, generate_s3
from heygem_daemon.generation.workers import run_engine
from heygem_daemon.log import get_logger, setup_logging

log = get_logger("heygem.remote_worker")
_child: dict[str, Any] = {"device": "cpu", "label": "cpu", "engines": {}}
FENCE_RETRY_SECONDS = (0.5, 5.0)
"""Backoff between reads of a fence Redis does not answer: first delay, longest delay."""
FENCE_MARGIN_SECONDS = 10.0
"""The fence is given up this long before Celery's hard time limit would kill the task."""


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
             devices: list[str], s3: S3Side | None = None) -> dict[str, Any]:

    spec = decode(payload["spec"], _child["device"])
    done, attempt = spec.output, payload["attempt"]
    host = f"{socket.gethostname()}:{os.getpid()}"
    meta = {"host": task.request.hostname or host, "devices": devices, "device": _child["label"],
            "task": spec.name, "attempt": attempt}
    if payload.get("transfer") == "s3":
        assert s3 is not None and s3.cfg.workers.remote is not None
        beats = _Beats(task, meta, payload["beat_seconds"])
        beats.heartbeat(force=True)
        deadline = time.monotonic() + render_time_limit(s3.cfg.workers.remote) - FENCE_MARGIN_SECONDS
        fence = _fence(task.app.backend.client, spec.task_id, task.request.id, s3.broker, deadline)
        return {**meta, **generate_s3(s3, task, payload, _child["engines"], engine_settings, _child["device"],
                                      beats, fence)}
    if (done.is_file() and done.stat().st_size) or Path(payload["final"]).is_file():
        return {**meta, "ok": True}
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
            return {**meta, "ok": False, "kind": kind, "reason": reason, "hint": hint, "dependency": dependency}
        if Path(payload["final"]).is_file():  # another run of this task made it first: one output only
            return {**meta, "ok": True}
        os.replace(writing, done)
        return {**meta, "ok": True}
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


def worker_app(cfg: Config) -> Celery:
    assert cfg.workers.remote is not None
    app = make_app(cfg.workers.remote)
    devices = list(cfg.workers.devices)
    settings = {name: dict(raw) for name, raw in cfg.engines.items()}
    s3 = S3Side(cfg)

    @worker_process_init.connect(weak=False)
    def _bind_device(**_: Any) -> None:
        index = getattr(current_process(), "index", 0) or 0
        _child["device"], _child["label"] = child_device(devices, index), child_label(devices, index)

    @app.task(bind=True, name=TASK_NAME)
    def _generate(self: Any, payload: dict[str, Any]) -> dict[str, Any]:
        return generate(self, payload, settings, devices, s3)

    return app


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
    setup_logging(None, cfg.logging.level, console=True)  # the journal keeps it, as for the daemon
    app = worker_app(cfg)
    name = hostname or f"heygem@{socket.gethostname()}"
    app.worker_main(["worker", "--pool", "prefork", "--concurrency", str(len(cfg.workers.devices)),
                     "--queues", queue, "--hostname", name, "--loglevel", cfg.logging.level.upper(),
                     "--without-gossip", "--without-mingle", "-O", "fair"])
    return 0
