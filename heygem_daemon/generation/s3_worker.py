"""`workers.remote.transfer: s3`, the worker's side: a task that shares no folder with the daemon.

In a scratch folder of its own (`work/remote/<celery task id>/`) the worker downloads the inputs from their
presigned links (plain HTTPS GET: it needs no read access to the bucket), renders, and uploads the video with
the resumable multipart Uploader straight to the key the daemon fixed for the task. Its own SQLite store
(state/ under the worker's base_dir) records the parts, so a task redelivered to this host after a crash
resumes the upload. Just before the object would appear, the fence in Redis must still name this attempt;
otherwise the upload is aborted (the daemon gave this attempt up and another one owns the key). An object store
away during the upload keeps the finished render: the upload is tried again with backoff (resuming its parts)
until just before the task's time limit. The scratch folder and any upload it began go when the attempt ends:
at its end, when it is revoked (`discard_scratch`), or, for an attempt that died with its host, once its fence
is gone (`sweep_ended`, at the worker's start and before each task).
A payload comes through Redis: the worker fetches only http(s) links to its own object store and uploads only
under the static part of its s3.key_prefix (`check_payload`); one that does not match is this worker's set-up
problem (remote_setup.py), not the task's.
"""

from __future__ import annotations

import dataclasses
import http.client
import os
import shutil
import threading
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator
from urllib.parse import urlsplit

from botocore.client import BaseClient
from botocore.exceptions import BotoCoreError, ClientError

from heygem_daemon.config import Config
from heygem_daemon.delivery.names import static_prefix
from heygem_daemon.delivery.s3 import (
    MiB, Superseded, Throttle, Uploaded, Uploader, abort_quietly, describe, make_client, object_store_name,
)
from heygem_daemon.failures import Kind, backoff_delay
from heygem_daemon.generation.celery_app import INPUT_FIELDS, broker_name, decode, fence_holds
from heygem_daemon.generation.remote_setup import SetupProblem
from heygem_daemon.generation.workers import crash_error, run_engine
from heygem_daemon.log import get_logger
from heygem_daemon.state import Store, db_path

log = get_logger("heygem.remote_worker")
SCRATCH = "remote"
BATCH = "remote-worker"
"""The one batch of the worker's store: its rows only serve resuming uploads."""


class TaskFailed(Exception):
    """The task ends with this outcome (kind, reason, hint, dependency), as `run_engine` reports one."""

    def __init__(self, kind: Kind, reason: str, hint: str, dependency: str = "") -> None:
        super().__init__(reason)
        self.outcome = {"ok": False, "kind": kind.value, "reason": reason, "hint": hint, "dependency": dependency}


class S3Side:
    """What one pool child keeps for s3 tasks: the S3 client and the store, made on first use (after fork)."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.work = cfg.folder("work") / SCRATCH
        assert cfg.workers.remote is not None
        self.scratch_seconds = 2 * cfg.workers.remote.visibility_timeout_seconds
        self.broker = broker_name(cfg.workers.remote)
        self._client: BaseClient | None = None
        self._store: Store | None = None

    def client(self) -> BaseClient:
        if not self.cfg.s3.enabled:
            raise SetupProblem("this worker host has no s3 section, but the daemon sends tasks with "
                               "workers.remote.transfer: s3", "give the worker's config the daemon's s3 section "
                               "(bucket, endpoint_url, key_prefix) and credentials")
        if self._client is None:
            self._client = make_client(self.cfg.s3)
        return self._client

    def store(self) -> Store:
        if self._store is None:
            state = self.cfg.folder("state")  # a worker's config is loaded without making folders
            state.mkdir(parents=True, exist_ok=True)
            self._store = Store(db_path(state))
        return self._store


def generate_s3(side: S3Side, task: Any, payload: dict[str, Any], engines: dict[str, Any],
                engine_settings: dict[str, dict[str, Any]], device: str, beats: Any,
                fence: Callable[[], bool], deadline: float) -> dict[str, Any]:
    """One task with transfer s3: {ok, key, etag, sha256, size}, or {ok: False, kind, reason, hint, dependency}.
    Raises SetupProblem when this worker cannot do it (its endpoint, key prefix or credentials are wrong).
    `deadline` (monotonic): an upload the object store does not take is tried again until then."""
    scratch = side.work / _safe_name(task.request.id)
    sweep_ended(side, task.app.backend.client)
    video = scratch / "video.mp4"
    try:
        check_payload(side, payload)  # a worker that cannot upload, or will not, says so before it renders
        if not video.is_file():  # else: rendered before this worker died; only the upload is left
            spec = decode(payload["spec"], device)
            inputs = {name: scratch / "in" / getattr(spec, name).name for name in INPUT_FIELDS}
            with _beating(beats):
                for name, dest in inputs.items():
                    fetch_input(payload["links"][name], dest, side.cfg.s3.read_timeout)
            writing = scratch / f"video.{os.getpid()}.writing.part"
            (scratch / "task").mkdir(parents=True, exist_ok=True)
            # No shared work/ here: a script is spoken into the task's own scratch folder.
            speech = spec.speech and dataclasses.replace(spec.speech, cache=scratch / "speech")
            outcome = run_engine(engines, engine_settings, payload["engine"], dataclasses.replace(
                spec, output=writing, workdir=scratch / "task", speech=speech, **inputs), beats)
            if outcome[0] == "error":
                _, kind, reason, hint, dependency = outcome
                return {"ok": False, "kind": kind, "reason": reason, "hint": hint, "dependency": dependency}
            os.replace(writing, video)
        with _beating(beats):
            up = upload_result(side, video, payload["object"]["key"], payload["object"]["name"], fence, deadline)
        return {"ok": True, "key": payload["object"]["key"], "etag": up.etag, "sha256": up.sha256,
                "size": video.stat().st_size}
    except TaskFailed as failed:
        return failed.outcome
    except SetupProblem:
        raise  # this worker's problem, not the task's: the caller quarantines it
    except Superseded:
        log.warning("upload aborted: the fence no longer names this attempt", celery_id=task.request.id)
        # The daemon tells the two cases apart: an attempt it gave up on, or its current one whose fence was
        # lost (Redis's data, an expiry), which it sends again without counting it.
        return {"ok": False, "kind": Kind.INTERNAL.value, "superseded": True,
                "reason": "the fence in Redis no longer names this attempt (given up by the daemon, or lost) "
                          "before its upload completed; the upload was aborted",
                "hint": "the daemon discards it, or sends the task again if the attempt is still its current one"}
    except Exception as exc:  # a full scratch disk is an outage; anything else a counted engine fault
        _, kind, reason, hint, dependency = crash_error(exc)
        return {"ok": False, "kind": kind, "reason": reason, "hint": hint, "dependency": dependency}
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def check_payload(side: S3Side, payload: dict[str, Any]) -> None:
    """Refuse (SetupProblem) a task whose links lead anywhere but this worker's object store, or whose key
    lies outside its key prefix: whoever can write into Redis must not make a worker read its own files
    (file://), reach other hosts (an instance metadata service) or overwrite other objects in the bucket."""
    client = side.client()
    endpoint = urlsplit(client.meta.endpoint_url)
    store = object_store_name(client.meta.endpoint_url)
    hosts = {(endpoint.hostname or "").lower(), f"{side.cfg.s3.bucket}.{endpoint.hostname}".lower()}
    for name, link in payload["links"].items():
        url = urlsplit(link)
        if url.scheme not in ("http", "https") or (url.hostname or "").lower() not in hosts or (
                _port(url) != _port(endpoint)):
            raise SetupProblem(f"the link to input {name} ({url.scheme}://{url.hostname or ''}) is not this "
                               f"worker's {store}: refused", "a worker fetches inputs only over http(s) from its "
                               "s3.endpoint_url (AWS's endpoint for s3.region when unset): give it the daemon's "
                               "s3 endpoint; if they match, something else wrote this task into Redis")
    prefix = static_prefix(side.cfg.s3.key_prefix)
    key = payload["object"]["key"]
    if not key.startswith(prefix) or ".." in key.split("/"):
        raise SetupProblem(f"the video's key {key!r} is outside this worker's key prefix {prefix!r}: refused",
                           "give the worker the daemon's s3.key_prefix; if they match, something else wrote this "
                           "task into Redis")


def _port(url: Any) -> int | None:
    return url.port or {"http": 80, "https": 443}.get(url.scheme)


def fetch_input(link: str, dest: Path, timeout: float) -> None:
    """GET a presigned link into `dest` (written under a temporary name, renamed when complete)."""
    where = object_store_name(link)
    partial = dest.with_name(f".{dest.name}.{os.getpid()}.part")
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        with urllib.request.urlopen(link, timeout=timeout) as resp, open(partial, "wb") as out:  # noqa: S310
            shutil.copyfileobj(resp, out, MiB)
    except urllib.error.HTTPError as exc:
        partial.unlink(missing_ok=True)
        if exc.code >= 500:
            raise TaskFailed(Kind.OUTAGE, f"the {where} answered {exc.code} for input {dest.name}",
                             "the object store is struggling; the task waits and runs again", where) from exc
        raise TaskFailed(Kind.INTERNAL, f"the link to input {dest.name} was refused ({exc.code} {exc.reason})",
                         "input links live workers.remote.visibility_timeout_seconds (at most 7 days): the task "
                         "waited longer in the queue, this host's clock is off (timedatectl), or the staged input "
                         "was deleted; the task is sent again with fresh links") from exc
    except (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError) as exc:
        partial.unlink(missing_ok=True)
        raise TaskFailed(Kind.OUTAGE, f"cannot download input {dest.name} from the {where}: "
                         f"{getattr(exc, 'reason', exc)}", "network or object store down between this worker "
                         "and the bucket; the task waits and runs again", where) from exc
    os.replace(partial, dest)


def upload_result(side: S3Side, video: Path, key: str, name: str, fence: Callable[[], bool],
                  deadline: float) -> Uploaded:
    """Upload `video` to `key` with the resumable Uploader. An object store that does not answer (or answers
    5xx) is waited out with backoff until `deadline` (monotonic), the parts it holds kept: the render is not
    thrown away for a blink. Raises TaskFailed (an outage past the deadline), SetupProblem (this worker's
    credentials, bucket or region refused) or Superseded."""
    client, store = side.client(), side.store()
    s3 = side.cfg.s3
    batch = store.deliveries.ensure_batch(BATCH, BATCH, "", None)
    d = store.deliveries.at(str(video)) or store.deliveries.add(batch.id, str(video), name,
                                                                 video.stat().st_size, key, None)
    assert d is not None
    uploader = Uploader(client, s3, store, Throttle(s3.max_bandwidth_mb_s), threading.Event())
    tries = 0
    try:
        while True:
            try:
                up = uploader.upload(store.deliveries.get(d.id), fence)
                break
            except (BotoCoreError, ClientError) as exc:
                failure, tries = describe(exc, s3.bucket), tries + 1
                left = deadline - time.monotonic()
                if not failure.retryable:
                    raise SetupProblem(f"cannot upload the video: {failure.reason}", failure.hint) from exc
                if left <= 0:
                    raise TaskFailed(Kind.OUTAGE, f"cannot upload the video: {failure.reason}", failure.hint,
                                     object_store_name(client.meta.endpoint_url)) from exc
                if tries == 1:
                    log.warning("the object store does not take the finished video; the upload waits for it",
                                key=key, reason=failure.reason)
                time.sleep(min(left, backoff_delay(tries, s3.retry_seconds, s3.retry_max_seconds)))
    except BaseException:
        _abandon(client, s3.bucket, store, d.id)
        raise
    if tries:
        log.info("video uploaded once the object store was back", key=key, tries=tries)
    store.deliveries.forget(d.id)
    log.info("video uploaded to its final key", key=key, size=video.stat().st_size, sent=up.sent_bytes)
    return up


def _abandon(client: BaseClient, bucket: str, store: Store, delivery_id: int) -> None:
    """The scratch folder goes with the task: its upload cannot be resumed, so it is aborted and forgotten."""
    d = store.deliveries.get(delivery_id)
    if d.upload_id:
        abort_quietly(client, bucket, d.key, d.upload_id)
    store.deliveries.forget(delivery_id)


@contextmanager
def _beating(beats: Any) -> Iterator[None]:
    """Heartbeats while a download or an upload runs (they report no progress of their own)."""
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(beats.every):
            beats.heartbeat(force=True)

    thread = threading.Thread(target=beat, name="transfer-beats", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def _safe_name(celery_id: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in celery_id) or "task"


def discard_scratch(side: S3Side, celery_id: str) -> None:
    """The attempt is over without finishing here (revoked, killed, its fence gone): its scratch folder goes and
    the multipart upload it began is aborted. Never raises: a leftover is swept again later."""
    scratch = side.work / _safe_name(celery_id)
    try:
        if side.cfg.s3.enabled:
            store = side.store()
            d = store.deliveries.at(str(scratch / "video.mp4"))
            if d is not None:
                _abandon(side.client(), side.cfg.s3.bucket, store, d.id)
    except Exception as exc:
        log.warning("cannot abort an ended attempt's upload", celery_id=celery_id, error=str(exc))
    shutil.rmtree(scratch, ignore_errors=True)


def sweep_ended(side: S3Side, redis: Any) -> None:
    """Scratch folders of attempts that ended without this worker (it was killed or stopped meanwhile): the
    fence no longer names them. One whose name tells no task goes once older than any redelivery could come.
    Redis away: kept for the next sweep."""
    if not side.work.is_dir():
        return
    cutoff = time.time() - side.scratch_seconds
    for folder in side.work.iterdir():
        parts = folder.name.split("-")
        try:
            if len(parts) == 4 and parts[0] == "heygem" and parts[1].isdigit():
                ended = not fence_holds(redis, int(parts[1]), folder.name)
            else:
                ended = folder.stat().st_mtime < cutoff
        except Exception as exc:
            log.warning("cannot tell whether a scratch folder's attempt has ended", folder=str(folder),
                        error=str(exc))
            return
        if ended:
            log.info("scratch folder of an ended attempt removed", folder=folder.name)
            discard_scratch(side, folder.name)

