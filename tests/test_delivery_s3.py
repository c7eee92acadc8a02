"""The S3 side of delivery against a real moto server process: uploads, links, zips, bucket hygiene."""

import hashlib
import io
import os
import threading
import urllib.request
import zipfile
from datetime import datetime, timezone
from pathlib import Path

import pytest
from botocore.exceptions import ClientError

from heygem_daemon.config import S3, ConfigError, Lifecycle, load_config
from heygem_daemon.delivery.links import content_disposition, presign_get
from heygem_daemon.delivery.names import zip_name
from heygem_daemon.delivery.s3 import (
    MiB, StreamUpload, Throttle, Uploader, abort_stale_uploads, apply_lifecycle, describe, ensure_lifecycle,
    lifecycle_rule, make_client,
)
from heygem_daemon.delivery.zipper import entry_names, write_zip
from heygem_daemon.fs.files import sha256_file
from heygem_daemon.state import Store
from media_factory import write_noise_video, write_portrait_video
from s3_server import credentials_env, free_port


@pytest.fixture
def bucket(moto_server):
    return moto_server.new_bucket()


@pytest.fixture
def settings(moto_server, bucket, monkeypatch) -> S3:
    for k, v in credentials_env().items():
        monkeypatch.setenv(k, v)
    return S3(**moto_server.s3_settings(bucket, part_size_mb=5))


@pytest.fixture
def store(tmp_path) -> Store:
    return Store(tmp_path / "heygem.db")


def _delivery(store: Store, path: Path, key: str):
    store.deliveries.ensure_batch("job1", "job1", "job1", None)
    return store.deliveries.add("job1", str(path), path.name, path.stat().st_size, key, None)


def _uploader(settings: S3, store: Store) -> Uploader:
    return Uploader(make_client(settings), settings, store, Throttle(0), threading.Event())


def test_multipart_upload_records_each_part_and_the_object_matches_the_file(settings, store, tmp_path, moto_server):
    video = write_noise_video(tmp_path / "big.mp4", 12)
    d = _delivery(store, video, "day/job1/tok/big.mp4")
    up = _uploader(settings, store).upload(d)
    assert up.sha256 == sha256_file(video) and up.sent_bytes == video.stat().st_size
    parts = store.deliveries.parts(d.id)
    expected = -(-video.stat().st_size // (5 * MiB))
    assert expected >= 3 and [p.number for p in parts] == list(range(1, expected + 1))
    assert sum(p.size for p in parts) == video.stat().st_size
    body = moto_server.client().get_object(Bucket=settings.bucket, Key=d.key)["Body"].read()
    assert hashlib.sha256(body).hexdigest() == up.sha256


def test_resume_sends_only_the_parts_the_server_does_not_hold(settings, store, tmp_path, moto_server):
    video = write_noise_video(tmp_path / "big.mp4", 16)
    d = _delivery(store, video, "day/job1/tok/big.mp4")
    client = moto_server.client()
    upload_id = client.create_multipart_upload(Bucket=settings.bucket, Key=d.key)["UploadId"]
    store.deliveries.start_upload(d.id, upload_id)
    first_two = video.read_bytes()[: 10 * MiB]
    for n in (1, 2):  # as if a run before a crash had sent two parts (the store heard of neither)
        client.upload_part(Bucket=settings.bucket, Key=d.key, UploadId=upload_id, PartNumber=n,
                           Body=first_two[(n - 1) * 5 * MiB: n * 5 * MiB])
    up = _uploader(settings, store).upload(store.deliveries.get(d.id))
    assert up.sent_bytes == video.stat().st_size - 10 * MiB
    sent = sorted(n for u, n in moto_server.part_puts(settings.bucket) if u == upload_id)
    # Each part once: 1 and 2 only before the "crash".
    assert sent == list(range(1, len(store.deliveries.parts(d.id)) + 1))
    body = client.get_object(Bucket=settings.bucket, Key=d.key)["Body"].read()
    assert hashlib.sha256(body).hexdigest() == sha256_file(video)


def test_an_upload_gone_from_the_server_starts_over(settings, store, tmp_path, moto_server):
    video = write_noise_video(tmp_path / "big.mp4", 6)
    d = _delivery(store, video, "day/job1/tok/big.mp4")
    store.deliveries.start_upload(d.id, "an-upload-the-server-aborted")
    up = _uploader(settings, store).upload(store.deliveries.get(d.id))
    assert up.sent_bytes == video.stat().st_size
    assert store.deliveries.get(d.id).upload_id != "an-upload-the-server-aborted"
    head = moto_server.client().head_object(Bucket=settings.bucket, Key=d.key)
    assert head["ContentLength"] == video.stat().st_size and head["ContentType"] == "video/mp4"


def test_missing_bucket_is_an_operator_problem_not_a_retry(settings, store, tmp_path):
    video = write_portrait_video(tmp_path / "a.mp4", 0.4)
    missing = settings.model_copy(update={"bucket": "no-such-bucket"})
    with pytest.raises(ClientError) as err:
        _uploader(missing, store).upload(_delivery(store, video, "k/a.mp4"))
    failure = describe(err.value, "no-such-bucket")
    assert not failure.retryable and "does not exist" in failure.reason and "s3.bucket" in failure.hint


def test_endpoint_down_is_retryable(store, tmp_path, monkeypatch):
    for k, v in credentials_env().items():
        monkeypatch.setenv(k, v)
    down = S3(bucket="b", endpoint_url=f"http://127.0.0.1:{free_port()}", region="us-east-1", connect_timeout=1)
    video = write_portrait_video(tmp_path / "a.mp4", 0.4)
    with pytest.raises(Exception) as err:
        _uploader(down, store).upload(_delivery(store, video, "k/a.mp4"))
    assert describe(err.value, "b").retryable


def test_systemd_credentials_are_used_when_present(moto_server, bucket, tmp_path, monkeypatch):
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "aws_access_key_id").write_text("from-systemd\n")
    (creds / "aws_secret_access_key").write_text("secret-from-systemd\n")
    monkeypatch.delenv("AWS_ACCESS_KEY_ID", raising=False)
    client = make_client(S3(**moto_server.s3_settings(bucket)), environ={"CREDENTIALS_DIRECTORY": str(creds)})
    url = client.generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": "k"})
    assert "X-Amz-Credential=from-systemd%2F" in url


def test_presigned_link_downloads_the_bytes_and_names_the_file(settings, moto_server, tmp_path):
    video = write_portrait_video(tmp_path / "a.mp4", 0.4)
    key = "day/job/tok/Grüße Anna.mp4"
    moto_server.client().put_object(Bucket=settings.bucket, Key=key, Body=video.read_bytes())
    url = presign_get(make_client(settings), settings.bucket, key, "Grüße Anna.mp4", 3600)
    assert "X-Amz-Signature" in url and "X-Amz-Expires=3600" in url
    with urllib.request.urlopen(url) as resp:
        assert resp.read() == video.read_bytes()
        assert resp.headers["Content-Disposition"] == content_disposition("Grüße Anna.mp4")
    assert content_disposition("Grüße Anna.mp4") == (
        "attachment; filename=\"Grusse Anna.mp4\"; filename*=UTF-8''Gr%C3%BC%C3%9Fe%20Anna.mp4")
    assert content_disposition("alice.mp4") == 'attachment; filename="alice.mp4"'


def test_streamed_zip_upload_unzips_to_the_batch_names_and_its_sha256_is_the_objects(settings, moto_server,
                                                                                      tmp_path):
    a = write_noise_video(tmp_path / "a.mp4", 6)
    b = write_portrait_video(tmp_path / "b.mp4", 0.4)
    started = []
    stream = StreamUpload(make_client(settings), settings.bucket, "z/batch.zip", 5 * MiB, Throttle(0),
                          threading.Event(), started.append, "batch.zip", part_concurrency=3)
    sha256 = write_zip([(a, "a.mp4"), (b, "sub/b.mp4")], stream)  # type: ignore[arg-type]
    stream.finish()
    assert started == [stream.upload_id]
    body = moto_server.client().get_object(Bucket=settings.bucket, Key="z/batch.zip")["Body"].read()
    assert len(body) == stream.size and hashlib.sha256(body).hexdigest() == sha256
    with zipfile.ZipFile(io.BytesIO(body)) as zf:
        assert zf.namelist() == ["a.mp4", "sub/b.mp4"]
        assert all(i.compress_type == zipfile.ZIP_STORED for i in zf.infolist())
        assert zf.read("a.mp4") == a.read_bytes() and zf.read("sub/b.mp4") == b.read_bytes()


def test_zip_entry_names_never_escape_the_archive():
    names = entry_names(["../../etc/passwd.mp4", "/abs/x.mp4", "C:\\win\\y.mp4", "a/./b/../c.mp4", "x.mp4",
                         "X.mp4"])
    assert names == ["etc/passwd.mp4", "abs/x.mp4", "win/y.mp4", "a/b/c.mp4", "x.mp4", "X (2).mp4"]
    with pytest.raises(ValueError):
        entry_names([".."])


def test_lifecycle_rule_is_merged_with_the_rules_already_on_the_bucket(settings, moto_server):
    client = moto_server.client()
    theirs = {"ID": "owners-logs", "Status": "Enabled", "Filter": {"Prefix": "logs/"}, "Expiration": {"Days": 3}}
    client.put_bucket_lifecycle_configuration(Bucket=settings.bucket, LifecycleConfiguration={"Rules": [theirs]})
    ours = lifecycle_rule(Lifecycle(transition_ia_days=30, expire_days=60, abort_incomplete_days=7), "")
    apply_lifecycle(make_client(settings), settings.bucket, ours)
    apply_lifecycle(make_client(settings), settings.bucket, ours)  # again at the next start: still one of ours
    rules = {r["ID"]: r for r in client.get_bucket_lifecycle_configuration(Bucket=settings.bucket)["Rules"]}
    assert sorted(rules) == ["heygem-daemon", "owners-logs"]
    assert rules["owners-logs"]["Expiration"] == {"Days": 3}
    assert rules["heygem-daemon"]["Transitions"][0] == {"Days": 30, "StorageClass": "STANDARD_IA"}
    assert rules["heygem-daemon"]["AbortIncompleteMultipartUpload"] == {"DaysAfterInitiation": 7}


def test_a_lifecycle_rule_over_the_whole_bucket_is_refused_and_an_earlier_one_of_ours_removed(settings, moto_server):
    client = moto_server.client()
    theirs = {"ID": "owners-logs", "Status": "Enabled", "Filter": {"Prefix": "logs/"}, "Expiration": {"Days": 3}}
    earlier = lifecycle_rule(Lifecycle(expire_days=60), "")  # what the default key_prefix made before
    client.put_bucket_lifecycle_configuration(Bucket=settings.bucket,
                                              LifecycleConfiguration={"Rules": [theirs, earlier]})
    wanted = settings.model_copy(update={"key_prefix": "{date}/{job}/{token}/{file}",
                                         "lifecycle": Lifecycle(expire_days=60)})
    assert ensure_lifecycle(make_client(settings), wanted) is None
    rules = client.get_bucket_lifecycle_configuration(Bucket=settings.bucket)["Rules"]
    assert [r["ID"] for r in rules] == ["owners-logs"]
    alone = moto_server.new_bucket()  # our earlier rule was the bucket's only one
    client.put_bucket_lifecycle_configuration(Bucket=alone, LifecycleConfiguration={"Rules": [earlier]})
    assert ensure_lifecycle(make_client(settings), wanted.model_copy(update={"bucket": alone})) is None
    with pytest.raises(ClientError, match="NoSuchLifecycleConfiguration"):
        client.get_bucket_lifecycle_configuration(Bucket=alone)


def test_a_lifecycle_rule_covers_only_the_key_prefix_or_the_whole_bucket_when_config_says_so(settings, moto_server):
    client = moto_server.client()
    prefixed = settings.model_copy(update={"key_prefix": "heygem/{date}/{token}/{file}",
                                           "lifecycle": Lifecycle(expire_days=60)})
    assert ensure_lifecycle(make_client(settings), prefixed)["Filter"] == {"Prefix": "heygem/"}
    whole = settings.model_copy(update={"key_prefix": "{date}/{token}/{file}",
                                        "lifecycle": Lifecycle(expire_days=60, whole_bucket=True)})
    assert ensure_lifecycle(make_client(settings), whole)["Filter"] == {"Prefix": ""}
    [rule] = client.get_bucket_lifecycle_configuration(Bucket=settings.bucket)["Rules"]
    assert rule["ID"] == "heygem-daemon" and rule["Expiration"] == {"Days": 60}


def test_abort_stale_uploads_aborts_only_old_uploads_the_store_does_not_know(settings, moto_server):
    client = moto_server.client()
    known = client.create_multipart_upload(Bucket=settings.bucket, Key="heygem/a.mp4")["UploadId"]
    unknown = client.create_multipart_upload(Bucket=settings.bucket, Key="heygem/b.mp4")["UploadId"]
    elsewhere = client.create_multipart_upload(Bucket=settings.bucket, Key="other/c.mp4")["UploadId"]
    initiated = client.list_multipart_uploads(Bucket=settings.bucket)["Uploads"][0]["Initiated"]
    young = abort_stale_uploads(make_client(settings), settings.bucket, "heygem/", {known}, 48, now=initiated)
    assert young == []
    aborted = abort_stale_uploads(make_client(settings), settings.bucket, "heygem/", {known}, 48,
                                  now=datetime.now(timezone.utc))
    assert aborted == [("heygem/b.mp4", unknown)]
    left = {u["UploadId"] for u in client.list_multipart_uploads(Bucket=settings.bucket)["Uploads"]}
    assert left == {known, elsewhere}


def test_link_expiry_above_seven_days_is_refused_at_config_load(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("s3:\n  bucket: videos\n  link_expiry_hours: 200\n")
    with pytest.raises(ConfigError) as err:
        load_config(path, environ={}, prepare=False)
    assert "s3.link_expiry_hours" in str(err.value) and "168" in str(err.value)


def test_key_template_without_a_random_token_is_refused(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("s3:\n  key_prefix: '{date}/{job}/{file}'\n")
    with pytest.raises(ConfigError) as err:
        load_config(path, environ={}, prepare=False)
    assert "s3.key_prefix" in str(err.value) and "{token}" in str(err.value)


def test_an_endpoint_without_a_scheme_is_refused_by_config_check_in_one_line(tmp_path, capsys):
    from heygem_daemon.cli import main

    path = tmp_path / "config.yaml"
    path.write_text("s3:\n  bucket: videos\n  endpoint_url: 127.0.0.1:9000\n")
    assert main(["config", "check", str(path)]) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert "s3.endpoint_url" in line and "http://127.0.0.1:9000" in line


def _fallback(name: str) -> str:
    return content_disposition(name).split('filename="', 1)[1].split('"', 1)[0]


def test_a_name_in_another_script_keeps_a_transliterated_ascii_fallback():
    assert _fallback("视频.mp4") == "ShiPin.mp4" and _fallback("видео.mp4") == "video.mp4"
    assert _fallback(zip_name("陈老师的课程", 1796687940.0)).startswith("ChenLaoShiDeKeCheng_2026")


def test_a_name_of_symbols_only_gets_a_safe_ascii_fallback_never_a_bare_extension():
    for name in ("★★.mp4", "♪♫.mp4"):
        fallback = _fallback(name)
        assert fallback.startswith("video-") and fallback.endswith(".mp4") and len(fallback) == len("video-") + 12
    assert _fallback("★★.mp4") != _fallback("♪♫.mp4")  # two downloads, two names


def test_links_txt_writes_sizes_in_the_same_unit_as_the_chat_message(tmp_path):
    from heygem_daemon.delivery.links import LinkEntry, write_links
    from heygem_daemon.notify.messages import size_text as chat_size

    write_links(tmp_path, "links", "job", [LinkEntry("a.mp4", 220_400, str(tmp_path / "a.mp4"))], None,
                tmp_path / ".heygem-tmp")
    assert "a.mp4  (220.4 kB)" in (tmp_path / "links.txt").read_text() and chat_size(220_400) == "220.4 kB"


def test_a_links_write_killed_before_its_rename_leaves_no_temp_in_the_customers_folder(tmp_path):
    from heygem_daemon.delivery.links import HIDDEN_TEMPS, LinkEntry, write_links
    from heygem_daemon.fs.ops import is_own_temp

    folder, temps = tmp_path / "outputs" / "job", tmp_path / "outputs" / HIDDEN_TEMPS
    pid = os.fork()
    if pid == 0:  # the daemon, killed between writing links.json's temp and renaming it into place
        os.replace = lambda *_args: os._exit(9)  # type: ignore[assignment]
        write_links(folder, "links", "job", [LinkEntry("a.mp4", 1, str(folder / "a.mp4"))], None, temps)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 9
    assert list(folder.iterdir()) == []
    [left] = temps.iterdir()
    assert is_own_temp(left.name)  # the temp sweep's to remove
