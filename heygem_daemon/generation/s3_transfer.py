"""`workers.remote.transfer: s3`, the daemon's side: no folder shared with the worker hosts.

At send, the task's inputs are staged once per job under `<prefix>.remote-inputs/<installation>/<job id>/`
(`installation_id`: daemons sharing a bucket and key prefix never touch each other's) and travel as
presigned GET links; the video's final key is fixed once per task (stored with the task), so every attempt
on any host uploads to the same key. When an attempt succeeds, the daemon downloads the object into the
attempt's part and records the video as already uploaded *before* the part is renamed into outputs/, so
delivery only links it. Staging and downloading run on the dispatcher's transfer threads (never its loop);
`stopping` leaves a transfer off between chunks (Stopping). A job's staged inputs are deleted once it has
finished (JobFinished, and its final state written), and once per start for every finished or forgotten job
whose inputs a crash left in this installation's staging folder.
"""

from __future__ import annotations

import errno
import hashlib
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from heygem_daemon.config import MAX_LINK_EXPIRY_HOURS, Config
from heygem_daemon.delivery.links import presign_get
from heygem_daemon.delivery.names import object_key, safe_relpath, static_prefix
from heygem_daemon.delivery.s3 import (
    Stopping, abort_stale_uploads, delete_object, delete_prefix, describe, download_file, gone, list_folders,
    make_client, object_size, object_store_name, put_file,
)
from heygem_daemon.engines.base import TaskSpec
from heygem_daemon.failures import Kind
from heygem_daemon.fs.files import sha256_file
from heygem_daemon.generation.celery_app import INPUT_FIELDS
from heygem_daemon.generation.lifecycle import JobFinished
from heygem_daemon.generation.workers import Attempt
from heygem_daemon.log import get_logger
from heygem_daemon.state import TERMINAL_JOB_STATES, Delivery, Job, Store, Task

log = get_logger("heygem.remote")
STAGING_FOLDER = ".remote-inputs"


def installation_id(state: Path) -> str:
    """This daemon among those that may share a bucket and key prefix: a short hash of its host and state
    folder, the same at every start. A daemon's sweeps delete only the staged inputs under its own."""
    return hashlib.sha256(f"{socket.gethostname()}:{state.resolve()}".encode()).hexdigest()[:12]


def link_seconds_for(visibility_timeout: float) -> int:
    """Input links live as long as Redis may hold a task before handing it out again (the longest a sent task
    waits and renders), never beyond the 7 days SigV4 allows."""
    return int(min(visibility_timeout, MAX_LINK_EXPIRY_HOURS * 3600))


class TransferTrouble(Exception):
    """The object store failed a step: the attempt waits (an outage) or fails, as `attempt` says."""

    def __init__(self, attempt: Attempt) -> None:
        super().__init__(attempt.reason)
        self.attempt = attempt


class S3Transfer:
    def __init__(self, cfg: Config, store: Store, stopping: threading.Event) -> None:
        assert cfg.workers.remote is not None and cfg.s3.enabled
        self.cfg, self.store, self.s3 = cfg, store, cfg.s3
        self.client, self.stopping = make_client(cfg.s3), stopping
        self.dependency = object_store_name(self.client.meta.endpoint_url)
        self.link_seconds = link_seconds_for(cfg.workers.remote.visibility_timeout_seconds)
        self.staging = f"{static_prefix(cfg.s3.key_prefix)}{STAGING_FOLDER}/{installation_id(cfg.folder('state'))}/"
        """This daemon's staging folder: one sub-folder per job."""
        self._staged: dict[str, dict[str, int]] = {}
        """job id -> staged key -> size, known to be in the bucket (saves a HEAD per input per task)."""
        self._staging: dict[str, threading.Lock] = {}
        """staged key -> its lock: two tasks of a job staged at once upload their shared input once."""
        self._staging_lock = threading.Lock()
        self._ended: set[str] | None = None
        """Jobs whose staged inputs are to go; None until the start's look for leftovers."""
        self._ended_lock = threading.Lock()  # JobFinished comes from whichever thread finished the job

    def staging_prefix(self, job_id: str) -> str:
        """Where a job's inputs (and the videos of an `upload: false` job) wait for the workers."""
        return f"{self.staging}{safe_relpath(job_id)}/"

    # --- at send ---

    def payload(self, task: Task, spec: TaskSpec) -> dict[str, Any]:
        """The `links` and `object` of a task's payload; raises TransferTrouble when the bucket fails, Stopping."""
        job = self.store.jobs.get(task.job_id)
        try:
            links = {name: self._link(job.id, getattr(spec, name)) for name in INPUT_FIELDS}
        except (BotoCoreError, ClientError) as exc:
            raise TransferTrouble(self._outage("cannot stage the task's inputs in the bucket", exc)) from exc
        return {"links": links, "object": {"key": self.final_key(task, job), "name": self._rel(task, job)}}

    def _link(self, job_id: str, path: Path) -> str:
        key = self.staging_prefix(job_id) + safe_relpath(path.name)
        size = path.stat().st_size
        with self._staging_lock:
            lock = self._staging.setdefault(key, threading.Lock())
        with lock:
            staged = self._staged.setdefault(job_id, {})
            if staged.get(key) != size and object_size(self.client, self.s3.bucket, key) != size:
                put_file(self.client, self.s3.bucket, key, path, self.stopping)
                log.info("remote input staged", job_id=job_id, key=key, size=size)
            staged[key] = size
        return presign_get(self.client, self.s3.bucket, key, path.name, self.link_seconds)

    def final_key(self, task: Task, job: Job) -> str:
        """Fixed at the first send, as delivery would name it; an `upload: false` job's video only passes
        through the job's staging folder (deleted with it)."""
        rel = self._rel(task, job)
        if job.spec.get("upload") is False:
            key = f"{self.staging_prefix(job.id)}out/{safe_relpath(rel)}"
        else:
            key = object_key(self.s3.key_prefix, job.name, rel, time.time())
        return self.store.tasks.fix_object_key(task.id, key)

    def _rel(self, task: Task, job: Job) -> str:
        """The video's name in its batch, as DeliveryService names it (relative to outputs/<job>/)."""
        return str(Path(task.output).relative_to(self.cfg.folder("outputs") / job.name))

    # --- at finish ---

    def fetch(self, task: Task, part: Path, info: dict[str, Any] | None) -> Delivery | None:
        """Download the task's object into `part`, check it against the worker's report, and record it as
        uploaded before anything renames it into outputs/. Returns that record (None for an `upload: false`
        job); raises TransferTrouble (an OUTAGE kind when the video is still safe in the bucket), Stopping."""
        task = self.store.tasks.get(task.id)
        assert task.object_key, "a task sent with transfer s3 has its object key"
        fetching = part.with_name(part.name.removesuffix(".part") + ".s3.part")
        try:
            etag = download_file(self.client, self.s3.bucket, task.object_key, fetching, self.stopping)
        except Stopping:
            fetching.unlink(missing_ok=True)
            raise
        except (BotoCoreError, ClientError) as exc:
            fetching.unlink(missing_ok=True)
            if gone(exc):
                raise TransferTrouble(Attempt(False, f"the video the remote worker uploaded is not in the bucket "
                                              f"({task.object_key})", "deleted since (by hand, a lifecycle rule)? "
                                              "the task runs again", Kind.INTERNAL)) from exc
            raise TransferTrouble(self._outage("cannot download the video a remote worker uploaded", exc)) from exc
        except OSError as exc:
            fetching.unlink(missing_ok=True)
            full = exc.errno == errno.ENOSPC
            raise TransferTrouble(Attempt(
                False, f"cannot write the downloaded video: {exc}",
                "free space on the outputs disk; the task waits" if full else "see the daemon log; retried",
                Kind.OUTAGE if full else Kind.INTERNAL, dependency="disk space" if full else "")) from exc
        sha256, size = sha256_file(fetching), fetching.stat().st_size
        reported = (info or {}).get("sha256")
        if reported and reported != sha256:
            fetching.unlink(missing_ok=True)
            raise TransferTrouble(Attempt(False, f"the video in the bucket ({size} bytes) does not match what the "
                                          "worker uploaded (sha256 differs)",
                                          "another upload overwrote it, or the object store altered it; retried",
                                          Kind.INTERNAL))
        os.replace(fetching, part)
        job = self.store.jobs.get(task.job_id)
        if job.spec.get("upload") is False:
            return None
        batch = self.store.deliveries.ensure_batch(job.id, job.name, job.name, job.id)
        return self.store.deliveries.add_uploaded(batch.id, task.output, self._rel(task, job), size,
                                                  task.object_key, task.id, etag, sha256)

    # --- staged inputs of finished jobs ---

    def job_finished(self, event: JobFinished) -> None:
        """Events handler: quick, only noted; the dispatcher's thread deletes (`delete_ended`)."""
        with self._ended_lock:
            if self._ended is not None:
                self._ended.add(event.job.id)

    def delete_ended(self) -> None:
        """The staged inputs of jobs that finished, and at the first call those of every finished or forgotten
        job of this installation (a crash between a job's end and this). Best effort: a failure is logged and
        the next start's look deletes them; the links die with their expiry anyway."""
        with self._ended_lock:
            first, noted = self._ended is None, set(self._ended or ())
            self._ended = set()
        ended = set(noted)
        if first:
            try:
                ended |= {p.rstrip("/").rsplit("/", 1)[-1] for p in list_folders(self.client, self.s3.bucket,
                                                                                  self.staging)}
            except Exception as exc:
                self._trouble("cannot list staged remote inputs", exc)
        waiting = set()
        for job_id in sorted(ended):
            if self.store.jobs.state(job_id) in (None, *TERMINAL_JOB_STATES):
                self._delete_staged(job_id)
            elif job_id in noted:
                # JobFinished comes just before the job's final state is written (or the job was retried: it
                # needs them again): asked again at the next step, until the job has ended.
                waiting.add(job_id)
        with self._ended_lock:
            self._ended |= waiting

    def _delete_staged(self, job_id: str) -> None:
        prefix = self.staging_prefix(job_id)
        with self._staging_lock:
            for key in [k for k in self._staging if k.startswith(prefix)]:
                del self._staging[key]
        self._staged.pop(job_id, None)
        try:
            removed = delete_prefix(self.client, self.s3.bucket, prefix)
        except Exception as exc:
            self._trouble("cannot delete a job's staged remote inputs", exc, job_id=job_id)
            return
        if removed:
            log.info("staged remote inputs deleted", job_id=job_id, objects=removed)

    def delete_video(self, key: str) -> None:
        """A cancelled task's finished video: no batch will link it, so it leaves the bucket (best effort)."""
        try:
            delete_object(self.client, self.s3.bucket, key)
        except Exception as exc:
            self._trouble("cannot delete a cancelled task's video from the bucket", exc, key=key)
            return
        log.info("cancelled task's video deleted from the bucket", key=key)

    def abort_uploads(self, key: str) -> None:
        """An attempt ended unfinished (given up, revoked, cancelled, its worker killed): a multipart upload it
        began at the task's key is aborted now, not by the stale-upload sweep a day later (best effort)."""
        try:
            aborted = abort_stale_uploads(self.client, self.s3.bucket, key, set(), 0)
        except Exception as exc:
            self._trouble("cannot abort an ended attempt's upload", exc, key=key)
            return
        if aborted:
            log.info("ended attempt's unfinished upload aborted", key=key, uploads=len(aborted))

    def _trouble(self, what: str, exc: Exception, **where: Any) -> None:
        failure = describe(exc, self.s3.bucket)
        log.warning(what, reason=failure.reason, hint=failure.hint, **where)

    def _outage(self, what: str, exc: Exception) -> Attempt:
        failure = describe(exc, self.s3.bucket)
        return Attempt(False, f"{what}: {failure.reason}", failure.hint, Kind.OUTAGE, dependency=self.dependency)
