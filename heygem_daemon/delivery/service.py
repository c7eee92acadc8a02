"""Delivery: finished videos -> upload (or local-only) -> links.json -> batch zip -> one report per batch.

One thread watches outputs/ and decides; a pool of s3.max_concurrency threads uploads files and builds
zips. Every step is recorded in the store first, so a restart carries on where the last run stopped,
and a batch is handed to `on_report` once (the store remembers it was reported).
"""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

from heygem_daemon.config import Config
from heygem_daemon.delivery.audit import AuditLog
from heygem_daemon.delivery.links import (
    HIDDEN_TEMPS, LINKS_JSON, LinkEntry, iso_utc, link_seconds, listed, presign_get, write_links,
)
from heygem_daemon.delivery.names import object_key, zip_name
from heygem_daemon.delivery.outputs import OutputsWatcher
from heygem_daemon.delivery.report import BatchReport, VideoLink
from heygem_daemon.delivery.s3 import (
    MiB, S3Failure, Stopping, StreamUpload, Throttle, Uploader, abort_quietly, ensure_lifecycle,
    describe, make_client,
)
from heygem_daemon.delivery.zipper import write_local_zip, write_zip
from heygem_daemon.fs.files import file_owner, sha256_file
from heygem_daemon.fs.watcher import start_watcher
from heygem_daemon.log import get_logger
from heygem_daemon.media.duration import container_seconds
from heygem_daemon.state import Batch, Delivery, Job, Store
from heygem_daemon.failures import Kind, Problem, backoff_delay

log = get_logger("heygem.delivery")
ENDED = ("linked", "missing")
IDLE_WAIT = 1.0

OnReport = Callable[[BatchReport], None]
# Returns whatever the sender returns (the outbox's row id): object, since it is never read here.
OnAlert = Callable[[str, str], object]


def log_report(report: BatchReport) -> None:
    """The record of every hand-off: one log line (names and counts, never links)."""
    log.info("batch reported", job_id=report.job_id, job=report.job_name, videos=len(report.videos),
             failed=len(report.failed), zip=report.zip_name, ok=report.ok)


def log_alert(key: str, message: str) -> None:
    log.error("operator alert", alert=key, message=message)


class DeliveryService:
    name = "delivery"

    def __init__(self, cfg: Config, store: Store, on_report: OnReport, on_alert: OnAlert) -> None:
        self.cfg, self.store = cfg, store
        self.settings = cfg.s3
        self.outputs = cfg.folder("outputs")
        self.on_report, self.on_alert = on_report, on_alert
        self.stopping = threading.Event()
        self.wake = threading.Event()
        self.watcher = OutputsWatcher(self.outputs, cfg.watcher)
        self.audit = AuditLog(cfg.folder("logs"))
        self.throttle = Throttle(self.settings.max_bandwidth_mb_s)
        self.client = make_client(self.settings) if self.settings.enabled else None
        self.uploader = (Uploader(self.client, self.settings, store, self.throttle, self.stopping)
                         if self.client else None)
        self.pool = ThreadPoolExecutor(self.settings.max_concurrency, thread_name_prefix="deliver")
        self._busy: set[str] = set()
        self._busy_lock = threading.Lock()
        # links.json/links.txt have one writer at a time, and each write re-reads the store under it,
        # so the last write always holds the latest state (pool threads finish files in any order).
        self._links_lock = threading.Lock()
        self._submitted = 0
        # (began, ended) on the monotonic clock of the last step that found nothing it could do now.
        self._quiet = (0.0, 0.0)
        self._thread: threading.Thread | None = None
        self._observer: Any = None

    # --- life cycle -----------------------------------------------------------------------------

    def start(self) -> None:
        self.store.deliveries.wake()
        self._observer, mode = start_watcher(self.outputs, self.cfg.watcher.mode, self.cfg.watcher.poll_interval,
                                             self._touch, what="outputs")
        self.watcher.periodic = mode == "polling"  # inotify reports every change, and says when it lost some
        self._thread = threading.Thread(target=self._run, name="delivery", daemon=True)
        self._thread.start()
        where = {"endpoint": self.client.meta.endpoint_url, "region": self.client.meta.region_name,
                 "region_assumed": not self.settings.region} if self.client else {}
        log.info("delivery ready", upload="s3" if self.client else "local-only", bucket=self.settings.bucket or None,
                 watch_mode=mode, **where)

    def stop(self, timeout: float = 20.0) -> None:
        self.stopping.set()
        self.wake.set()
        if self._observer is not None:
            self._observer.stop()
        if self._thread is not None:
            self._thread.join(timeout)
        self.pool.shutdown(wait=True, cancel_futures=True)

    def alive(self) -> bool:
        return all(t is not None and t.is_alive() for t in (self._thread, self._observer))

    def apply(self, cfg: Config) -> None:
        """SIGHUP: the outputs watcher takes the new name patterns, settle and rescan times at its next
        step; s3.* and delivery.* wait for a restart (ops.reload keeps them at their running values)."""
        self.cfg = cfg
        self.watcher.apply(cfg.watcher)

    def _touch(self, path: str | None) -> None:
        self.watcher.touch(path)
        self.wake.set()

    def _run(self) -> None:
        if self.client is not None and self.settings.lifecycle.wanted:
            self._apply_lifecycle()
        while not self.stopping.is_set():
            if self.store.db.full_since is not None:  # the state disk is full: nothing done could be recorded
                self.stopping.wait(1.0)
                continue
            began, submitted = time.monotonic(), self._submitted
            try:
                self._step()
            except Exception:
                log.exception("delivery step failed; will try again")
            else:
                with self._busy_lock:
                    if self._submitted == submitted and not self._busy:
                        self._quiet = (began, time.monotonic())
            self.wake.wait(IDLE_WAIT)
            self.wake.clear()

    def quiet_after(self, since: float) -> float | None:
        """For a drain: when a step begun after `since` (monotonic) last found nothing to do now — nothing
        running, nothing due (what waits for a retry stays waiting) — and so every report it made was handed
        on before that time. None until then; it nudges the thread to look."""
        began, ended = self._quiet
        if began >= since:
            return ended
        self.wake.set()
        return None

    # --- the decisions (delivery thread) ----------------------------------------------------------

    def _step(self) -> None:
        known = self.store.deliveries.known
        for rel, size in self.watcher.step(time.monotonic(), lambda r: known(str(self.outputs / r))):
            self._register(self.outputs / rel, size)
        now = time.time()
        for job in self.store.deliveries.jobs_to_report():
            batch = self._job_batch(job)
            if self._job_batch_ended(batch, job, now):
                self._submit(f"b:{batch.id}", self._finish_batch, batch, job)
        for d in self.store.deliveries.due(now):
            if not self._not_in_outputs_yet(d):
                self._submit(f"d:{d.id}", self._deliver, d)
        quiet = self.cfg.delivery.adhoc_quiet_seconds
        for batch in self.store.deliveries.open_adhoc_batches():
            files = self.store.deliveries.select(batch.id)
            if (batch.not_before <= now and files and all(d.state in ENDED for d in files)
                    and now - max(d.created_at for d in files) >= quiet):
                self._submit(f"b:{batch.id}", self._finish_batch, batch, None)

    def _not_in_outputs_yet(self, d: Delivery) -> bool:
        """A remote worker's video (`transfer: s3`) is recorded as uploaded before the daemon has checked it and
        renamed it into outputs/: it is linked only once it is there. While its task still runs the check may
        fail, and then the record is taken back."""
        if d.state != "uploaded" or d.task_id is None or Path(d.path).exists():
            return False
        task = self.store.tasks.by_output(d.path)
        return task is not None and task.state in ("queued", "running")

    def _register(self, path: Path, size: int) -> Delivery | None:
        """A settled video becomes a delivery: tied to its task when our engine made it, ad hoc otherwise."""
        task = self.store.tasks.by_output(str(path))
        rel_to_outputs = path.relative_to(self.outputs)
        local = False
        if task is not None:
            job = self.store.jobs.get(task.job_id)
            batch = self.store.deliveries.ensure_batch(job.id, job.name, job.name, job.id)
            local = job.spec.get("upload") is False  # job.yaml `upload: false`
        else:
            folder = rel_to_outputs.parts[0] if len(rel_to_outputs.parts) > 1 else ""
            if folder and listed(self.outputs / folder, str(path.relative_to(self.outputs / folder)), size):
                # Delivered before the store lost its record: links and chat went out once already.
                self.store.deliveries.mark_known(str(path), size)
                log.warning("video already listed in its folder's links.json; not delivered again",
                            file=str(rel_to_outputs), hint="the state database lost recent rows (a crash or a "
                            "restore): jobs finished just before it are not delivered twice")
                return None
            batch = self.store.deliveries.open_adhoc_batch(folder) or self.store.deliveries.ensure_batch(
                f"adhoc-{os.urandom(6).hex()}", folder or path.stem, folder, None)
        rel = str(path.relative_to(self.outputs / batch.folder)) if batch.folder else path.name
        # An empty key means "not in the bucket": the video is delivered locally, even in S3 mode.
        key = "" if local else object_key(self.settings.key_prefix, batch.name, rel, time.time())
        d = self.store.deliveries.add(batch.id, str(path), rel, size, key, task.id if task else None)
        if d is not None:
            log.info("video to deliver", job_id=batch.job_id, batch=batch.name, file=rel, size=size,
                     adhoc=task is None)
        return d

    def _job_batch(self, job: Job) -> Batch:
        batch = self.store.deliveries.ensure_batch(job.id, job.name, job.name, job.id)
        if batch.state == "reported" and (batch.round_at or 0) < (job.finished_at or 0):
            # Finished again after `retry`: a new round with its own zip and report.
            self.store.deliveries.reopen_batch(batch.id)
            batch = self.store.deliveries.batch(batch.id)  # type: ignore[assignment]
        return batch

    def _job_batch_ended(self, batch: Batch, job: Job, now: float) -> bool:
        if batch.not_before > now:
            return False
        for output in self.store.deliveries.new_outputs(job.id):
            path = Path(output)
            if path.is_file():
                # Our engine's outputs are complete when the task is done: no need to wait for the watcher.
                self._register(path, path.stat().st_size)
        return all(d.state in ENDED for d in self.store.deliveries.select(batch.id))

    def _submit(self, tag: str, fn: Callable[..., None], *args: Any) -> None:
        with self._busy_lock:
            if tag in self._busy:
                return
            self._busy.add(tag)
            self._submitted += 1

        def run() -> None:
            try:
                fn(*args)
            except Stopping:
                pass
            except Exception:
                log.exception("delivery work failed; will try again", work=tag)
            finally:
                with self._busy_lock:
                    self._busy.discard(tag)
                self.wake.set()

        self.pool.submit(run)

    # --- one file (pool threads) -----------------------------------------------------------------

    def _deliver(self, d: Delivery) -> None:
        d = self.store.deliveries.get(d.id)
        if d.state not in ("pending", "uploading", "uploaded"):
            return
        try:
            if d.state == "uploaded":
                # Uploaded before a crash, or by a remote worker straight to its key (transfer: s3).
                log.info("video already in the bucket; linking it", file=d.rel, key=d.key)
            elif self.uploader is not None and d.key:
                up = self.uploader.upload(d)
                self.store.deliveries.finish_upload(d.id, up.etag, up.sha256)
                log.info("video uploaded", file=d.rel, key=d.key, size=d.size, sent=up.sent_bytes)
            else:
                self.store.deliveries.finish_upload(d.id, None, sha256_file(Path(d.path)))
        except FileNotFoundError:
            self.store.deliveries.retry(d.id, {"stage": "deliver", "reason": "the video vanished from outputs/",
                                             "hint": "it was moved or deleted before it could be sent"},
                                      0, state="missing")
            log.warning("video vanished before delivery", file=d.path)
            return
        except Stopping:
            raise
        except Exception as exc:
            self._failed(f"upload of {d.rel}", exc, lambda f: self._retry_later(d, f))
            return
        batch = self.store.deliveries.batch(d.batch_id)
        assert batch is not None
        # The audit line first: a kill between the two repeats the line at the next pass instead of losing it.
        self._audit("delivery", batch, [self.store.deliveries.get(d.id)])
        self.store.deliveries.mark_linked([d.id])
        self._write_links(batch)

    def _retry_later(self, d: Delivery, failure: S3Failure) -> None:
        self.store.deliveries.retry(d.id, failure.as_dict(), time.time() + self._delay(failure, d.attempts + 1))

    def _delay(self, failure: S3Failure, attempt: int) -> float:
        if not failure.retryable:
            return self.settings.alert_retry_seconds
        return backoff_delay(attempt, self.settings.retry_seconds, self.settings.retry_max_seconds)

    def _failed(self, what: str, exc: Exception, later: Callable[[S3Failure], None]) -> None:
        failure = describe(exc, self.settings.bucket)
        later(failure)
        if failure.retryable:
            # A traceback only for what is not an S3 answer or a network error: that would be our bug.
            log.warning("delivery failed; will retry", what=what, reason=failure.reason, hint=failure.hint,
                        exc_info=failure.reason.startswith("unexpected"))
            return
        log.error("delivery blocked; operator must act", what=what, reason=failure.reason, hint=failure.hint)
        key = f"s3:{failure.code}:{self.settings.bucket}"
        message = f"{failure.reason}. {failure.hint}. Videos stay in {self.outputs} and are sent once fixed."
        log_alert(key, message)
        self.on_alert(key, message)

    # --- one batch (pool threads) ----------------------------------------------------------------

    def _finish_batch(self, batch: Batch, job: Job | None) -> None:
        batch = self.store.deliveries.batch(batch.id)  # type: ignore[assignment]
        if batch.state == "reported":
            return
        videos = [d for d in self.store.deliveries.select(batch.id) if d.state == "linked"]
        when = (job.finished_at if job else None) or time.time()
        if len(videos) >= self.cfg.delivery.zip_min_videos and batch.state == "open":
            try:
                self._zip(batch, videos, when)
            except Stopping:
                raise
            except Exception as exc:
                self._failed(f"zip of {batch.name}", exc, lambda f: self.store.deliveries.batch_retry(
                    batch.id, f.as_dict(), time.time() + self._delay(f, batch.attempts + 1)))
                return
            batch = self.store.deliveries.batch(batch.id)  # type: ignore[assignment]
        # The report carries the very links links.json got: presigned twice, a second apart, they would differ.
        entries, zip_entry = self._write_links(batch)
        report = self._report(batch, job, videos, entries, zip_entry)
        log_report(report)
        self.on_report(report)
        self.store.deliveries.mark_reported(batch.id, job.finished_at if job else None)

    def _zip(self, batch: Batch, videos: list[Delivery], when: float) -> None:
        name = zip_name(batch.name, when)
        files = [(Path(d.path), d.rel) for d in videos]
        if self.client is None or not any(d.key for d in videos):
            size, sha256 = write_local_zip(files, self._links_dir(batch) / name, self.outputs / HIDDEN_TEMPS)
            self.store.deliveries.set_batch_zip(batch.id, name, "", None)
        else:
            if batch.zip_upload_id:  # a zip cut short by a crash: its parts are useless, start again
                abort_quietly(self.client, self.settings.bucket, batch.zip_key or "", batch.zip_upload_id)
            key = object_key(self.settings.key_prefix, batch.name, name, time.time())
            stream = StreamUpload(self.client, self.settings.bucket, key, self.settings.part_size_mb * MiB,
                                  self.throttle, self.stopping,
                                  lambda uid: self.store.deliveries.set_batch_zip(batch.id, name, key, uid), name,
                                  self.settings.part_concurrency)
            try:
                sha256 = write_zip(files, stream)  # type: ignore[arg-type]
                stream.finish()
            except BaseException:
                stream.abort()
                raise
            size = stream.size
        current = self.store.deliveries.batch(batch.id)
        assert current is not None
        # The audit line before the state that ends this step: a kill in between repeats it, never loses it.
        self._audit("zip", replace(current, zip_size=size, zip_sha256=sha256), videos)
        self.store.deliveries.batch_zipped(batch.id, size, sha256)
        log.info("batch zipped", job_id=batch.job_id, batch=batch.name, zip=name, files=len(files), size=size)

    def _report(self, batch: Batch, job: Job | None, videos: list[Delivery], entries: dict[str, LinkEntry],
                zip_entry: LinkEntry | None) -> BatchReport:
        links = [VideoLink(name=d.rel, size=d.size, sha256=d.sha256 or "", duration=container_seconds(Path(d.path)),
                           url=entries[d.rel].link, local_path=d.path) for d in videos]
        return BatchReport(
            job_id=batch.job_id or batch.id, job_name=batch.name, videos=links, failed=self._problems(batch, job),
            zip_name=batch.zip_name, zip_url=zip_entry.link if zip_entry else None,
            expires_at=(time.time() + self._expiry()) if self.client and any(d.key for d in videos) else None,
        )

    def _problems(self, batch: Batch, job: Job | None) -> list[Problem]:
        problems = [Problem(Kind.INTERNAL, "deliver", (d.last_error or {}).get("reason", "not delivered"),
                            (d.last_error or {}).get("hint", ""), file=d.rel)
                    for d in self.store.deliveries.select(batch.id) if d.state == "missing"]
        if job is None or job.state != "failed":
            return problems
        # What could not be made, as the life cycle recorded it when the job failed (error.json's problems).
        return problems + [Problem.from_dict(p) for p in (job.error or {}).get("problems", [])]

    # --- links and audit ---------------------------------------------------------------------------

    def _expiry(self) -> int:
        return link_seconds(self.settings.link_expiry_hours)

    def _link(self, key: str, filename: str) -> tuple[str | None, str | None]:
        if self.client is None or not key:
            return None, None
        url = presign_get(self.client, self.settings.bucket, key, filename, self._expiry())
        return url, iso_utc(time.time() + self._expiry())

    def _entries(self, deliveries: list[Delivery]) -> list[LinkEntry]:
        out = []
        for d in deliveries:
            link, expires = self._link(d.key, d.rel)
            out.append(LinkEntry(d.rel, d.size, d.path, d.sha256, (d.key or None) if self.client else None, link,
                                 expires))
        return out

    def _zip_entry(self, batch: Batch) -> LinkEntry | None:
        if not batch.zip_name or batch.state == "open":
            return None
        return self._zip_file(batch)

    def _zip_file(self, batch: Batch) -> LinkEntry:
        assert batch.zip_name is not None
        if batch.zip_key:  # streamed into the bucket: there is no local copy to name
            link, expires = self._link(batch.zip_key, batch.zip_name)
            return LinkEntry(batch.zip_name, batch.zip_size or 0, None, batch.zip_sha256, batch.zip_key, link, expires)
        path = self._links_dir(batch) / batch.zip_name
        return LinkEntry(batch.zip_name, batch.zip_size or 0, str(path), batch.zip_sha256)

    def _links_dir(self, batch: Batch) -> Path:
        return self.outputs / batch.folder if batch.folder else self.outputs

    def _write_links(self, batch: Batch) -> tuple[dict[str, LinkEntry], LinkEntry | None]:
        """links.json lists every delivered video of the folder (whichever batch brought it) and the zip.
        Returns what it listed, by file, and the zip's entry."""
        with self._links_lock:
            batch = self.store.deliveries.batch(batch.id) or batch
            linked = [d for d in self.store.deliveries.select(folder=batch.folder) if d.state == "linked"]
            if not batch.folder:
                linked = [d for d in linked if d.batch_id == batch.id]
            entries, zip_entry = self._entries(linked), self._zip_entry(batch)
            if linked:  # a job that made no video gets no outputs/ folder (its name stays free for a retry)
                stem = LINKS_JSON.removesuffix(".json") if batch.folder else f"{batch.name}.links"
                write_links(self._links_dir(batch), stem, batch.name, entries, zip_entry, self.outputs / HIDDEN_TEMPS)
            return {e.file: e for e in entries}, zip_entry

    def _audit(self, event: str, batch: Batch, deliveries: list[Delivery]) -> None:
        """Each file by where it went, decided by its key as delivery decides: an object in the bucket is
        named by key and link, a file delivered locally (local-only mode, `upload: false`) by its path."""
        job = self.store.jobs.get(batch.job_id) if batch.job_id else None
        if event == "zip":  # written before the batch is marked zipped, so not through _zip_entry
            entries, size = [self._zip_file(batch)], batch.zip_size or 0
        else:
            entries, size = self._entries(deliveries), sum(d.size for d in deliveries)
        self.audit.record(event, job=batch.name, job_id=batch.job_id, owner=job.owner if job else self._owner(
            deliveries), dropped_at=job.created_at if job else None, files=len(deliveries), total_bytes=size,
            keys=[e.key for e in entries if e.key], links=[e.link if e.key else e.path for e in entries])

    @staticmethod
    def _owner(deliveries: list[Delivery]) -> str | None:
        """Who wrote a video another tool left in outputs/: the file's owner, as intake records for drops."""
        try:
            return file_owner(Path(deliveries[0].path))
        except (IndexError, OSError):
            return None

    # --- bucket hygiene ----------------------------------------------------------------------------

    def _apply_lifecycle(self) -> None:
        """Once at start. The rule is housekeeping, not delivery: a server that cannot take it (501, or an
        S3-compatible store without lifecycle) gets one warning; videos are not held and nothing retries."""
        assert self.client is not None
        try:
            ensure_lifecycle(self.client, self.settings)
        except Exception as exc:
            failure = describe(exc, self.settings.bucket)
            log.warning("bucket lifecycle rule not applied; delivery goes on without it", reason=failure.reason,
                        hint="old objects and unfinished uploads are not expired by the bucket: expire them another "
                             "way or clear s3.lifecycle")
