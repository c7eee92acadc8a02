"""Delivery against S3 servers other than moto: nanio (checks signatures, link expiry, clock skew) and a
server lacking parts of the API (a real proxy answering as s3rver 3.7.1 did when measured: 405 for
ListParts / AbortMultipartUpload, 501 for ListMultipartUploads and lifecycle)."""

from __future__ import annotations

import hashlib
import threading
import time
import urllib.error
import urllib.request
from datetime import datetime, timedelta, timezone
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import botocore.auth
import pytest
from botocore.exceptions import ClientError

from heygem_daemon.config import S3, Config, Lifecycle
from heygem_daemon.delivery.links import content_disposition, link_seconds, presign_get
from heygem_daemon.delivery.s3 import (
    MiB, StreamUpload, Throttle, Uploader, abort_stale_uploads, apply_lifecycle, crc32_b64, describe,
    lifecycle_rule, make_client, s3_checks,
)
from heygem_daemon.delivery.zipper import write_zip
from heygem_daemon.fs.files import sha256_file
from heygem_daemon.state import Store
from media_factory import write_noise_video, write_portrait_video
from s3_server import LimitedProxy, PartChecksums, credentials_env


@pytest.fixture(autouse=True)
def aws_env(monkeypatch):
    for k, v in credentials_env().items():
        monkeypatch.setenv(k, v)


@pytest.fixture
def store(tmp_path) -> Store:
    return Store(tmp_path / "heygem.db")


@pytest.fixture
def lacking(moto_server):
    proxy = LimitedProxy(moto_server).start()
    yield proxy
    proxy.stop()


def _delivery(store: Store, path: Path, key: str, rel: str | None = None):
    store.deliveries.ensure_batch("job1", "job1", "job1", None)
    return store.deliveries.add("job1", str(path), rel or path.name, path.stat().st_size, key, None)


def _upload(settings: S3, store: Store, d):
    return Uploader(make_client(settings), settings, store, Throttle(0), threading.Event()).upload(d)


def _get(url: str):
    with urllib.request.urlopen(url) as resp:
        return resp.read(), resp.headers


# --- nanio: a server that checks what moto lets through ----------------------------------------------


def test_nanio_takes_a_resumable_upload_and_the_object_matches_the_file(nanio_server, store, tmp_path):
    settings = S3(**nanio_server.s3_settings(nanio_server.new_bucket(), part_size_mb=5))
    video = write_noise_video(tmp_path / "big.mp4", 11)
    d = _delivery(store, video, "day/job1/tok/big.mp4")
    up = _upload(settings, store, d)
    body = nanio_server.client().get_object(Bucket=settings.bucket, Key=d.key)["Body"].read()
    assert hashlib.sha256(body).hexdigest() == up.sha256 == sha256_file(video)
    assert [p.number for p in store.deliveries.parts(d.id)] == [1, 2, 3]


def test_a_wrong_secret_key_is_an_operator_problem_naming_the_signature(nanio_server, store, tmp_path,
                                                                          monkeypatch):
    settings = S3(**nanio_server.s3_settings(nanio_server.new_bucket()))
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    video = write_portrait_video(tmp_path / "a.mp4", 0.4)
    with pytest.raises(ClientError) as caught:
        _upload(settings, store, _delivery(store, video, "day/job1/tok/a.mp4"))
    failure = describe(caught.value, settings.bucket)
    assert failure.code == "SignatureDoesNotMatch" and not failure.retryable
    assert "credentials" in failure.hint


def test_a_video_damaged_on_the_way_is_refused_and_not_counted_as_sent(nanio_server, store, tmp_path):
    proxy = LimitedProxy(nanio_server, lacking=(), corrupt_uploads=True).start()
    try:
        settings = S3(**proxy.s3_settings(nanio_server.new_bucket()))
        video = write_portrait_video(tmp_path / "a.mp4", 0.4)
        with pytest.raises(ClientError) as caught:
            _upload(settings, store, _delivery(store, video, "day/job1/tok/a.mp4"))
    finally:
        proxy.stop()
    assert caught.value.response["Error"]["Code"] == "BadDigest"
    with pytest.raises(ClientError):
        nanio_server.client().head_object(Bucket=settings.bucket, Key="day/job1/tok/a.mp4")


@pytest.fixture
def checking(nanio_server):
    """nanio behind a proxy that answers for part checksums as AWS documents (nanio itself checks none)."""
    proxy = LimitedProxy(nanio_server, lacking=(), checksums=PartChecksums()).start()
    yield proxy
    proxy.stop()


def test_parts_of_files_and_zips_carry_their_crc32_as_aws_checks_them_and_are_not_hashed_twice(
        checking, nanio_server, store, tmp_path):
    settings = S3(**checking.s3_settings(nanio_server.new_bucket(), part_size_mb=5))
    video = write_noise_video(tmp_path / "big.mp4", 6)
    up = _upload(settings, store, _delivery(store, video, "day/job1/tok/big.mp4"))
    stream = StreamUpload(make_client(settings), settings.bucket, "day/job1/tok/job1.zip", 5 * MiB, Throttle(0),
                          threading.Event(), lambda _: None, "job1.zip", part_concurrency=2)
    zip_sha256 = write_zip([(video, "big.mp4")], stream)  # type: ignore[arg-type]
    stream.finish()
    client = nanio_server.client()
    assert hashlib.sha256(client.get_object(Bucket=settings.bucket, Key="day/job1/tok/big.mp4")["Body"].read()
                          ).hexdigest() == up.sha256 == sha256_file(video)
    assert hashlib.sha256(client.get_object(Bucket=settings.bucket, Key="day/job1/tok/job1.zip")["Body"].read()
                          ).hexdigest() == zip_sha256
    parts = -(-video.stat().st_size // (5 * MiB))
    assert parts >= 2 and len(checking.checksums.part_payloads) == 2 * parts  # the video's parts, then the zip's
    assert set(checking.checksums.part_payloads) == {"UNSIGNED-PAYLOAD"}  # the CRC32 checks them instead


@pytest.mark.parametrize("declared", [True, False], ids=["crc32-upload", "upload-of-an-earlier-version"])
def test_a_resumed_upload_sends_its_parts_as_the_upload_was_created(checking, nanio_server, store, tmp_path,
                                                                      declared):
    settings = S3(**checking.s3_settings(nanio_server.new_bucket(), part_size_mb=5))
    video = write_noise_video(tmp_path / "big.mp4", 6)
    d = _delivery(store, video, "day/job1/tok/big.mp4")
    client = make_client(settings)
    extra = {"ChecksumAlgorithm": "CRC32"} if declared else {}
    upload_id = client.create_multipart_upload(Bucket=settings.bucket, Key=d.key, **extra)["UploadId"]
    store.deliveries.start_upload(d.id, upload_id)
    first = video.read_bytes()[:5 * MiB]  # sent before a crash, the store never heard of it
    client.upload_part(Bucket=settings.bucket, Key=d.key, UploadId=upload_id, PartNumber=1, Body=first,
                       **({"ChecksumCRC32": crc32_b64(first)} if declared else {}))
    up = _upload(settings, store, store.deliveries.get(d.id))
    assert up.sent_bytes == video.stat().st_size - 5 * MiB
    body = nanio_server.client().get_object(Bucket=settings.bucket, Key=d.key)["Body"].read()
    assert hashlib.sha256(body).hexdigest() == sha256_file(video)
    # The parts the resume sent: CRC32 and unsigned in an upload that declared it, signed without it otherwise.
    assert (set(checking.checksums.part_payloads[1:]) == {"UNSIGNED-PAYLOAD"}) is declared


def test_a_part_damaged_on_the_way_is_refused_by_its_crc32(nanio_server, store, tmp_path):
    proxy = LimitedProxy(nanio_server, lacking=(), corrupt_uploads=True, checksums=PartChecksums()).start()
    try:
        settings = S3(**proxy.s3_settings(nanio_server.new_bucket(), part_size_mb=5))
        d = _delivery(store, write_noise_video(tmp_path / "big.mp4", 6), "day/job1/tok/big.mp4")
        with pytest.raises(ClientError) as caught:
            _upload(settings, store, d)
    finally:
        proxy.stop()
    assert caught.value.response["Error"]["Code"] == "BadDigest"
    assert store.deliveries.parts(d.id) == []  # nothing counted as sent


def test_a_presigned_link_is_refused_after_its_expiry(nanio_server, tmp_path):
    # X-Amz-Date is in whole seconds, so a link of N seconds is good for N-1 to N seconds after signing:
    # three leave the first download room on a busy machine.
    settings = S3(**nanio_server.s3_settings(nanio_server.new_bucket(), link_expiry_hours=3 / 3600))
    client = nanio_server.client()
    client.put_object(Bucket=settings.bucket, Key="k/a.mp4", Body=b"video bytes")
    url = presign_get(make_client(settings), settings.bucket, "k/a.mp4", "a.mp4",
                      link_seconds(settings.link_expiry_hours))
    assert "X-Amz-Expires=3&" in url and _get(url)[0] == b"video bytes"
    signed = datetime.strptime(parse_qs(urlsplit(url).query)["X-Amz-Date"][0], "%Y%m%dT%H%M%SZ")
    time.sleep(max(0.0, signed.replace(tzinfo=timezone.utc).timestamp() + 3.2 - time.time()))  # past its end
    with pytest.raises(urllib.error.HTTPError) as refused:
        _get(url)
    assert refused.value.code == 403 and b"expired" in refused.value.read().lower()


def test_a_link_for_a_cjk_file_name_downloads_the_bytes_under_a_sane_name(nanio_server, store, tmp_path):
    settings = S3(**nanio_server.s3_settings(nanio_server.new_bucket()))
    video = write_portrait_video(tmp_path / "v.mp4", 0.4)
    d = _delivery(store, video, "2026-01-01/批次/tok/视频.mp4", rel="视频.mp4")
    _upload(settings, store, d)
    body, headers = _get(presign_get(make_client(settings), settings.bucket, d.key, d.rel, 60))
    assert body == video.read_bytes()
    disposition = headers["Content-Disposition"]
    assert disposition == content_disposition("视频.mp4")
    assert disposition.startswith('attachment; filename="ShiPin.mp4"; ')
    assert "filename*=UTF-8''%E8%A7%86%E9%A2%91.mp4" in disposition


def test_a_clock_off_by_twenty_minutes_is_explained_as_the_clock(nanio_server, monkeypatch):
    bucket = nanio_server.new_bucket()
    client = make_client(S3(**nanio_server.s3_settings(bucket)))
    late = botocore.auth.get_current_datetime() - timedelta(minutes=20)
    monkeypatch.setattr(botocore.auth, "get_current_datetime", lambda: late)
    with pytest.raises(ClientError) as caught:
        client.list_objects_v2(Bucket=bucket)
    failure = describe(caught.value, bucket)
    assert failure.code == "RequestTimeTooSkewed" and "clock" in failure.reason and "ntp" in failure.hint


# --- a server without ListParts, AbortMultipartUpload, ListMultipartUploads, lifecycle --------------------


def test_when_parts_cannot_be_listed_a_fresh_upload_goes_under_the_same_key(lacking, moto_server, store,
                                                                            tmp_path):
    bucket = moto_server.new_bucket()
    settings = S3(**lacking.s3_settings(bucket, part_size_mb=5))
    video = write_noise_video(tmp_path / "big.mp4", 11)
    d = _delivery(store, video, "day/job1/tok/big.mp4")
    cut_short = moto_server.client().create_multipart_upload(Bucket=bucket, Key=d.key)["UploadId"]
    store.deliveries.start_upload(d.id, cut_short)  # as if a run was killed mid-upload
    up = _upload(settings, store, store.deliveries.get(d.id))
    assert lacking.refused[:2] == ["ListParts", "AbortMultipartUpload"]
    assert up.sent_bytes == video.stat().st_size and store.deliveries.get(d.id).upload_id != cut_short
    body = moto_server.client().get_object(Bucket=bucket, Key=d.key)["Body"].read()
    assert hashlib.sha256(body).hexdigest() == sha256_file(video)


def test_a_call_the_server_lacks_is_explained_as_such_and_not_retried(lacking, moto_server):
    bucket = moto_server.new_bucket()
    client = make_client(S3(**lacking.s3_settings(bucket)))
    with pytest.raises(ClientError) as listing:
        abort_stale_uploads(client, bucket, "", set(), 0)
    with pytest.raises(ClientError) as lifecycle:
        apply_lifecycle(client, bucket, lifecycle_rule(Lifecycle(expire_days=7), ""))
    for exc, call in ((listing.value, "ListMultipartUploads"), (lifecycle.value, "GetBucketLifecycleConfiguration")):
        failure = describe(exc, bucket)
        assert failure.reason == f"the S3 server does not support {call} (501 NotImplemented)"
        assert not failure.retryable and "lacks that part of the API" in failure.hint


def test_a_missing_region_names_the_region_that_was_assumed(moto_server, tmp_path, monkeypatch):
    monkeypatch.delenv("AWS_DEFAULT_REGION", raising=False)
    monkeypatch.delenv("AWS_REGION", raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    bucket = moto_server.new_bucket()
    cfg = Config(base_dir=tmp_path, s3={"bucket": bucket, "endpoint_url": moto_server.endpoint,
                                         "addressing_style": "path"})
    [check] = s3_checks(cfg)
    assert check.ok and f"at {moto_server.endpoint} (region us-east-1, assumed: s3.region is not set)" in check.detail
