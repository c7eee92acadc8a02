"""The daemon's side of the Celery app on Redis: every call the remote dispatcher makes to the broker, and
whether the broker answers (an outage while it does not).

The daemon keeps only Celery ids, never an `AsyncResult`: one would subscribe to the task's result channel,
which the daemon never reads, and every heartbeat published there piles up until Redis drops the connection
(client-output-buffer-limit pubsub).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from redis.exceptions import AuthenticationError
from redis.exceptions import TimeoutError as RedisTimeout

from heygem_daemon.config import Remote
from heygem_daemon.failures import Kind
from heygem_daemon.generation.celery_app import TASK_NAME, broker_name, drop_fence, fence_key, make_app, set_fence
from heygem_daemon.generation.remote_setup import WorkerEntry, live_workers
from heygem_daemon.generation.workers import Attempt
from heygem_daemon.log import get_logger

log = get_logger("heygem.remote")
UNACKED_KEY = "unacked"
"""Where kombu's Redis transport keeps the messages workers hold (late acks): [message, exchange, key]."""


@dataclass(frozen=True)
class Reading:
    """One poll of the result backend."""

    states: dict[str, dict[str, Any]]
    """Celery id -> its task's meta (status, result); a task Redis knows nothing of is absent."""
    unfenced: set[str]
    """The Celery ids asked about whose fence Redis does not hold."""


class CeleryBroker:
    def __init__(self, remote: Remote) -> None:
        self.remote, self.name = remote, broker_name(remote)
        self.app = make_app(remote, sender=True)
        self.down_since: float | None = None
        self.why = ""
        """What the broker's last failure was, in words."""
        self.wedged = False
        """The last failure was a Redis that accepts but does not answer: a send would wait as long."""

    def read(self, celery_ids: list[str], fenced: list[tuple[int, str]]) -> Reading | None:
        """The meta of every Celery id and the fences of `fenced` (task id, Celery id), in one MGET; None
        when Redis cannot be reached."""
        backend = self.app.backend
        try:
            values = backend.mget([backend.get_key_for_task(celery_id) for celery_id in celery_ids]
                                  + [fence_key(task_id) for task_id, _ in fenced])
        except Exception as exc:  # the backend (Redis) is away: renders go on; no stall is counted
            self.away(exc)
            return None
        self.back()
        states = {celery_id: backend.decode_result(value) for celery_id, value in zip(celery_ids, values) if value}
        return Reading(states, {celery_id for (_, celery_id), value in zip(fenced, values[len(celery_ids):])
                                if value is None})

    def held(self, queues: Iterable[str]) -> set[str] | None:
        """Celery ids of the tasks Redis holds: waiting in `queues`, or taken by a worker and not yet
        acknowledged (kombu's Redis transport layout). None when Redis cannot be asked."""
        client = self.app.backend.client
        try:
            waiting = [raw for queue in queues for raw in client.lrange(queue, 0, -1)]
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

    def workers(self) -> list[WorkerEntry] | None:
        """The `heygem-daemon worker`s alive now, their queue and any set-up problem; None when Redis cannot
        be asked."""
        try:
            return live_workers(self.app.backend.client)
        except Exception as exc:
            log.warning("cannot read the remote workers' entries", error=str(exc))
            return None

    def send(self, queue: str, payload: dict[str, Any], celery_id: str) -> None:
        """Raises what kombu and Redis raise when the broker cannot take it."""
        # The sender's backend subscribes to no result channel (celery_app.PollingRedisBackend; see the top).
        self.app.send_task(TASK_NAME, args=[payload], queue=queue, task_id=celery_id)

    def revoke(self, celery_id: str) -> None:
        try:
            self.app.control.revoke(celery_id, terminate=True, signal="SIGKILL")
        except Exception as exc:
            log.warning("cannot revoke a remote task", celery_id=celery_id, error=str(exc))

    def set_fence(self, task_id: int, celery_id: str) -> None:
        """This attempt, and no other, may complete the upload to the task's key. It lives twice the visibility
        timeout, which the longest render stays under. Raises what Redis raises."""
        set_fence(self.app.backend.client, task_id, celery_id, 2 * self.remote.visibility_timeout_seconds)

    def drop_fence(self, task_id: int, celery_id: str) -> None:
        """The attempt is over: a worker still running it aborts its upload instead of completing it."""
        try:
            drop_fence(self.app.backend.client, task_id, celery_id)
        except Exception as exc:  # Redis away: the next attempt's send replaces the fence; else it expires
            log.warning("cannot drop a remote attempt's fence", celery_id=celery_id, error=str(exc))

    # --- up or down ---

    def away(self, exc: Exception) -> None:
        self.wedged, self.why = isinstance(exc, RedisTimeout), broker_error(exc)
        if self.down_since is None:
            self.down_since = time.time()
            log.error("task broker unreachable; remote tasks wait", broker=self.name, error=self.why)

    def back(self) -> None:
        self.wedged = False
        if self.down_since is not None:
            log.info("task broker reachable again", broker=self.name,
                     down_seconds=round(time.time() - self.down_since, 1))
            self.down_since = None

    def unreachable(self, exc: Exception) -> Attempt:
        """A send the broker did not take: the task waits, no attempt used."""
        return Attempt(False, f"cannot reach the {self.name}: {broker_error(exc)}", "start Redis (systemctl start "
                       "redis-server) or fix workers.remote.broker_url (its password: Redis's requirepass); the "
                       "task waits and is sent again by itself", Kind.OUTAGE, dependency=self.name)

    def outages(self, tasks: int) -> list[dict[str, Any]]:
        """For OutageWatch: the broker away, with the `tasks` in flight that wait for it."""
        return [] if self.down_since is None else [
            {"dependency": self.name, "since": self.down_since, "tasks": tasks,
             "reason": f"cannot reach Redis: {self.why}"}]


def broker_error(exc: BaseException) -> str:
    """A broker failure in words. Celery and kombu wrap Redis's own error (a refused password comes out as
    "Retry limit exceeded ... must be restarted"): the cause that says what to fix is looked for."""
    seen: BaseException | None = exc
    while seen is not None:
        text = str(seen)
        if isinstance(seen, AuthenticationError) or any(m in text for m in ("WRONGPASS", "NOAUTH", "invalid password")):
            return f"Redis refuses the password in workers.remote.broker_url ({text})"
        seen = seen.__cause__ or seen.__context__
    return str(exc)
