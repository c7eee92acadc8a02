"""The `heygem` engine: drives HeyGem's (or Duix-Avatar's) GPU video service, one or more, one per GPU.

Inputs go into the folder the service's container sees as /code/data, a job is submitted under a fresh
code, polled until it ends, and the result is checked and moved into outputs. How the real service
behaves decides the rules here:
- Its progress stands at 20 % for the whole render, so liveness is the service answering "running" for
  our code (a heartbeat to the worker), and a render is bounded by a limit that scales with the audio.
- Busy (10001) is normal, another job runs there: wait, or take another service. No answer at all (a
  container restarting) is an outage: other services are tried, down ones asked again, and when none
  can take the job it waits in the queue without using an attempt.
- It forgets a job once it has told its end, so that answer is taken the first time; its files are
  removed only then (exchange.py, codes.py).
- Bad media comes back as a failed job with a message: the known ones end the task as bad input."""

from __future__ import annotations

import os
import time
import uuid
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import ClassVar, Literal

from heygem_daemon.ops.checks import Check
from heygem_daemon.generation.dependencies import Dependency
from heygem_daemon.engines.base import BadInputError, EngineError, OutageError, ProgressFn, TaskSpec
from heygem_daemon.engines.heygem.client import (
    CONTAINERS, FAILED, LOG_HINT, SUCCEEDED, HeygemClient, ServiceBusy, ServiceUnreachable,
    TaskState, bad_media, service_name, unanswered,
)
from heygem_daemon.engines.heygem.exchange import Exchange, audio_seconds
from heygem_daemon.engines.heygem.health import HealthBook, probe, read_health
from heygem_daemon.engines.heygem.pool import Lease, ServicePool, health_file
from heygem_daemon.engines.heygem.settings import Endpoint, HeygemSettings
from heygem_daemon.fs.ops import move
from heygem_daemon.log import get_logger, redact_text
from heygem_daemon.media.errors import MediaError
from heygem_daemon.state import Store

# Share of the progress bar: staging the inputs, then the service's own 0..100, then delivery.
_STAGED, _SERVICE_SHARE = 0.05, 0.9
# A poll without an answer is tolerated this many times in a row (a proxy restarting, a blip).
_UNANSWERED_POLLS = 3
# Noted in the task's scratch folder when the service said "done" without a result file: once is
# retried, twice for the same inputs is the end.
_MUX_FAILED = "heygem-mux-failed"
_RETRY = "the task will be retried"
# The daemon's probe of a down service must not hold its watch long on a host that drops packets.
_PROBE_TIMEOUT = 3.0
_WAITS = "the task waits without using an attempt and runs again by itself"

Submitted = Literal["ok", "busy", "down"]
log = get_logger("heygem.engine")


class HeygemEngine:
    name: ClassVar[str] = "heygem"
    # The service needs a visible face too: refusing faceless portraits at intake saves GPU time.
    needs_face: ClassVar[bool] = True
    # It fails a job whose portrait shows several people ("存在多人脸"): intake refuses those up front.
    single_face: ClassVar[bool] = True
    Settings = HeygemSettings

    def __init__(self, settings: HeygemSettings) -> None:
        self.settings = settings
        self.endpoints = settings.endpoints()
        self.pool = ServicePool(self.endpoints)
        self.clients = {e.url: HeygemClient(e.url, settings.request_timeout) for e in self.endpoints}
        self.health = {e.url: HealthBook(health_file(e), e.url) for e in self.endpoints}
        self._stores: dict[Path, Store] = {}

    def generate(self, task: TaskSpec, progress: ProgressFn) -> Path:
        try:
            seconds = audio_seconds(task.audio)
        except MediaError as exc:
            raise BadInputError(exc.reason, exc.hint) from None
        left = self._left_running(task)
        if left is not None and self._adopt(task, left, seconds, progress):
            progress(1.0)
            return task.output
        exchange = Exchange(str(uuid.uuid4()), task, self._store(task))
        try:
            try:
                exchange.prepare(seconds)
            except MediaError as exc:
                raise BadInputError(exc.reason, exc.hint) from None
            progress(_STAGED)
            result = self._run(task, exchange, seconds, progress)
            self._deliver(result, task)
        finally:
            exchange.close()
        progress(1.0)
        return task.output

    def _store(self, task: TaskSpec) -> Store | None:
        if task.store is None:
            return None
        return self._stores.get(task.store) or self._stores.setdefault(task.store, Store(task.store))

    # --- a render an earlier attempt left running -----------------------------------------------------

    def _left_running(self, task: TaskSpec) -> Exchange | None:
        """The job an interrupted attempt of this task submitted (the daemon was killed or stopped
        mid-render), if its service is still configured."""
        store = self._store(task)
        code = store.heygem.left_running(task.task_id) if store is not None else None
        if code is None:
            return None
        endpoint = next((e for e in self.endpoints if e.url == code.service and str(e.temp) == code.temp), None)
        return None if endpoint is None else Exchange.left_running(code.code, code.created_at, endpoint, task, store)

    def _adopt(self, task: TaskSpec, exchange: Exchange, seconds: float, progress: ProgressFn) -> bool:
        """Follow that job to its end instead of rendering again: True once its result is delivered;
        False when the service no longer has it (restarted: a new job is submitted) or does not answer
        (its files stay for the sweep; another service may render meanwhile)."""
        endpoint = exchange.held_by
        assert endpoint is not None
        client = self.clients[endpoint.url]
        try:
            try:
                state = client.query(exchange.code)
            except ServiceUnreachable:
                return False
            if state is None or state.status in (SUCCEEDED, FAILED):
                exchange.forgotten()  # told its end (now, to us) or forgot it: no lease needed to take it
                if state is None:
                    return False
                self._log_adopted(client, exchange)
                result = self._ended(task, client, endpoint, exchange, state, restarted=False)
            else:
                self._log_adopted(client, exchange)
                with self._lease_of(endpoint, progress):
                    result = self._follow(task, endpoint, exchange, seconds, progress, exchange.started)
            self._deliver(result, task)
            return True
        finally:
            exchange.close()

    def _lease_of(self, endpoint: Endpoint, progress: ProgressFn) -> Lease:
        """This service's lease, waiting while one of our workers holds it for a moment (it is told busy:
        the job being adopted runs there)."""
        while (lease := ServicePool([endpoint]).try_acquire(0)) is None:
            progress.heartbeat()
            time.sleep(self.settings.poll_interval)
        return lease

    @staticmethod
    def _log_adopted(client: HeygemClient, exchange: Exchange) -> None:
        log.info("following the render an interrupted attempt left on the service", service=client.shown,
                 code=exchange.code, task_id=exchange.task.task_id)

    # --- finding a service ------------------------------------------------------------------------

    def _run(self, task: TaskSpec, exchange: Exchange, seconds: float, progress: ProgressFn) -> Path:
        """Submit to a free service and follow the job to its end there. Busy and down services are
        asked again every busy_retry_interval; when every service is down, the task waits (outage)."""
        next_try: dict[str, float] = {}
        down: dict[str, str] = {}
        while True:
            unmounted = {e.url: f"its data_dir {e.data_dir} is not there (not mounted?)"
                         for e in self.endpoints if not e.data_dir.is_dir()}
            down.update(unmounted)
            if len(down) == len(self.endpoints):
                raise self._outage(down)
            now = time.monotonic()
            skip = {url for url, at in next_try.items() if at > now} | set(unmounted)
            lease = self.pool.try_acquire(task.task_id, skip)
            if lease is None:
                progress.heartbeat()  # waiting on services that answer (or on our own other jobs)
                time.sleep(self.settings.poll_interval)
                continue
            with lease:
                outcome, why = self._submit(lease.endpoint, exchange)
                if outcome == "ok":
                    return self._follow(task, lease.endpoint, exchange, seconds, progress, time.time())
            next_try[lease.url] = time.monotonic() + self.settings.busy_retry_interval
            down.pop(lease.url, None)
            if outcome == "down":
                down[lease.url] = why
                if exchange.held_by is not None:  # it may have taken the job: no second service for this code
                    raise self._outage(down)

    def _outage(self, down: dict[str, str]) -> OutageError:
        first = next(iter(down))
        where = "; ".join(f"{redact_text(url)}: {why}" for url, why in down.items())
        return OutageError(f"no heygem service can take the job ({where})",
                           f"start the service's container ({CONTAINERS}) or mount "
                           f"its data_dir; {_WAITS}", dependency=service_name(first))

    def _submit(self, endpoint: Endpoint, exchange: Exchange) -> tuple[Submitted, str]:
        client, health = self.clients[endpoint.url], self.health[endpoint.url]
        audio, video = exchange.into(endpoint)
        exchange.submitting(endpoint)
        try:
            client.submit(exchange.code, audio, video, self.settings.chaofen, self.settings.watermark)
        except ServiceBusy:
            exchange.refused(endpoint)
            health.saw("busy")
            return "busy", ""
        except ServiceUnreachable as exc:
            if not exc.delivered:
                exchange.refused(endpoint)
            health.saw("down", exc.reason)
            return "down", exc.reason
        except EngineError:
            exchange.refused(endpoint)
            raise
        health.saw("ok")
        return "ok", ""

    # --- following the job ------------------------------------------------------------------------

    def _follow(self, task: TaskSpec, endpoint: Endpoint, exchange: Exchange, seconds: float,
                progress: ProgressFn, submitted: float) -> Path:
        client, health = self.clients[endpoint.url], self.health[endpoint.url]
        limit = self.settings.render_limit(seconds)
        # From the submit (wall clock): an adopted render keeps the limit it started with.
        deadline = time.monotonic() + limit - max(0.0, time.time() - submitted)
        unanswered, restarted, shown = 0, False, -1.0
        while True:
            time.sleep(self.settings.poll_interval)
            try:
                state = client.query(exchange.code)
            except ServiceUnreachable as exc:
                health.saw("down", exc.reason)
                unanswered, restarted = unanswered + 1, True
                if unanswered >= _UNANSWERED_POLLS:
                    raise OutageError(f"heygem service at {client.shown} stopped answering during the render",
                                      f"it is probably restarting (docker ps: {CONTAINERS}); {_WAITS}",
                                      dependency=service_name(endpoint.url)) from None
                continue
            health.saw("ok")
            unanswered = 0
            if state is None or state.status in (SUCCEEDED, FAILED):
                exchange.forgotten()
                return self._ended(task, client, endpoint, exchange, state, restarted)
            # Running: the service answering for our job is the heartbeat; its progress may stand still.
            if time.monotonic() > deadline:
                raise EngineError(
                    f"heygem service at {client.shown} still renders after {limit:.0f} s "
                    f"({self.settings.render_timeout_factor:g} x {seconds:.1f} s of audio + "
                    f"{self.settings.render_timeout_base:g} s), at {state.progress:g}%",
                    f"the service may be hung: restart its container ({CONTAINERS}); "
                    f"on a slow GPU raise engines.heygem.render_timeout_factor; {_RETRY}")
            if state.progress != shown:
                shown = state.progress
                progress(_STAGED + _SERVICE_SHARE * min(1.0, max(0.0, state.progress / 100)))
            else:
                progress.heartbeat()

    def _ended(self, task: TaskSpec, client: HeygemClient, endpoint: Endpoint, exchange: Exchange,
               state: TaskState | None, restarted: bool) -> Path:
        """The job's end as the service told it (or 10004: it no longer knows the code)."""
        if state is not None and state.status == FAILED:
            meaning = bad_media(state.msg)
            if meaning is not None:
                raise BadInputError(f"heygem service at {client.shown}: {meaning[0]} ({state.msg})", meaning[1])
            raise EngineError(f"heygem service at {client.shown} failed: {state.msg or 'no reason given'}",
                              f"{LOG_HINT}; {_RETRY}")
        result = exchange.result(endpoint, state.result if state else "")
        if result.is_file():
            return result
        if state is None:
            if restarted:  # it went away during the render and came back without our job
                raise OutageError(f"heygem service at {client.shown} restarted and lost the job",
                                  f"the job is submitted again; {_WAITS}", dependency=service_name(endpoint.url))
            raise EngineError(f"heygem service at {client.shown} no longer knows task {exchange.code}",
                              f"{LOG_HINT}; {_RETRY}")
        return self._no_result(task, client, result)

    def _no_result(self, task: TaskSpec, client: HeygemClient, result: Path) -> Path:
        """"Done" without a result file: the service's last step, muxing the audio in, failed. It happens
        now and then, so once is retried; twice for the same inputs ends the task."""
        reason = (f"heygem service at {client.shown} reported success but its final mux failed: "
                  f"no {result.name} in {result.parent}")
        marker = task.workdir / _MUX_FAILED
        if marker.exists():
            raise BadInputError(f"{reason} (the second time for these inputs)",
                                f"export the audio again as WAV (16-bit PCM) and drop it in again; {LOG_HINT}")
        marker.touch()
        raise EngineError(reason, f"{LOG_HINT}; {_RETRY} once")

    def _deliver(self, result: Path, task: TaskSpec) -> None:
        # numpy comes with these, in the worker only: the daemon imports this package for settings and sweeps.
        from heygem_daemon.media.audio import load_clip
        from heygem_daemon.media.verify import add_audio, inspect_mp4

        try:
            facts = inspect_mp4(result)
        except MediaError as exc:
            raise EngineError(f"heygem result unusable: {exc.reason}", _RETRY) from None
        if not facts.has_video:
            raise EngineError(f"heygem result {result.name} has no decodable video", _RETRY)
        task.output.unlink(missing_ok=True)
        if facts.has_audio:
            move(result, task.output)
            return
        try:
            add_audio(result, load_clip(task.audio), task.output, task.preset.audio_bitrate)
        except MediaError as exc:
            raise EngineError(exc.reason, exc.hint) from None

    # --- for the operator -------------------------------------------------------------------------

    @classmethod
    def dependencies(cls, settings: HeygemSettings) -> list[Dependency]:
        """Each service as the workers last saw it: down, wedged (busy with a job not ours for longer
        than busy_alert_seconds), busy, or ok. A down one is asked again every poll_interval by the daemon,
        so the tasks waiting for it go as soon as it answers."""
        timeout = min(settings.request_timeout, _PROBE_TIMEOUT)
        return [replace(_dependency(e, settings.busy_alert_seconds), group=cls.name,
                        probe=partial(probe, e, timeout), probe_every=settings.poll_interval)
                for e in settings.endpoints()]

    @classmethod
    def doctor(cls, settings: HeygemSettings, devices: list[str]) -> list[Check]:
        endpoints = settings.endpoints()
        folders = list(dict.fromkeys(e.data_dir for e in endpoints))
        checks = [_data_dir_check(d) for d in folders]
        for endpoint in endpoints:
            checks.append(_service_check(endpoint.url, settings.request_timeout))
            dep = _dependency(endpoint, settings.busy_alert_seconds)
            if dep.state == "wedged":
                checks.append(Check(f"{dep.name} jobs", False, dep.detail, dep.hint))
        return checks


def _when(at: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(at))


def _dependency(endpoint: Endpoint, busy_alert: float) -> Dependency:
    name = service_name(endpoint.url)
    health = read_health(health_file(endpoint), endpoint.url)
    if health is None:
        return Dependency(name, "unknown", None, 0.0, "not asked yet")
    seen = f"last asked {_when(health.last_seen)}"
    if health.down_since is not None:
        return Dependency(name, "down", health.down_since, health.last_seen,
                          f"no answer since {_when(health.down_since)} ({seen}): {health.reason}",
                          f"start its container ({CONTAINERS}) or fix the URL")
    if health.busy_since is not None:
        busy_for = health.last_seen - health.busy_since
        if busy_for >= busy_alert:
            return Dependency(name, "wedged", health.busy_since, health.last_seen,
                              f"busy with a job that is not ours since {_when(health.busy_since)} ({seen})",
                              f"another client's job may hang there; restart the container "
                              f"({CONTAINERS}) when nobody else is using it")
        return Dependency(name, "busy", health.busy_since, health.last_seen,
                          f"busy with another client's job since {_when(health.busy_since)} ({seen})")
    return Dependency(name, "ok", None, health.last_seen, f"answered {_when(health.last_seen)}")


def _data_dir_check(data_dir: Path) -> Check:
    name = f"heygem data_dir {data_dir}"
    if not data_dir.is_dir():
        return Check(name, False, f"{data_dir} does not exist",
                     "point engines.heygem.data_dir (or the service's data_dir) at the folder mounted as /code/data "
                     "(~/heygem_data/face2face or ~/duix_avatar_data/face2face)")
    temp = data_dir / "temp"
    target = temp if temp.is_dir() else data_dir
    if not os.access(target, os.W_OK | os.X_OK):
        return Check(name, False, f"{target} is not writable by this user",
                     "give the daemon's user write access (e.g. a shared group) to the folder")
    return Check(name, True, f"{data_dir} is writable")


def _service_check(url: str, timeout: float) -> Check:
    client = HeygemClient(url, timeout)
    why = unanswered(client)
    if why:
        return Check(f"heygem service {client.shown}", False, why,
                     "start it (docker compose up -d) or fix engines.heygem.services")
    return Check(f"heygem service {client.shown}", True, "answers queries")
