"""Deliveries, a second axis beside the job state (so done/failed keep their meaning for dedupe and retry).

Batch (one per job, or per folder of videos another tool left in outputs/): open -> zipped -> reported
Delivery (one per video file): pending -> uploading(upload_id, parts) -> uploaded(etag, sha256) -> linked
                               (or missing, when the file vanished before it could be sent)
"""

from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import dataclass
from typing import Any

from heygem_daemon.state.db import Repository, decoded
from heygem_daemon.state.jobs import Job, _job, mark_delivered

# Parts only serve resuming an upload: once a file is linked or missing they are kept this long for a look.
PARTS_KEEP_SECONDS = 86400.0


@dataclass(frozen=True)
class Batch:
    id: str
    name: str
    folder: str
    """Folder under outputs/ holding the batch's videos ("" for loose files)."""
    job_id: str | None
    state: str
    round_at: float | None
    """job.finished_at this batch was reported for: a retried job that finishes again is reported again."""
    zip_name: str | None
    zip_key: str | None
    zip_upload_id: str | None
    zip_size: int | None
    attempts: int
    not_before: float
    last_error: dict[str, Any] | None
    created_at: float
    updated_at: float
    reported_at: float | None
    zip_sha256: str | None = None


@dataclass(frozen=True)
class Delivery:
    id: int
    batch_id: str
    task_id: int | None
    path: str
    rel: str
    """Path relative to the batch folder (the name people see and the zip entry)."""
    state: str
    size: int
    key: str
    upload_id: str | None
    etag: str | None
    sha256: str | None
    attempts: int
    not_before: float
    last_error: dict[str, Any] | None
    created_at: float
    updated_at: float


@dataclass(frozen=True)
class Part:
    number: int
    etag: str
    size: int
    md5: str
    sent_at: float


def _batch(row: sqlite3.Row) -> Batch:
    return Batch(**decoded(row, "last_error"))


def _delivery(row: sqlite3.Row) -> Delivery:
    return Delivery(**decoded(row, "last_error"))


class DeliveryRepository(Repository):
    def adhoc_batches(self, limit: int) -> list[Batch]:
        """Batches of videos other tools put into outputs/ (no job of ours), newest first."""
        rows = self._conn().execute("SELECT * FROM batches WHERE job_id IS NULL ORDER BY created_at DESC LIMIT ?",
                                    (limit,))
        return [_batch(r) for r in rows]

    def batch(self, batch_id: str) -> Batch | None:
        row = self._conn().execute("SELECT * FROM batches WHERE id = ?", (batch_id,)).fetchone()
        return _batch(row) if row else None

    def ensure_batch(self, batch_id: str, name: str, folder: str, job_id: str | None) -> Batch:
        existing = self.batch(batch_id)
        if existing is not None:
            return existing
        now = time.time()
        with self.tx() as db:
            db.execute("INSERT OR IGNORE INTO batches (id, name, folder, job_id, state, created_at, updated_at)"
                       " VALUES (?, ?, ?, ?, 'open', ?, ?)", (batch_id, name, folder, job_id, now, now))
        return self.batch(batch_id)  # type: ignore[return-value]

    def open_adhoc_batch(self, folder: str) -> Batch | None:
        row = self._conn().execute("SELECT * FROM batches WHERE folder = ? AND job_id IS NULL AND state = 'open'"
                                   " ORDER BY created_at DESC LIMIT 1", (folder,)).fetchone()
        return _batch(row) if row else None

    def open_adhoc_batches(self) -> list[Batch]:
        rows = self._conn().execute("SELECT * FROM batches WHERE job_id IS NULL AND state != 'reported'")
        return [_batch(r) for r in rows]

    def jobs_to_report(self) -> list[Job]:
        """Finished jobs (not duplicates) whose batch was not handed off yet for their latest finish."""
        rows = self._conn().execute(
            "SELECT j.* FROM jobs j LEFT JOIN batches b ON b.id = j.id WHERE j.state IN ('done', 'failed')"
            " AND j.duplicate_of IS NULL AND (b.id IS NULL OR b.state != 'reported' OR b.round_at < j.finished_at)"
            " ORDER BY j.finished_at")
        return [_job(r) for r in rows]

    def reopen_batch(self, batch_id: str) -> None:
        with self.tx() as db:
            db.execute("UPDATE batches SET state = 'open', zip_name = NULL, zip_key = NULL, zip_upload_id = NULL,"
                       " zip_size = NULL, zip_sha256 = NULL, attempts = 0, not_before = 0, updated_at = ? WHERE id = ?",
                       (time.time(), batch_id))

    def set_batch_zip(self, batch_id: str, zip_name: str, zip_key: str, upload_id: str | None) -> None:
        with self.tx() as db:
            db.execute("UPDATE batches SET zip_name = ?, zip_key = ?, zip_upload_id = ?, updated_at = ? WHERE id = ?",
                       (zip_name, zip_key, upload_id, time.time(), batch_id))

    def batch_zipped(self, batch_id: str, zip_size: int | None, zip_sha256: str | None = None) -> None:
        with self.tx() as db:
            db.execute("UPDATE batches SET state = 'zipped', zip_size = ?, zip_sha256 = ?, zip_upload_id = NULL,"
                       " last_error = NULL, updated_at = ? WHERE id = ?", (zip_size, zip_sha256, time.time(), batch_id))

    def batch_retry(self, batch_id: str, error: dict[str, Any], not_before: float) -> None:
        with self.tx() as db:
            db.execute("UPDATE batches SET attempts = attempts + 1, not_before = ?, last_error = ?, updated_at = ?"
                       " WHERE id = ?", (not_before, json.dumps(error), time.time(), batch_id))

    def mark_reported(self, batch_id: str, round_at: float | None) -> None:
        now = time.time()
        with self.tx() as db:
            db.execute("UPDATE batches SET state = 'reported', round_at = ?, reported_at = ?, updated_at = ?"
                       " WHERE id = ?", (round_at, now, now, batch_id))

    def known(self, path: str) -> bool:
        """Whether a video at `path` was taken for delivery already (one indexed look-up, no set in memory)."""
        db = self._conn()
        return bool(db.execute("SELECT 1 FROM deliveries WHERE path = ?", (path,)).fetchone()
                    or db.execute("SELECT 1 FROM delivered WHERE path = ?", (path,)).fetchone())

    def new_outputs(self, job_id: str) -> list[str]:
        """Outputs of the job's done tasks not taken for delivery yet, in one query: what a batch waiting for
        its report still has to register (a step must not ask once per task of a large job)."""
        rows = self._conn().execute(
            "SELECT t.output FROM tasks t WHERE t.job_id = ? AND t.state = 'done'"
            " AND NOT EXISTS (SELECT 1 FROM deliveries d WHERE d.path = t.output)"
            " AND NOT EXISTS (SELECT 1 FROM delivered m WHERE m.path = t.output) ORDER BY t.id", (job_id,))
        return [r["output"] for r in rows]

    def forget_reported_adhoc(self, reported_before: float) -> list[str]:
        """Forget ad-hoc batches reported before the cut-off, with their deliveries and parts; their paths
        stay marked (`delivered`). Returns the batch names."""
        where = "job_id IS NULL AND state = 'reported' AND reported_at < ?"
        with self.tx() as db:
            names = [r["name"] for r in db.execute(f"SELECT name FROM batches WHERE {where}", (reported_before,))]
            mark_delivered(db, f"d.batch_id IN (SELECT id FROM batches WHERE {where})", (reported_before,))
            db.execute(f"DELETE FROM batches WHERE {where}", (reported_before,))
        return names

    def forget_parts_of_ended(self, now: float) -> int:
        with self.tx() as db:
            return db.execute("DELETE FROM upload_parts WHERE delivery_id IN (SELECT id FROM deliveries WHERE"
                              " state IN ('linked', 'missing') AND updated_at < ?)",
                              (now - PARTS_KEEP_SECONDS,)).rowcount

    def mark_known(self, path: str, size: int) -> None:
        """Remember a video as delivered without a delivery row (the store lost the row; links.json says so)."""
        with self.tx() as db:
            db.execute("INSERT OR IGNORE INTO delivered (path, size, marked_at) VALUES (?, ?, ?)",
                       (path, size, time.time()))

    def delivered_marks(self) -> list[str]:
        return [r["path"] for r in self._conn().execute("SELECT path FROM delivered ORDER BY path")]

    def forget_marks(self, paths: list[str]) -> None:
        with self.tx() as db:
            db.executemany("DELETE FROM delivered WHERE path = ?", [(p,) for p in paths])

    def add(self, batch_id: str, path: str, rel: str, size: int, key: str,
                     task_id: int | None) -> Delivery | None:
        """A new file to deliver; None when that path is already known (deliveries are per file, once)."""
        now = time.time()
        with self.tx() as db:
            cur = db.execute(
                "INSERT OR IGNORE INTO deliveries (batch_id, task_id, path, rel, state, size, key, created_at,"
                " updated_at) VALUES (?, ?, ?, ?, 'pending', ?, ?, ?, ?)",
                (batch_id, task_id, path, rel, size, key, now, now))
            if cur.rowcount == 0:
                return None
            db.execute("UPDATE batches SET updated_at = ? WHERE id = ?", (now, batch_id))
        return self.at(path)

    def add_uploaded(self, batch_id: str, path: str, rel: str, size: int, key: str, task_id: int, etag: str,
                     sha256: str) -> Delivery | None:
        """A video a remote worker already put at `key`: recorded before the file reaches outputs/, so delivery
        only links it (never uploads it again). None when that path is already known."""
        now = time.time()
        with self.tx() as db:
            cur = db.execute(
                "INSERT OR IGNORE INTO deliveries (batch_id, task_id, path, rel, state, size, key, etag, sha256,"
                " created_at, updated_at) VALUES (?, ?, ?, ?, 'uploaded', ?, ?, ?, ?, ?, ?)",
                (batch_id, task_id, path, rel, size, key, etag, sha256, now, now))
            if cur.rowcount == 0:
                return None
            db.execute("UPDATE batches SET updated_at = ? WHERE id = ?", (now, batch_id))
        return self.at(path)

    def forget(self, delivery_id: int) -> None:
        """Drop a delivery and its parts: a registered video that never reached outputs/, or a worker's upload
        once it is done."""
        with self.tx() as db:
            db.execute("DELETE FROM deliveries WHERE id = ?", (delivery_id,))

    def get(self, delivery_id: int) -> Delivery:
        return _delivery(self._conn().execute("SELECT * FROM deliveries WHERE id = ?", (delivery_id,)).fetchone())

    def at(self, path: str) -> Delivery | None:
        row = self._conn().execute("SELECT * FROM deliveries WHERE path = ?", (path,)).fetchone()
        return _delivery(row) if row else None

    def select(self, batch_id: str | None = None, folder: str | None = None) -> list[Delivery]:
        sql, args = "SELECT d.* FROM deliveries d JOIN batches b ON b.id = d.batch_id WHERE 1=1", []
        if batch_id is not None:
            sql += " AND d.batch_id = ?"
            args.append(batch_id)
        if folder is not None:
            sql += " AND b.folder = ?"
            args.append(folder)
        return [_delivery(r) for r in self._conn().execute(sql + " ORDER BY d.rel, d.id", args)]

    def due(self, now: float) -> list[Delivery]:
        # 'uploaded': the object is in the bucket but a crash came before it was linked; linking is what is left.
        rows = self._conn().execute("SELECT * FROM deliveries WHERE state IN ('pending', 'uploading', 'uploaded')"
                                    " AND not_before <= ? ORDER BY id", (now,))
        return [_delivery(r) for r in rows]

    def wake(self) -> None:
        """Start-up: whatever waited for a retry (endpoint down, bad credentials) is tried again now."""
        with self.tx() as db:
            db.execute("UPDATE deliveries SET not_before = 0 WHERE state IN ('pending', 'uploading')")
            db.execute("UPDATE batches SET not_before = 0 WHERE state != 'reported'")

    def start_upload(self, delivery_id: int, upload_id: str) -> None:
        """A fresh multipart upload: its id is recorded before any part is sent, old parts are forgotten."""
        with self.tx() as db:
            db.execute("DELETE FROM upload_parts WHERE delivery_id = ?", (delivery_id,))
            db.execute("UPDATE deliveries SET state = 'uploading', upload_id = ?, updated_at = ? WHERE id = ?",
                       (upload_id, time.time(), delivery_id))

    def add_parts(self, delivery_id: int, parts: list[Part]) -> None:
        """Parts the server confirmed, in one transaction (parts that land together cost one commit)."""
        with self.tx() as db:
            db.executemany("INSERT OR REPLACE INTO upload_parts (delivery_id, part_number, etag, size, md5, sent_at)"
                           " VALUES (?, ?, ?, ?, ?, ?)",
                           [(delivery_id, p.number, p.etag, p.size, p.md5, p.sent_at) for p in parts])

    def parts(self, delivery_id: int) -> list[Part]:
        rows = self._conn().execute("SELECT part_number, etag, size, md5, sent_at FROM upload_parts"
                                    " WHERE delivery_id = ? ORDER BY part_number", (delivery_id,))
        return [Part(r[0], r[1], r[2], r[3], r[4]) for r in rows]

    def forget_parts(self, delivery_id: int, numbers: list[int]) -> None:
        with self.tx() as db:
            db.executemany("DELETE FROM upload_parts WHERE delivery_id = ? AND part_number = ?",
                           [(delivery_id, n) for n in numbers])

    def finish_upload(self, delivery_id: int, etag: str | None, sha256: str) -> None:
        with self.tx() as db:
            db.execute("UPDATE deliveries SET state = 'uploaded', etag = ?, sha256 = ?, upload_id = NULL,"
                       " last_error = NULL, updated_at = ? WHERE id = ?", (etag, sha256, time.time(), delivery_id))

    def mark_linked(self, delivery_ids: list[int]) -> None:
        with self.tx() as db:
            db.executemany("UPDATE deliveries SET state = 'linked', updated_at = ? WHERE id = ?",
                           [(time.time(), i) for i in delivery_ids])

    def retry(self, delivery_id: int, error: dict[str, Any], not_before: float,
                       state: str | None = None) -> None:
        with self.tx() as db:
            db.execute("UPDATE deliveries SET attempts = attempts + 1, not_before = ?, last_error = ?,"
                       " state = COALESCE(?, state), updated_at = ? WHERE id = ?",
                       (not_before, json.dumps(error), state, time.time(), delivery_id))

    def uploaded_before(self, updated_before: float) -> list[Delivery]:
        """Videos whose object is in the bucket (linked, with a key) and untouched since the cut-off."""
        rows = self._conn().execute("SELECT * FROM deliveries WHERE state = 'linked' AND key != ''"
                                    " AND updated_at < ? ORDER BY id", (updated_before,))
        return [_delivery(r) for r in rows]

    def zipped_batches(self, zipped_before: float) -> list[Batch]:
        rows = self._conn().execute("SELECT * FROM batches WHERE zip_name IS NOT NULL AND state != 'open'"
                                    " AND COALESCE(reported_at, updated_at) < ? ORDER BY created_at",
                                    (zipped_before,))
        return [_batch(r) for r in rows]

    def forget_zip(self, batch_id: str) -> None:
        with self.tx() as db:
            db.execute("UPDATE batches SET zip_name = NULL, zip_key = NULL, zip_size = NULL, zip_sha256 = NULL"
                       " WHERE id = ?",
                       (batch_id,))

    def known_upload_ids(self) -> set[str]:
        db = self._conn()
        ids = {r[0] for r in db.execute("SELECT upload_id FROM deliveries WHERE upload_id IS NOT NULL")}
        return ids | {r[0] for r in db.execute("SELECT zip_upload_id FROM batches WHERE zip_upload_id IS NOT NULL")}

    def summary(self, batch_id: str) -> dict[str, Any] | None:
        batch = self.batch(batch_id)
        if batch is None:
            return None
        rows = self._conn().execute("SELECT state, COUNT(*) AS n FROM deliveries WHERE batch_id = ? GROUP BY state",
                                    (batch_id,))
        return {"state": batch.state, "files": {r["state"]: r["n"] for r in rows}, "zip": batch.zip_name,
                "problem": self._problem(batch)}

    def _problem(self, batch: Batch) -> dict[str, Any] | None:
        """Why a batch is not delivered yet: the latest error of a video still to send, else its zip's.
        `blocked`: the error needs the operator (a wrong secret, no bucket); otherwise it is retried by itself."""
        if batch.state == "reported":
            return None
        row = self._conn().execute("SELECT last_error FROM deliveries WHERE batch_id = ? AND last_error IS NOT NULL"
                                   " AND state IN ('pending', 'uploading') ORDER BY updated_at DESC LIMIT 1",
                                   (batch.id,)).fetchone()
        error = json.loads(row[0]) if row else batch.last_error
        if not error:
            return None
        return {"reason": error.get("reason"), "hint": error.get("hint"), "blocked": error.get("retryable") is False}
