"""The `heygem` engine: drives HeyGem's GPU video service (one or more, one per GPU) over HTTP.

Inputs go into the folder the service's container sees as /code/data, a job is submitted under a fresh
code, polled until it ends, and the result is checked and moved into outputs. Protocol quirks are
handled here: busy services are waited for (never a failure), a stalled job fails the attempt, and
the terminal answer is taken the first time it is seen because the service forgets the task then."""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path
from typing import ClassVar
from urllib.parse import urlsplit

from pydantic import Field, field_validator

from heygem_daemon.ops.checks import Check
from heygem_daemon.engines.base import BadInputError, EngineError, EngineSettings, ProgressFn, TaskSpec
from heygem_daemon.engines.heygem.client import (
    FAILED, SUCCEEDED, HeygemClient, ServiceBusy, ServiceUnreachable, TaskState,
)
from heygem_daemon.engines.heygem.exchange import Exchange, audio_seconds
from heygem_daemon.engines.heygem.pool import ServicePool
from heygem_daemon.fs.ops import move
from heygem_daemon.media.audio import load_clip
from heygem_daemon.media.errors import MediaError
from heygem_daemon.media.verify import add_audio, inspect_mp4

LOCK_DIR = ".heygem-daemon-locks"
# Share of the progress bar: staging the inputs, then the service's own 0..100, then delivery.
_STAGED, _SERVICE_SHARE = 0.05, 0.9
# A poll that gets no answer is tolerated this many times in a row (a restart of a proxy, a blip).
_UNANSWERED_POLLS = 3


def _check_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{url!r} is not an http(s) URL; use e.g. http://127.0.0.1:8383")
    return url.rstrip("/")


class HeygemEngine:
    name: ClassVar[str] = "heygem"
    # The service needs a visible face too: refusing faceless portraits at intake saves GPU time.
    needs_face: ClassVar[bool] = True

    class Settings(EngineSettings):
        services: list[str] = Field(["http://127.0.0.1:8383"], min_length=1,
                                    description="base URLs, one per GPU; each runs one job at a time")
        data_dir: Path = Field(description="host folder mounted as the container's /code/data")
        poll_interval: float = Field(2.0, gt=0.0)
        stall_seconds: float = Field(600.0, gt=0.0, description="progress unchanged this long fails the attempt")
        request_timeout: float = Field(10.0, gt=0.0)
        busy_retry_interval: float = Field(5.0, gt=0.0, description="wait before asking a busy service again")
        chaofen: bool = Field(False, description="the service's super-resolution pass")
        watermark: bool = False

        @field_validator("services")
        @classmethod
        def _urls(cls, urls: list[str]) -> list[str]:
            checked = [_check_url(u) for u in urls]
            if len(set(checked)) != len(checked):
                raise ValueError("a service is listed twice; list each one once")
            return checked

        @field_validator("data_dir")
        @classmethod
        def _absolute(cls, path: Path) -> Path:
            path = path.expanduser()
            if not path.is_absolute():
                raise ValueError(f"{path} is relative; give the absolute host folder mounted as /code/data")
            return path

    def __init__(self, settings: HeygemEngine.Settings) -> None:
        self.settings = settings
        self.temp = settings.data_dir / "temp"
        self.pool = ServicePool(settings.services, settings.data_dir / LOCK_DIR)
        self.clients = {url: HeygemClient(url, settings.request_timeout) for url in settings.services}

    def generate(self, task: TaskSpec, progress: ProgressFn) -> Path:
        if not self.settings.data_dir.is_dir():
            raise EngineError(f"heygem data_dir {self.settings.data_dir} does not exist",
                              "mount it or fix engines.heygem.data_dir; the task will be retried")
        self.temp.mkdir(exist_ok=True)
        code = str(uuid.uuid4())
        exchange = Exchange(self.temp, code, task.workdir)
        exchange.open()
        try:
            audio, video = self._stage(task, exchange)
            progress(_STAGED)
            result = self._run(task, exchange, audio, video, progress)
            self._deliver(result, task)
        finally:
            exchange.close()
        progress(1.0)
        return task.output

    def _stage(self, task: TaskSpec, exchange: Exchange) -> tuple[str, str]:
        try:
            seconds = audio_seconds(task.audio)
            video = exchange.avatar(task.portrait, seconds, task.preset, task.x264_preset)
        except MediaError as exc:
            raise BadInputError(exc.reason, exc.hint) from None
        return exchange.place(task.audio, "audio"), video

    def _run(self, task: TaskSpec, exchange: Exchange, audio: str, video: str, progress: ProgressFn) -> Path:
        """Submit to a free service, waiting while all are busy, and follow the job to its end there."""
        resting: dict[str, float] = {}
        down: dict[str, ServiceUnreachable] = {}
        while True:
            now = time.monotonic()
            skip = {url for url, until in resting.items() if until > now} | set(down)
            lease = self.pool.try_acquire(task.task_id, skip)
            if lease is None:
                progress(_STAGED)  # heartbeat: waiting for a service is not a stall
                time.sleep(self.settings.busy_retry_interval)
                continue
            with lease:
                client = self.clients[lease.url]
                try:
                    client.submit(exchange.code, audio, video, self.settings.chaofen, self.settings.watermark)
                except ServiceBusy:
                    resting[lease.url] = now + self.settings.busy_retry_interval
                    continue
                except ServiceUnreachable as exc:
                    down[lease.url] = exc
                    if len(down) == len(self.clients):
                        raise
                    continue
                return self._follow(client, exchange, progress)

    def _follow(self, client: HeygemClient, exchange: Exchange, progress: ProgressFn) -> Path:
        last, changed = -1.0, time.monotonic()
        unanswered = 0
        while True:
            time.sleep(self.settings.poll_interval)
            try:
                state = client.query(exchange.code)
            except ServiceUnreachable:
                unanswered += 1
                if unanswered >= _UNANSWERED_POLLS:
                    raise
                continue
            unanswered = 0
            if state is None or state.status == SUCCEEDED:
                return self._finished(client, exchange, state)
            if state.status == FAILED:
                raise EngineError(f"heygem service at {client.shown} failed: {state.msg or 'no reason given'}",
                                  "see the container's log (docker logs heygem-gen-video); the task will be retried")
            now = time.monotonic()
            if state.progress != last:
                last, changed = state.progress, now
            elif now - changed > self.settings.stall_seconds:
                raise EngineError(
                    f"heygem service at {client.shown} stalled at {state.progress:g}% for "
                    f"{self.settings.stall_seconds:g} s",
                    "the task will be retried; restart the HeyGem container if this keeps happening")
            progress(_STAGED + _SERVICE_SHARE * min(1.0, max(0.0, state.progress / 100)))

    def _finished(self, client: HeygemClient, exchange: Exchange, state: TaskState | None) -> Path:
        result = exchange.result(state.result if state else "")
        # 10004 before we saw the end: if the answer was lost on the way, the result file is still there.
        if state is None and not result.is_file():
            raise EngineError(f"heygem service at {client.shown} no longer knows task {exchange.code}",
                              "the service was probably restarted; the task will be retried")
        if not result.is_file():
            raise EngineError(f"heygem service at {client.shown} reported success but {result} does not exist",
                              "engines.heygem.data_dir must be the host folder mounted as /code/data")
        return result

    def _deliver(self, result: Path, task: TaskSpec) -> None:
        try:
            facts = inspect_mp4(result)
        except MediaError as exc:
            raise EngineError(f"heygem result unusable: {exc.reason}", "the task will be retried") from None
        if not facts.has_video:
            raise EngineError(f"heygem result {result.name} has no decodable video", "the task will be retried")
        task.output.unlink(missing_ok=True)
        if facts.has_audio:
            move(result, task.output)
            return
        try:
            add_audio(result, load_clip(task.audio), task.output, task.preset.audio_bitrate)
        except MediaError as exc:
            raise EngineError(exc.reason, exc.hint) from None

    @classmethod
    def doctor(cls, settings: HeygemEngine.Settings, devices: list[str]) -> list[Check]:
        return [_data_dir_check(settings.data_dir)] + [
            _service_check(url, settings.request_timeout) for url in settings.services]


def _data_dir_check(data_dir: Path) -> Check:
    name = "heygem data_dir"
    if not data_dir.is_dir():
        return Check(name, False, f"{data_dir} does not exist",
                     "point engines.heygem.data_dir at the folder mounted as /code/data (~/heygem_data/face2face)")
    temp = data_dir / "temp"
    target = temp if temp.is_dir() else data_dir
    if not os.access(target, os.W_OK | os.X_OK):
        return Check(name, False, f"{target} is not writable by this user",
                     "give the daemon's user write access (e.g. a shared group) to the folder")
    return Check(name, True, f"{data_dir} is writable")


def _service_check(url: str, timeout: float) -> Check:
    client = HeygemClient(url, timeout)
    try:
        client.query(f"heygem-daemon-doctor-{uuid.uuid4()}")
    except EngineError as exc:
        return Check(f"heygem service {client.shown}", False, exc.reason,
                     "start it (docker compose up -d) or fix engines.heygem.services")
    return Check(f"heygem service {client.shown}", True, "answers queries")
