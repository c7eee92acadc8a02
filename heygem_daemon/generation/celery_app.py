"""What the daemon and `heygem-daemon worker` agree on: the Celery app's settings and a task's payload.

A task travels as JSON: the engine's name, the attempt number (a late result of an attempt the daemon
gave up on is recognised by it) and the `TaskSpec` with its paths as the worker's host sees them.
With `transfer: s3` it also carries `links` (a presigned GET link per input field) and `object` (the key the
worker uploads the video to, and its name); the spec's paths are then the daemon's, replaced on the worker.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from celery import Celery
from celery.backends.redis import RedisBackend

from heygem_daemon.config import Preset, Remote
from heygem_daemon.engines.base import SpeechSpec, TaskSpec

TASK_NAME = "heygem.generate"
RESULT_DAYS = 7
"""How long a task's result stays in Redis: a daemon stopped for less finds what its renders did."""
SENDER_CONNECT_SECONDS = 5.0
SENDER_ANSWER_SECONDS = 10.0
"""How long the daemon waits for Redis to accept, then to answer, before calling it away."""
PATH_FIELDS = ("audio", "portrait", "output", "workdir")
INPUT_FIELDS = ("audio", "portrait")
"""The spec's input files: with transfer s3 each travels as a presigned link."""
# Redis key naming the Celery task id of a task's current attempt (transfer s3): a worker completes its upload
# only while it still names its own attempt, so an attempt the daemon gave up on never overwrites the object.
FENCE_KEY = "heygem:current:{task_id}"
# Compare-and-delete: the daemon drops the fence of an attempt it ends, never a newer attempt's.
_DROP_IF_MINE = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end return 0"


def render_time_limit(remote: Remote) -> float:
    """A render is killed before Redis would hand its unacknowledged task to a second worker: the visibility
    timeout less a margin (5 %, at least a minute) for the wait between delivery and start."""
    visibility = remote.visibility_timeout_seconds
    return max(visibility - max(60.0, 0.05 * visibility), 0.5 * visibility)


class PollingRedisBackend(RedisBackend):
    """The daemon's result backend. It reads task states by polling (one MGET, remote_broker.py) and never
    subscribes to a task's result channel: unread heartbeats would pile up there until Redis drops the
    connection, and Celery's own unsubscribe, left for the next send, could keep one channel open."""

    def on_task_call(self, producer: Any, task_id: str) -> None:
        return None


SENDER_BACKEND = f"{__name__}:{PollingRedisBackend.__name__}"


def make_app(remote: Remote, sender: bool = False) -> Celery:
    """Late acks and prefetch 1: a task leaves Redis only once it is done, and a worker holds no more
    than it runs. A host that dies leaves its task unacknowledged: the daemon notices the silence, revokes it
    and sends it again. A pool child that dies (a crash in the engine) fails its task (WorkerLostError), a
    counted attempt as for a crashed local worker: requeued by Celery it could loop for ever on one bad
    input. The daemon (`sender`) gives up connecting at once: a broker away is an outage it waits out, not
    a stall of its loop."""
    # `class+url`: Celery's form for a backend class of one's own on a standard URL.
    backend_url = f"{SENDER_BACKEND}+{remote.broker_url}" if sender else remote.broker_url
    app = Celery("heygem", broker=remote.broker_url, backend=backend_url, set_as_current=False)
    transport: dict[str, Any] = {"visibility_timeout": remote.visibility_timeout_seconds}
    backend = dict(transport)
    timeouts: dict[str, Any] = {}
    if sender:
        transport.update(max_retries=1, interval_start=0, interval_step=0.2, interval_max=0.2,
                         socket_connect_timeout=SENDER_CONNECT_SECONDS, socket_timeout=SENDER_ANSWER_SECONDS)
        backend["retry_policy"] = {"max_retries": 1, "interval_start": 0, "interval_step": 0.2, "interval_max": 0.2}
        # A Redis that accepts but does not answer (stopped, swapping, a dropped route) must not hold the
        # dispatch loop for redis-py's default two minutes: it is an outage like a refused connection.
        timeouts = {"redis_socket_connect_timeout": SENDER_CONNECT_SECONDS,
                    "redis_socket_timeout": SENDER_ANSWER_SECONDS}
    app.conf.update(
        task_serializer="json", result_serializer="json", accept_content=["json"],
        task_acks_late=True, task_reject_on_worker_lost=False, worker_prefetch_multiplier=1,
        task_track_started=True, result_expires=RESULT_DAYS * 24 * 3600, task_time_limit=render_time_limit(remote),
        broker_transport_options=transport, result_backend_transport_options=backend,
        broker_connection_retry_on_startup=True, broker_connection_max_retries=None,
        # A send that cannot reach Redis fails fast: the daemon turns it into an outage and waits.
        task_publish_retry_policy={"max_retries": 1, "interval_start": 0.2, "interval_step": 0.2},
        worker_hijack_root_logger=False, worker_send_task_events=False, **timeouts,
    )
    return app


def broker_name(remote: Remote) -> str:
    """The broker as an outage names it: host and port, never a password from the URL."""
    url = urlsplit(remote.broker_url)
    return f"task broker {url.hostname or url.path}" + (f":{url.port}" if url.port else "")


def map_path(path: Path, path_map: dict[str, str]) -> Path:
    """The daemon's path as the worker mounts it (the longest matching prefix wins)."""
    text = str(path)
    for prefix in sorted(path_map, key=len, reverse=True):
        root = prefix.rstrip("/")
        if text == root or text.startswith(root + "/"):
            return Path(path_map[prefix].rstrip("/") + text[len(root):])
    return path


def encode(spec: TaskSpec, path_map: dict[str, str]) -> dict[str, Any]:
    out = {f.name: getattr(spec, f.name) for f in dataclasses.fields(spec)}
    for name in PATH_FIELDS:
        out[name] = str(map_path(out[name], path_map))
    out["preset"] = spec.preset.model_dump()
    out["store"] = None  # the daemon's SQLite file is not shared with other hosts
    if spec.speech is not None:  # the speech cache is in the shared work/
        out["speech"] = {**dataclasses.asdict(spec.speech), "cache": str(map_path(spec.speech.cache, path_map))}
    return out


def decode(data: dict[str, Any], device: str) -> TaskSpec:
    fields = {**data, "preset": Preset.model_validate(data["preset"]), "device": device}
    for name in PATH_FIELDS:
        fields[name] = Path(fields[name])
    if data.get("speech"):
        fields["speech"] = SpeechSpec(**{**data["speech"], "cache": Path(data["speech"]["cache"])})
    return TaskSpec(**fields)


def attempt_part(output: str, attempt: int) -> Path:
    """Each attempt writes its own `.part`: one that outlives its attempt can never be taken for another's."""
    return Path(f"{output}.{attempt}.part")


def fence_key(task_id: int) -> str:
    return FENCE_KEY.format(task_id=task_id)


def set_fence(client: Any, task_id: int, celery_id: str, ttl_seconds: float) -> None:
    """This attempt is the task's current one (set before it is sent; it outlives the longest render)."""
    client.set(fence_key(task_id), celery_id, ex=max(1, int(ttl_seconds)))


def drop_fence(client: Any, task_id: int, celery_id: str) -> None:
    """The attempt is over (done, given up, stopped): its worker may no longer complete an upload."""
    client.eval(_DROP_IF_MINE, 1, fence_key(task_id), celery_id)


def fence_holds(client: Any, task_id: int, celery_id: str) -> bool:
    value = client.get(fence_key(task_id))
    return value is not None and (value.decode() if isinstance(value, bytes) else value) == celery_id


@functools.cache
def _tools_app() -> Celery:
    from heygem_daemon.cli import default_config_path
    from heygem_daemon.config import ConfigError, load_config

    path = default_config_path()
    remote = load_config(path, prepare=False).workers.remote
    if remote is None:
        raise ConfigError(f"{path or 'the embedded defaults'}: workers.remote is not set; set HEYGEM_CONFIG to "
                          "the config of the daemon or of a worker")
    return make_app(remote, sender=True)


def __getattr__(name: str) -> Any:
    """`app`, for Celery's own tools: `celery -A heygem_daemon.generation.celery_app inspect ping` (or `flower`)
    finds the app of the config $HEYGEM_CONFIG (else ./config.yaml) names, built when first asked for."""
    if name == "app":
        return _tools_app()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
