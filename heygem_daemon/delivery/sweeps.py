"""Delivery's cleanup sweeps (scheduled by cleanup.py): local copies of uploaded videos, expired zips,
abandoned multipart uploads. A video that is not yet in the bucket is never touched."""

from __future__ import annotations

from pathlib import Path

from heygem_daemon.ops.cleanup import DAY, HOUR, Sweep
from heygem_daemon.delivery.names import static_prefix
from heygem_daemon.delivery.s3 import abort_stale_uploads, delete_object, describe, make_client
from heygem_daemon.log import get_logger

log = get_logger("heygem.cleanup")


def uploaded_outputs(sweep: Sweep) -> None:
    """Local videos already linked from the bucket, older than cleanup.outputs_days. In local-only mode
    nothing is ever uploaded, so outputs/ stays as it is (the local files are the delivery)."""
    if not sweep.cfg.s3.enabled:
        return
    for d in sweep.store.deliveries.uploaded_before(sweep.now - sweep.cfg.cleanup.outputs_days * DAY):
        sweep.remove(Path(d.path))


def expired_zips(sweep: Sweep) -> None:
    """Batch zips whose link has expired (s3.link_expiry_hours after they were made): the bucket object
    when uploading, the local file otherwise. The videos themselves stay."""
    expiry = sweep.cfg.s3.link_expiry_hours * HOUR
    client = make_client(sweep.cfg.s3) if sweep.cfg.s3.enabled else None
    outputs = sweep.cfg.folder("outputs")
    for batch in sweep.store.deliveries.zipped_batches(sweep.now - expiry):
        assert batch.zip_name is not None
        if batch.zip_key and client is not None:
            delete_object(client, sweep.cfg.s3.bucket, batch.zip_key)
            sweep.removed.append(f"s3://{sweep.cfg.s3.bucket}/{batch.zip_key}")
        elif not batch.zip_key:
            sweep.remove(outputs / batch.folder / batch.zip_name)
        sweep.store.deliveries.forget_zip(batch.id)


def stale_uploads(sweep: Sweep) -> None:
    """Multipart uploads under our prefix that the store does not know, older than
    cleanup.stale_upload_hours: their parts are billed until aborted and nothing will ever finish them."""
    s3 = sweep.cfg.s3
    if not s3.enabled:
        return
    try:
        aborted = abort_stale_uploads(make_client(s3), s3.bucket, static_prefix(s3.key_prefix),
                                      sweep.store.deliveries.known_upload_ids(), sweep.cfg.cleanup.stale_upload_hours)
    except Exception as exc:  # S3 down or refusing: say why in one line; the next run tries again
        failure = describe(exc, s3.bucket)
        log.warning("stale upload sweep skipped", reason=failure.reason, hint=failure.hint)
        return
    sweep.removed.extend(f"upload {key} ({upload_id})" for key, upload_id in aborted)
