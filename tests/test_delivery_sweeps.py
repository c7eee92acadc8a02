"""Delivery's cleanup sweeps on real files, a real store and a real moto S3 server, judged by a clock set
in the future: exactly which local videos, zips and multipart uploads go, and which stay."""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from heygem_daemon.ops.cleanup import DAY, Sweep
from heygem_daemon.config import load_config
from heygem_daemon.delivery.s3 import s3_checks
from heygem_daemon.delivery.sweeps import expired_zips, stale_uploads, uploaded_outputs
from heygem_daemon.state import Store
from s3_server import credentials_env

LATER = 30 * DAY


@pytest.fixture
def aws_env(monkeypatch):
    for k, v in credentials_env().items():
        monkeypatch.setenv(k, v)


def make_cfg(tmp_path: Path, s3: dict[str, Any] | None = None):
    (tmp_path / "base").mkdir(exist_ok=True)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"base_dir": "base", "cleanup": {"outputs_days": 7},
                                    "s3": {"link_expiry_hours": 24, **(s3 or {})}}))
    return load_config(path, environ={})


def video(cfg, rel: str) -> Path:
    path = cfg.folder("outputs") / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\0" * 1000)
    return path


def delivered(store: Store, batch: str, path: Path, key: str, state: str) -> None:
    store.deliveries.ensure_batch(batch, batch, path.parent.name, None)
    d = store.deliveries.add(batch, str(path), path.name, 1000, key, None)
    assert d is not None
    if state in ("uploaded", "linked"):
        store.deliveries.finish_upload(d.id, '"etag"', "0" * 64)
    if state == "linked":
        store.deliveries.mark_linked([d.id])


def later_sweep(cfg, store: Store) -> Sweep:
    return Sweep(cfg, store, time.time() + LATER)


def test_uploaded_videos_go_and_undelivered_ones_stay(tmp_path, moto_server, aws_env):
    cfg = make_cfg(tmp_path, moto_server.s3_settings(moto_server.new_bucket()))
    store = Store(cfg.folder("state") / "heygem.db")
    linked = video(cfg, "a/linked.mp4")
    pending = video(cfg, "a/pending.mp4")
    uploaded_not_linked = video(cfg, "a/uploaded.mp4")
    delivered(store, "a", linked, "k/linked.mp4", "linked")
    delivered(store, "a", pending, "k/pending.mp4", "pending")
    delivered(store, "a", uploaded_not_linked, "k/uploaded.mp4", "uploaded")
    sweep = later_sweep(cfg, store)
    uploaded_outputs(sweep)
    assert not linked.exists() and pending.exists() and uploaded_not_linked.exists()
    assert sweep.removed == [str(linked)] and sweep.freed == 1000


def test_recent_uploaded_videos_stay(tmp_path, moto_server, aws_env):
    cfg = make_cfg(tmp_path, moto_server.s3_settings(moto_server.new_bucket()))
    store = Store(cfg.folder("state") / "heygem.db")
    linked = video(cfg, "a/linked.mp4")
    delivered(store, "a", linked, "k/linked.mp4", "linked")
    uploaded_outputs(Sweep(cfg, store, time.time() + 6 * DAY))
    assert linked.exists()


def test_local_only_mode_never_sweeps_outputs(tmp_path):
    cfg = make_cfg(tmp_path)
    store = Store(cfg.folder("state") / "heygem.db")
    local = video(cfg, "a/local.mp4")
    delivered(store, "a", local, "", "linked")
    uploaded_outputs(later_sweep(cfg, store))
    assert local.exists()


def test_expired_local_zip_goes_and_its_videos_stay(tmp_path):
    cfg = make_cfg(tmp_path)
    store = Store(cfg.folder("state") / "heygem.db")
    clip = video(cfg, "job/clip.mp4")
    zipped = video(cfg, "job/job_20261121_1200.zip")
    delivered(store, "job", clip, "", "linked")
    store.deliveries.set_batch_zip("job", zipped.name, "", None)
    store.deliveries.batch_zipped("job", 1000)
    expired_zips(Sweep(cfg, store, time.time() + 3600))
    assert zipped.exists(), "a zip younger than s3.link_expiry_hours stays"
    expired_zips(later_sweep(cfg, store))
    assert not zipped.exists() and clip.exists()
    assert store.deliveries.batch("job").zip_name is None


def test_expired_zip_object_is_deleted_from_the_bucket(tmp_path, moto_server, aws_env):
    bucket = moto_server.new_bucket()
    cfg = make_cfg(tmp_path, moto_server.s3_settings(bucket))
    store = Store(cfg.folder("state") / "heygem.db")
    client = moto_server.client()
    client.put_object(Bucket=bucket, Key="2026/job/zip.zip", Body=b"zip")
    client.put_object(Bucket=bucket, Key="2026/job/clip.mp4", Body=b"mp4")
    clip = video(cfg, "job/clip.mp4")
    delivered(store, "job", clip, "2026/job/clip.mp4", "linked")
    store.deliveries.set_batch_zip("job", "zip.zip", "2026/job/zip.zip", None)
    store.deliveries.batch_zipped("job", 3)
    sweep = later_sweep(cfg, store)
    expired_zips(sweep)
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=bucket).get("Contents", [])]
    assert keys == ["2026/job/clip.mp4"]
    assert sweep.removed == [f"s3://{bucket}/2026/job/zip.zip"]


def test_stale_sweep_aborts_unknown_uploads_and_keeps_resumable_ones(tmp_path, moto_server, aws_env):
    bucket = moto_server.new_bucket()
    cfg = make_cfg(tmp_path, moto_server.s3_settings(bucket))
    store = Store(cfg.folder("state") / "heygem.db")
    client = moto_server.client()
    clip = video(cfg, "job/clip.mp4")
    delivered(store, "job", clip, "2026/job/clip.mp4", "pending")
    known = client.create_multipart_upload(Bucket=bucket, Key="2026/job/clip.mp4")["UploadId"]
    store.deliveries.start_upload(store.deliveries.at(str(clip)).id, known)
    client.create_multipart_upload(Bucket=bucket, Key="2026/job/orphan.mp4")
    stale_uploads(later_sweep(cfg, store))  # moto dates every upload in 2010: all are old enough
    left = [u["UploadId"] for u in client.list_multipart_uploads(Bucket=bucket).get("Uploads", [])]
    assert left == [known]


def test_doctor_says_the_bucket_answers(tmp_path, moto_server, aws_env):
    cfg = make_cfg(tmp_path, moto_server.s3_settings(moto_server.new_bucket()))
    [check] = s3_checks(cfg)
    assert check.ok and "reachable" in check.detail


def test_doctor_names_a_missing_bucket_and_the_fix(tmp_path, moto_server, aws_env):
    cfg = make_cfg(tmp_path, moto_server.s3_settings("no-such-bucket-here"))
    [check] = s3_checks(cfg)
    assert not check.ok and "bucket 'no-such-bucket-here' does not exist" in check.detail
    # The status code as a word: the server's random port may hold the digits (127.0.0.1:40421).
    assert not re.search(r"\b404\b", check.detail) and "create it" in check.fix


def test_doctor_names_the_endpoint_it_used_from_aws_endpoint_url_s3(tmp_path, moto_server, aws_env, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", moto_server.endpoint)
    bucket = moto_server.new_bucket()
    cfg = make_cfg(tmp_path, {"bucket": bucket, "region": "us-east-1", "addressing_style": "path"})
    [check] = s3_checks(cfg)
    assert check.ok and f"bucket {bucket!r} at {moto_server.endpoint} (region us-east-1)" in check.detail


def test_doctor_reports_upload_off_in_local_only_mode(tmp_path):
    [check] = s3_checks(make_cfg(tmp_path))
    assert check.ok and "local-only" in check.detail
