"""A remote worker's own set-up and what an attempt leaves behind, in-process: the checks a worker runs before it
takes a task (engine section, share mounted, bucket reached with its own key, against nanio, which checks
keys and signatures), the upload of a finished render across an object store outage, and the scratch folder
and multipart upload of an attempt that ended without finishing."""

from __future__ import annotations

import hashlib
import json
import threading
import time
from pathlib import Path

import pytest
import redis as redis_client
from media_factory import write_noise_video
from remote_rig import RedisServer
from s3_server import NanioServer, credentials_env, free_port

from heygem_daemon.config import load_config
from heygem_daemon.fs.files import sha256_file
from heygem_daemon.generation.celery_app import set_fence
from heygem_daemon.generation.remote_broker import broker_error
from heygem_daemon.generation.remote_setup import Presence, SetupProblem, live_workers, setup_problems, unserved
from heygem_daemon.generation.s3_worker import S3Side, discard_scratch, sweep_ended, upload_result

ENGINE = {"name": "command"}
COMMAND = {"args": ["true"]}


def worker_config(tmp_path: Path, remote: dict, **more) -> object:
    data = {"base_dir": str(tmp_path / "host"), "engine": ENGINE, "engines": {"command": COMMAND},
            "workers": {"devices": ["cpu"], "remote": {"broker_url": "redis://127.0.0.1:1/0", "queues": {"gpu": 1},
                                                       **remote}}, **more}
    (tmp_path / "worker.yaml").write_text(json.dumps(data))
    return load_config(tmp_path / "worker.yaml", environ={}, prepare=False)


@pytest.fixture
def keys(monkeypatch):
    for k, v in credentials_env().items():
        monkeypatch.setenv(k, v)


def test_a_worker_without_its_engines_section_fails_its_check_naming_the_section(tmp_path):
    cfg = worker_config(tmp_path, {}, engines={})
    (problem,) = setup_problems(cfg, "w@h")
    assert "engines.command" in problem.reason and "engines.command" in problem.hint


def test_a_path_map_to_an_unmounted_share_fails_the_check_and_a_mounted_one_passes(tmp_path):
    mount_point = tmp_path / "mnt"
    mount_point.mkdir()  # what an unmounted share looks like: the empty folder it would be mounted on
    cfg = worker_config(tmp_path, {"path_map": {"/srv/heygem": str(mount_point)}})
    (problem,) = setup_problems(cfg, "w@h")
    assert "not mounted" in problem.reason and "/srv/heygem" in problem.hint
    (mount_point / "work").mkdir()  # mounted: the daemon's folders are there
    assert setup_problems(cfg, "w@h") == []


def test_a_worker_whose_key_the_bucket_refuses_fails_its_check(tmp_path, nanio_server, monkeypatch):
    bucket = nanio_server.new_bucket()
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", credentials_env()["AWS_ACCESS_KEY_ID"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    cfg = worker_config(tmp_path, {"transfer": "s3"}, s3=nanio_server.s3_settings(bucket))
    (problem,) = setup_problems(cfg, "w@h")
    assert "cannot write to bucket" in problem.reason and "not-the-secret" not in problem.reason
    assert "credentials" in problem.hint


def test_a_worker_with_a_wrong_endpoint_fails_its_check(tmp_path, nanio_server, keys):
    s3 = {**nanio_server.s3_settings(nanio_server.new_bucket()), "endpoint_url": f"http://127.0.0.1:{free_port()}"}
    cfg = worker_config(tmp_path, {"transfer": "s3"}, s3={**s3, "connect_timeout": 1})
    (problem,) = setup_problems(cfg, "w@h")
    assert "cannot write to bucket" in problem.reason and "cannot reach S3" in problem.reason


def test_a_worker_with_its_key_passes_its_check_and_leaves_nothing_in_the_bucket(tmp_path, nanio_server, keys):
    bucket = nanio_server.new_bucket()
    s3 = nanio_server.s3_settings(bucket, key_prefix="studio/{token}/{file}")
    cfg = worker_config(tmp_path, {"transfer": "s3"}, s3=s3)
    assert setup_problems(cfg, "w@h") == []
    assert nanio_server.client().list_objects_v2(Bucket=bucket).get("KeyCount", 0) == 0


@pytest.fixture
def redis(tmp_path):
    server = RedisServer(tmp_path / "redis").start()
    yield server
    server.stop()


def test_a_queue_served_only_by_a_quarantined_worker_counts_as_unserved(redis):
    client = redis_client.Redis.from_url(redis.url)
    Presence(client, "good@a", "gpu", ["cuda:0"]).beat()
    bad = Presence(client, "bad@b", "cpu-queue", ["cpu"])
    bad.beat()
    assert unserved(["gpu", "cpu-queue", "nobody"], live_workers(client)) == ["nobody"]
    bad.problem([SetupProblem("the share is not mounted", "mount it")])
    since = live_workers(client)[0].problem["since"]
    time.sleep(0.01)
    bad.problem([SetupProblem("the share is not mounted", "mount it")])  # the next check, still failing
    workers = live_workers(client)
    assert workers[0].problem["since"] == since  # one problem since then: one alert
    assert [w.host for w in workers if w.problem] == ["bad@b"]
    assert unserved(["gpu", "cpu-queue"], workers) == ["cpu-queue"]
    assert live_workers(client, now=time.time() + 60) == []  # entries not refreshed: workers gone


def test_a_refused_redis_password_is_named_through_celerys_wrapping():
    import redis.exceptions

    try:
        try:
            raise redis.exceptions.AuthenticationError("invalid username-password pair or user is disabled.")
        except redis.exceptions.AuthenticationError as exc:
            raise RuntimeError("Retry limit exceeded while trying to reconnect to the Celery redis result "
                               "store backend. The Celery application must be restarted.") from exc
    except RuntimeError as wrapped:
        assert broker_error(wrapped).startswith("Redis refuses the password in workers.remote.broker_url")


@pytest.fixture
def own_nanio(tmp_path, keys):
    """A nanio server of this test's own, to be stopped and started again (its data stays on disk)."""
    server = NanioServer(tmp_path / "nanio.log").start()
    yield server
    server.stop()


def test_a_finished_video_waits_out_an_object_store_outage_mid_upload_and_completes_once(tmp_path, own_nanio):
    bucket = own_nanio.new_bucket()
    cfg = worker_config(tmp_path, {"transfer": "s3"}, s3=own_nanio.s3_settings(
        bucket, part_size_mb=5, part_concurrency=1, max_bandwidth_mb_s=10, retry_seconds=0.2, retry_max_seconds=0.5))
    side = S3Side(cfg)
    video = write_noise_video(tmp_path / "video.mp4", 11)
    outcome: dict = {}
    uploading = threading.Thread(target=lambda: outcome.update(up=upload_result(
        side, video, "day/j/v.mp4", "v.mp4", lambda: True, time.monotonic() + 60)))
    uploading.start()
    deadline = time.monotonic() + 30
    while not ((d := side.store().deliveries.at(str(video))) and side.store().deliveries.parts(d.id)):
        assert time.monotonic() < deadline, "no part landed"
        time.sleep(0.02)
    own_nanio.stop()  # the object store goes away with parts still to send
    time.sleep(1.0)
    own_nanio.start()
    uploading.join(60)
    up = outcome["up"]
    assert 0 < up.sent_bytes < video.stat().st_size  # resumed: the parts the store held were not sent again
    body = own_nanio.client().get_object(Bucket=bucket, Key="day/j/v.mp4")["Body"].read()
    assert hashlib.sha256(body).hexdigest() == sha256_file(video) == up.sha256
    assert own_nanio.client().list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []


def started_upload(side: S3Side, celery_id: str) -> Path:
    """A scratch folder whose video's multipart upload began (as a render killed mid-upload leaves it)."""
    scratch = side.work / celery_id
    scratch.mkdir(parents=True)
    video = scratch / "video.mp4"
    video.write_bytes(b"v" * 1024)
    store = side.store()
    store.deliveries.ensure_batch("remote-worker", "remote-worker", "", None)
    d = store.deliveries.add("remote-worker", str(video), "v.mp4", 1024, f"day/{celery_id}/v.mp4", None)
    upload = side.client().create_multipart_upload(Bucket=side.cfg.s3.bucket, Key=d.key)
    store.deliveries.start_upload(d.id, upload["UploadId"])
    return scratch


def test_an_ended_attempts_scratch_folder_and_upload_go_and_the_current_ones_stay(tmp_path, nanio_server, keys,
                                                                                  redis):
    bucket = nanio_server.new_bucket()
    cfg = worker_config(tmp_path, {"transfer": "s3", "broker_url": redis.url}, s3=nanio_server.s3_settings(bucket))
    side, client = S3Side(cfg), redis_client.Redis.from_url(redis.url)
    revoked, ended, current = (started_upload(side, f"heygem-{n}-1-abcd1234") for n in (1, 2, 3))
    set_fence(client, 3, current.name, 60)
    discard_scratch(side, revoked.name)  # what the worker does when the daemon revokes the attempt
    assert not revoked.exists()
    sweep_ended(side, client)  # at the worker's start and before each task: attempts whose fence is gone
    assert not ended.exists() and current.exists()
    uploads = nanio_server.client().list_multipart_uploads(Bucket=bucket).get("Uploads", [])
    assert [u["Key"] for u in uploads] == [f"day/{current.name}/v.mp4"]


def test_status_says_which_queue_no_worker_serves_and_which_worker_serves_a_queue_nobody_sends_to():
    from heygem_daemon.cli import _remote_lines

    lines = _remote_lines({
        "broker": "task broker r:6379", "down_since": None, "in_flight": {"gpu": 2}, "downloads_waiting": [],
        "unserved": {"gpu": time.time()},
        "workers": [{"host": "w@x", "devices": ["cuda:0"], "tasks": {}, "last_beat": None, "alive": True,
                     "queue": "gpu-old", "problem": None}]})
    assert lines[0].startswith("NO healthy worker serves queue gpu since ")
    assert "serves queue gpu-old, which this daemon does not send to" in lines[-1]


def test_a_queue_no_live_worker_serves_is_an_outage_the_operator_is_alerted_to(tmp_path, redis):
    from test_job_lifecycle import FakeClock
    from test_remote_dispatch import load, remote_config

    from heygem_daemon.generation.outages import OutageWatch
    from heygem_daemon.generation.remote import RemoteDispatcher
    from heygem_daemon.generation.lifecycle import LifeCycle
    from heygem_daemon.state import Store

    Presence(redis_client.Redis.from_url(redis.url), "w@x", "gpu-old", ["cpu"]).beat()
    data = remote_config(tmp_path, broker_url=redis.url)
    data["workers"]["outage_alert_seconds"] = 0.01
    cfg = load(tmp_path, data)
    life = LifeCycle(cfg, Store(cfg.folder("state") / "heygem.db"), clock=FakeClock())
    dispatcher = RemoteDispatcher(cfg, life, life.clock)
    dispatcher.step()
    (outage,) = dispatcher.outages()
    assert outage["dependency"] == "a worker for queue gpu" and "no healthy" in outage["reason"]
    alerts: list[str] = []
    time.sleep(0.02)  # past outage_alert_seconds
    OutageWatch(cfg, life.store, lambda key, message: alerts.append(key), others=dispatcher.outages).check()
    assert [key.rsplit("@", 1)[0] for key in alerts] == ["outage:a worker for queue gpu"]


def test_a_worker_whose_redis_password_is_refused_stops_with_a_config_error_naming_the_password(tmp_path):
    from heygem_daemon.config import ConfigError
    from heygem_daemon.generation.remote_worker import broker_client

    server = RedisServer(tmp_path / "redis", password="right").start()
    try:
        cfg = worker_config(tmp_path, {"broker_url": f"redis://:wrong@127.0.0.1:{server.port}/0"})
        with pytest.raises(ConfigError, match="refuses this worker's password") as refused:
            broker_client(cfg)
        assert "wrong" not in str(refused.value)
    finally:
        server.stop()


def test_doctor_on_a_worker_host_checks_its_own_set_up_not_the_daemons_folders(tmp_path, redis):
    from heygem_daemon.ops.doctor import run_checks

    worker_config(tmp_path, {"broker_url": redis.url})
    checks = {c.name: c for c in run_checks(tmp_path / "worker.yaml", environ={}, worker=True)}
    assert checks["task broker"].ok and checks["worker set-up"].ok
    assert not [name for name in checks if name.startswith("folder") or name == "s3"]


def test_the_example_worker_config_loads_and_its_check_says_what_is_left_to_fill_in():
    from daemon_harness import REPO

    cfg = load_config(REPO / "systemd" / "heygem-worker.example.yaml", environ={}, prepare=False)
    assert cfg.workers.remote is not None and cfg.folder("work") == Path("/var/lib/heygem-worker/work")
    # Its engines section is left to paste (the share at /srv/heygem may or may not be mounted here).
    assert "engines.heygem" in setup_problems(cfg, "w@h")[0].reason
