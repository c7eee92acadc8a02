"""Delivery through the real daemon process and a real moto S3 server: upload, links, zip, report, crashes."""

from __future__ import annotations

import getpass
import hashlib
import io
import json
import os
import shutil
import signal
import urllib.request
import uuid
import zipfile
from pathlib import Path
from typing import Any

import pytest

from daemon_harness import DaemonHarness
from heygem_daemon.delivery.links import content_disposition
from heygem_daemon.delivery.report import size_text
from heygem_daemon.fs.files import sha256_file
from media_factory import FIXTURES, PORTRAIT_JPG, write_noise_video, write_portrait_video, write_speech_wav
from notify_receiver import Receiver
from s3_server import MotoServer, credentials_env

pytestmark = pytest.mark.daemon  # starts the real daemon: left out of `make test-fast`

FAST_DELIVERY: dict[str, Any] = {"delivery": {"adhoc_quiet_seconds": 1}}


def s3_overrides(server: MotoServer, bucket: str, **s3: Any) -> dict[str, Any]:
    settings = {"part_size_mb": 5, "retry_seconds": 0.5, "retry_max_seconds": 1, "alert_retry_seconds": 1,
                "connect_timeout": 1, **s3}
    return {**FAST_DELIVERY, "s3": server.s3_settings(bucket, **settings)}


@pytest.fixture
def aws_env(monkeypatch):
    for k, v in credentials_env().items():
        monkeypatch.setenv(k, v)


def log_events(harness: DaemonHarness, event: str, **match: Any) -> list[dict[str, Any]]:
    lines = [json.loads(line) for line in harness.log_text().splitlines() if line.startswith("{")]
    return [e for e in lines if e.get("event") == event and all(e.get(k) == v for k, v in match.items())]


def audit_lines(harness: DaemonHarness) -> list[dict[str, Any]]:
    path = harness.folder("logs") / "audit.log"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def other_tool_writes(harness: DaemonHarness, folder: str, name: str, video: Path) -> Path:
    """Another generator writes straight into outputs/<folder>/ (no .part, no rename)."""
    dest = harness.folder("outputs") / folder / name
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(video, dest)
    return dest


def wait_delivered(harness: DaemonHarness, path: Path, timeout: float = 60):
    def linked():
        d = harness.store().deliveries.at(str(path))
        return d if d is not None and d.state == "linked" else None
    return harness.wait_for(linked, timeout, f"{path.name} to be delivered")


def wait_reported(harness: DaemonHarness, batch_id: str, timeout: float = 60):
    def reported():
        b = harness.store().deliveries.batch(batch_id)
        return b if b is not None and b.state == "reported" else None
    return harness.wait_for(reported, timeout, f"batch {batch_id} to be reported")


def fetch(url: str) -> tuple[bytes, Any]:
    with urllib.request.urlopen(url) as resp:
        return resp.read(), resp.headers


# --- one daemon uploading to the session's moto server -----------------------------------------------


@pytest.fixture(scope="module")
def chat():
    receiver = Receiver().start()
    yield receiver
    receiver.stop()


@pytest.fixture(scope="module")
def uploading(moto_server, chat, tmp_path_factory):
    env = pytest.MonkeyPatch()
    for k, v in credentials_env().items():
        env.setenv(k, v)
    bucket = moto_server.new_bucket()
    overrides = {**s3_overrides(moto_server, bucket), "notify": {"urls": [chat.url()]}}
    harness = DaemonHarness(tmp_path_factory.mktemp("uploading") / "base", overrides)
    harness.bucket = bucket  # type: ignore[attr-defined]
    yield harness.start()
    harness.stop()
    env.undo()


def test_a_batch_is_uploaded_linked_zipped_and_reported_once(uploading, moto_server, tmp_path):
    src = tmp_path / "batch"
    src.mkdir()
    write_speech_wav(src / "speech.wav", 1.0)
    shutil.copy(PORTRAIT_JPG, src / "anna.jpg")
    shutil.copy(PORTRAIT_JPG, src / "Grüße.png")
    os.rename(src, uploading.inbox / "batch")
    job = uploading.wait_job("batch")
    assert job.state == "done"
    batch = wait_reported(uploading, job.id)
    out = uploading.folder("outputs") / "batch"
    client = moto_server.client()

    links = json.loads((out / "links.json").read_text())
    assert [f["file"] for f in links["files"]] == ["Grüße.mp4", "anna.mp4"]
    for entry in links["files"]:
        local = out / entry["file"]
        assert entry["size"] == local.stat().st_size and entry["sha256"] == sha256_file(local)
        obj = client.get_object(Bucket=uploading.bucket, Key=entry["key"])["Body"].read()
        assert hashlib.sha256(obj).hexdigest() == entry["sha256"]
        body, headers = fetch(entry["link"])
        assert body == local.read_bytes()
        assert headers["Content-Disposition"] == content_disposition(entry["file"])
        assert entry["expires_at"] and entry["key"].split("/")[1] == "batch"
    assert (out / "links.txt").read_text().count("http") == 3

    zip_entry = links["zip"]
    assert zip_entry["file"] == batch.zip_name and zip_entry["file"].startswith("batch_")
    assert not (out / batch.zip_name).exists()
    assert zip_entry["path"] is None  # streamed into the bucket: no local copy to point at
    body, headers = fetch(zip_entry["link"])
    assert hashlib.sha256(body).hexdigest() == zip_entry["sha256"] and len(body) == zip_entry["size"]
    txt = (out / "links.txt").read_text()
    assert f"{batch.zip_name}  ({size_text(len(body))}, sha256 {zip_entry['sha256']})" in txt
    with zipfile.ZipFile(io.BytesIO(body)) as zf:
        assert sorted(zf.namelist()) == ["Grüße.mp4", "anna.mp4"]
        assert zf.read("anna.mp4") == (out / "anna.mp4").read_bytes()

    reports = log_events(uploading, "batch reported", job=job.name)
    assert len(reports) == 1 and reports[0]["videos"] == 2 and reports[0]["ok"] is True
    assert uploading.store().deliveries.summary(job.id) == {"state": "reported", "files": {"linked": 2},
                                                          "zip": batch.zip_name, "problem": None}

    audit = [a for a in audit_lines(uploading) if a["job"] == "batch"]
    assert sorted(a["event"] for a in audit) == ["delivery", "delivery", "zip"]
    assert all(a["owner"] == getpass.getuser() and a["job_id"] == job.id and a["dropped_at"] for a in audit)
    assert sum(a["bytes"] for a in audit if a["event"] == "delivery") == sum(f["size"] for f in links["files"])
    audit_text = (uploading.folder("logs") / "audit.log").read_text()
    assert "X-Amz" not in audit_text and "Signature" not in audit_text and "testing-secret" not in audit_text
    assert "X-Amz-Signature=" not in uploading.log_text()


def test_a_delivered_batch_sends_one_chat_message_with_every_link(uploading, chat, tmp_path):
    src = tmp_path / "chatty"
    src.mkdir()
    write_speech_wav(src / "speech.wav", 1.3)  # other content than the batch above, or it is a duplicate
    shutil.copy(PORTRAIT_JPG, src / "one.jpg")
    shutil.copy(PORTRAIT_JPG, src / "two.jpg")
    os.rename(src, uploading.inbox / "chatty")
    job = uploading.wait_job("chatty")
    wait_reported(uploading, job.id)
    links = json.loads((uploading.folder("outputs") / "chatty" / "links.json").read_text())
    [message] = chat.wait_delivered(1, containing="chatty")
    for entry in links["files"]:
        assert entry["link"] in message.text
    assert links["zip"]["link"] in message.text
    uploading.wait_for(lambda: all(n.state == "sent" for n in uploading.store().outbox.select(job.id)), 30,
                       "the outbox to mark the message sent")
    assert len(chat.delivered(containing="chatty")) == 1


def test_a_job_with_upload_false_stays_local_while_s3_is_configured(uploading, moto_server, chat, tmp_path):
    src = tmp_path / "private"
    src.mkdir()
    write_speech_wav(src / "speech.wav", 1.6)  # other content than the batches above, or it is a duplicate
    shutil.copy(PORTRAIT_JPG, src / "one.jpg")
    shutil.copy(PORTRAIT_JPG, src / "two.jpg")
    (src / "job.yaml").write_text("upload: false\n")
    os.rename(src, uploading.inbox / "private")
    job = uploading.wait_job("private")
    batch = wait_reported(uploading, job.id)
    out = uploading.folder("outputs") / "private"
    links = json.loads((out / "links.json").read_text())
    for entry in links["files"]:
        assert entry["link"] is None and entry["key"] is None and entry["path"] == str(out / entry["file"])
        assert entry["sha256"] == sha256_file(out / entry["file"])
    with zipfile.ZipFile(out / batch.zip_name) as zf:
        assert sorted(zf.namelist()) == ["one.mp4", "two.mp4"]
    assert links["zip"]["link"] is None and links["zip"]["path"] == str(out / batch.zip_name)
    listed = moto_server.client().list_objects_v2(Bucket=uploading.bucket).get("Contents", [])
    assert not [o["Key"] for o in listed if "/private" in o["Key"]]
    [message] = chat.wait_delivered(1, containing="private")
    assert "http" not in message.text


def test_a_video_another_tool_writes_into_outputs_is_delivered(uploading, moto_server, tmp_path):
    video = write_noise_video(tmp_path / "clip.mp4", 2)
    (uploading.folder("outputs") / "othertool").mkdir()
    (uploading.folder("outputs") / "othertool" / "next.mp4.part").write_bytes(b"still rendering")
    dest = other_tool_writes(uploading, "othertool", "clip.mp4", video)
    d = wait_delivered(uploading, dest)
    batch = wait_reported(uploading, d.batch_id)
    assert batch.job_id is None and batch.name == "othertool"
    obj = moto_server.client().get_object(Bucket=uploading.bucket, Key=d.key)["Body"].read()
    assert hashlib.sha256(obj).hexdigest() == sha256_file(video) == d.sha256
    links = json.loads((uploading.folder("outputs") / "othertool" / "links.json").read_text())
    assert [f["file"] for f in links["files"]] == ["clip.mp4"]
    assert links["zip"] is None and batch.zip_name is None  # one video: its own link is the download
    assert uploading.store().deliveries.at(str(dest.with_name("next.mp4.part"))) is None
    assert len(log_events(uploading, "batch reported", job="othertool")) == 1


# --- crashes and outages: a daemon each ---------------------------------------------------------------


def test_sigkill_mid_upload_resumes_sending_only_missing_parts(moto_server, aws_env, tmp_path):
    bucket = moto_server.new_bucket()
    harness = DaemonHarness(tmp_path / "base", s3_overrides(moto_server, bucket, max_bandwidth_mb_s=8))
    harness.start()
    video = write_noise_video(tmp_path / "big.mp4", 36)
    dest = other_tool_writes(harness, "big", "big.mp4", video)

    def some_parts():
        d = harness.store().deliveries.at(str(dest))
        return d if d and d.upload_id and len(harness.store().deliveries.parts(d.id)) >= 2 else None

    d = harness.wait_for(some_parts, 60, "two parts to be sent")
    harness.kill(signal.SIGKILL)
    before = {p.number: p for p in harness.store().deliveries.parts(d.id)}
    total = -(-video.stat().st_size // (5 * 1024 * 1024))
    assert harness.store().deliveries.get(d.id).state == "uploading" and len(before) < total

    harness.start()
    done = wait_delivered(harness, dest)
    harness.stop()
    obj = moto_server.client().get_object(Bucket=bucket, Key=done.key)["Body"].read()
    assert hashlib.sha256(obj).hexdigest() == sha256_file(video) == done.sha256
    puts = [n for upload, n in moto_server.part_puts(bucket) if upload == d.upload_id]
    assert sorted(set(puts)) == list(range(1, total + 1))
    assert len(puts) <= total + 1  # at most the one part in flight at the kill was sent twice
    assert all(puts.count(n) == 1 for n in before)  # parts recorded before the kill were never sent again
    after = {p.number: p for p in harness.store().deliveries.parts(d.id)}
    assert all(after[n].sent_at == p.sent_at for n, p in before.items())
    keys = [o["Key"] for o in moto_server.client().list_objects_v2(Bucket=bucket)["Contents"]]
    assert sum(k.endswith("/big.mp4") for k in keys) == 1


def test_s3_down_for_a_while_then_back_delivers_everything(aws_env, tmp_path):
    server = MotoServer(tmp_path / "moto.log").start()
    bucket = server.new_bucket()
    harness = DaemonHarness(tmp_path / "base", s3_overrides(server, bucket))
    harness.start()
    try:
        server.stop()
        dest = other_tool_writes(harness, "down", "clip.mp4", write_portrait_video(tmp_path / "clip.mp4", 0.6))
        harness.wait_for(lambda: len(log_events(harness, "delivery failed; will retry")) >= 2, 60,
                         "uploads to fail and retry")
        d = harness.store().deliveries.at(str(dest))
        assert d.state == "pending" and d.attempts >= 2 and "cannot reach S3" in d.last_error["reason"]
        server.start()
        server.client().create_bucket(Bucket=bucket)
        done = wait_delivered(harness, dest)
        obj = server.client().get_object(Bucket=bucket, Key=done.key)["Body"].read()
        assert hashlib.sha256(obj).hexdigest() == sha256_file(dest)
    finally:
        harness.stop()
        server.stop()


def test_missing_bucket_alerts_the_operator_keeps_the_video_and_delivers_after_restart(moto_server, aws_env,
                                                                                        chat, tmp_path):
    bucket = f"missing-{uuid.uuid4().hex[:8]}"
    overrides = {**s3_overrides(moto_server, bucket, alert_retry_seconds=600),
                 "notify": {"operator_urls": [chat.url("/operator")]}}
    harness = DaemonHarness(tmp_path / "base", overrides)
    harness.start()
    try:
        dest = other_tool_writes(harness, "nob", "clip.mp4", write_portrait_video(tmp_path / "clip.mp4", 0.6))
        alert = harness.wait_for(lambda: log_events(harness, "operator alert"), 60, "an operator alert")[0]
        assert alert["alert"] == f"s3:NoSuchBucket:{bucket}" and "does not exist" in alert["message"]
        [message] = chat.wait_delivered(1, path="/operator", containing=bucket)
        assert "does not exist" in message.text
        d = harness.store().deliveries.at(str(dest))
        assert d.state == "pending" and "s3.bucket" in d.last_error["hint"] and dest.is_file()
        assert harness.store().deliveries.batch(d.batch_id).state == "open"  # not reported while a video is stuck
        harness.stop()
        moto_server.client().create_bucket(Bucket=bucket)  # the operator fixes it and restarts
        harness.start()
        assert wait_delivered(harness, dest).sha256 == sha256_file(dest)
        wait_reported(harness, d.batch_id)
    finally:
        harness.stop()
    assert len(log_events(harness, "batch reported", job="nob")) == 1


def test_local_only_mode_writes_local_links_and_zip_and_reports_failures_too(tmp_path):
    harness = DaemonHarness(tmp_path / "base", {"delivery": {"adhoc_quiet_seconds": 1, "zip_min_videos": 1}})
    harness.start()
    try:
        write_speech_wav(tmp_path / "v.wav", 0.8)
        harness.drop(tmp_path / "v.wav", "alice.wav")
        harness.drop(PORTRAIT_JPG, "alice.jpg")
        harness.drop(tmp_path / "v.wav", "dave.wav")
        harness.drop(FIXTURES / "no_face.jpg", "dave.jpg")
        alice, dave = harness.wait_job("alice"), harness.wait_job("dave")
        batch = wait_reported(harness, alice.id)
        wait_reported(harness, dave.id)
    finally:
        harness.stop()
    out = harness.folder("outputs") / "alice"
    links = json.loads((out / "links.json").read_text())
    [entry] = links["files"]
    assert entry["link"] is None and entry["path"] == str(out / "alice.mp4")
    assert entry["sha256"] == sha256_file(out / "alice.mp4")
    with zipfile.ZipFile(out / batch.zip_name) as zf:
        assert zf.namelist() == ["alice.mp4"] and zf.read("alice.mp4") == (out / "alice.mp4").read_bytes()
    assert links["zip"]["path"] == str(out / batch.zip_name)
    assert links["zip"]["sha256"] == sha256_file(out / batch.zip_name)
    [ok] = log_events(harness, "batch reported", job="alice")
    [bad] = log_events(harness, "batch reported", job="dave")
    assert ok["ok"] is True and bad["ok"] is False and bad["failed"] == 1 and bad["videos"] == 0
    assert not (harness.folder("outputs") / "dave").exists()
