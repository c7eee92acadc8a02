"""The real daemon against S3 servers other than moto: nanio, which checks signatures, and a server lacking
parts of the API (a real proxy answering as s3rver 3.7.1 did: 405 ListParts/Abort, 501 listing/lifecycle)."""

from __future__ import annotations

import hashlib
import io
import json
import signal
import zipfile

import pytest

from daemon_harness import DaemonHarness
from heygem_daemon.cli import main
from media_factory import write_noise_video, write_portrait_video
from notify_receiver import Receiver
from s3_server import LimitedProxy, credentials_env
from test_delivery_daemon import log_events, other_tool_writes, s3_overrides, wait_delivered, wait_reported

pytestmark = pytest.mark.daemon  # starts the real daemon: left out of `make test-fast`


@pytest.fixture
def chat():
    receiver = Receiver().start()
    yield receiver
    receiver.stop()


def test_a_wrong_secret_key_alerts_once_shows_blocked_in_status_keeps_the_video_and_delivers_once_after_the_fix(
        nanio_server, chat, tmp_path, capsys):
    bucket = nanio_server.new_bucket()
    overrides = {**s3_overrides(nanio_server, bucket, alert_retry_seconds=600),
                 "notify": {"operator_urls": [chat.url("/operator")]}}
    harness = DaemonHarness(tmp_path / "base", overrides)
    harness.start({**credentials_env(), "AWS_SECRET_ACCESS_KEY": "a-typo-in-the-secret"})
    try:
        dest = other_tool_writes(harness, "keys", "clip.mp4", write_portrait_video(tmp_path / "clip.mp4", 0.6))
        [alert] = harness.wait_for(lambda: log_events(harness, "operator alert"), 60, "an operator alert")
        assert alert["alert"] == f"s3:SignatureDoesNotMatch:{bucket}" and "credentials" in alert["message"]
        chat.wait_delivered(1, path="/operator", containing=bucket)
        d = harness.store().deliveries.at(str(dest))
        assert d.state == "pending" and dest.is_file()
        assert "a-typo" not in harness.log_text()
        harness.stop()
        assert main(["-c", str(harness.config_path), "status", "--json"]) == 0
        [view] = json.loads(capsys.readouterr().out)["adhoc"]
        assert view["delivery"]["problem"]["blocked"] and "refused access" in view["delivery"]["problem"]["reason"]
        assert main(["-c", str(harness.config_path), "status"]) == 0
        assert "delivery open (1 pending) BLOCKED: S3 refused access" in capsys.readouterr().out
        harness.start(credentials_env())  # the operator fixes the secret and restarts
        done = wait_delivered(harness, dest)
        wait_reported(harness, d.batch_id)
    finally:
        harness.stop()
    body = nanio_server.client().get_object(Bucket=bucket, Key=done.key)["Body"].read()
    assert hashlib.sha256(body).hexdigest() == done.sha256
    assert len(log_events(harness, "batch reported", job="keys")) == 1
    assert len(log_events(harness, "operator alert")) == 1


def test_on_a_server_lacking_calls_a_kill_mid_zip_still_zips_and_lifecycle_is_one_warning(moto_server, tmp_path):
    proxy = LimitedProxy(moto_server).start()
    bucket = moto_server.new_bucket()
    overrides = s3_overrides(proxy, bucket, max_bandwidth_mb_s=6, lifecycle={"expire_days": 30},
                             key_prefix="heygem/{date}/{job}/{token}/{file}")
    harness = DaemonHarness(tmp_path / "base", overrides)
    try:
        harness.start(credentials_env())
        [warning] = harness.wait_for(lambda: log_events(harness, "bucket lifecycle rule not applied; delivery goes "
                                                                 "on without it"), 30, "the lifecycle warning")
        assert "does not support GetBucketLifecycleConfiguration (501 NotImplemented)" in warning["reason"]
        videos = [other_tool_writes(harness, "pair", f"{n}.mp4", write_noise_video(tmp_path / f"{n}.mp4", 5))
                  for n in ("one", "two")]
        batch_id = harness.wait_for(lambda: harness.store().deliveries.at(str(videos[0])), 30, "a delivery").batch_id
        harness.wait_for(lambda: harness.store().deliveries.batch(batch_id).zip_upload_id, 60,
                         "the zip upload to start")
        harness.kill(signal.SIGKILL)
        cut_short = harness.store().deliveries.batch(batch_id)
        harness.start(credentials_env())
        batch = wait_reported(harness, batch_id)
    finally:
        harness.stop()
        proxy.stop()
    assert batch.zip_key != cut_short.zip_key and batch.zip_sha256
    body = moto_server.client().get_object(Bucket=bucket, Key=batch.zip_key)["Body"].read()
    assert hashlib.sha256(body).hexdigest() == batch.zip_sha256
    with zipfile.ZipFile(io.BytesIO(body)) as zf:
        assert sorted(zf.namelist()) == ["one.mp4", "two.mp4"] and zf.read("two.mp4") == videos[1].read_bytes()
    assert "AbortMultipartUpload" in proxy.refused
    assert log_events(harness, "could not abort an unfinished multipart upload; carrying on")
    assert len(log_events(harness, "bucket lifecycle rule not applied; delivery goes on without it")) == 2  # 2 starts
    assert not log_events(harness, "operator alert") and not log_events(harness, "delivery failed; will retry")
    assert len(log_events(harness, "batch reported", job="pair")) == 1
