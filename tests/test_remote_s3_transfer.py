"""Remote workers without a shared folder (workers.remote.transfer: s3), in-process against a real moto server
and a real redis-server: the config, what a task carries, the fence, and the video recorded before it lands
(the real daemon and workers are in test_remote_s3.py)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import wait
from pathlib import Path

import pytest
import redis as redis_client
from daemon_harness import REPO
from remote_rig import RedisServer
from s3_server import LimitedProxy, MotoServer, credentials_env, free_port
from test_job_lifecycle import FakeClock, claimed

from heygem_daemon.cli import _remote_lines
from heygem_daemon.config import S3, ConfigError, Remote, load_config
from heygem_daemon.delivery.s3 import MiB, Superseded, Throttle, Uploader, make_client
from heygem_daemon.failures import Kind, Problem
from heygem_daemon.fs.files import sha256_file
from heygem_daemon.generation.celery_app import (
    attempt_part, drop_fence, fence_holds, fence_key, make_app, set_fence,
)
from heygem_daemon.generation.lifecycle import JobFinished, LifeCycle, request_cancel
from heygem_daemon.generation.remote import Flight, RemoteDispatcher
from heygem_daemon.generation.remote_worker import _fence
from heygem_daemon.generation.s3_transfer import link_seconds_for
from heygem_daemon.generation.remote_setup import Presence, SetupProblem
from heygem_daemon.generation.s3_worker import S3Side, TaskFailed, check_payload, fetch_input, upload_result
from heygem_daemon.generation.workers import Attempt, task_spec
from heygem_daemon.state import Store
from media_factory import write_noise_video


@pytest.fixture
def bucket(moto_server, monkeypatch):
    for k, v in credentials_env().items():
        monkeypatch.setenv(k, v)
    return moto_server.new_bucket()


@pytest.fixture
def redis(tmp_path):
    server = RedisServer(tmp_path / "redis").start()
    yield server
    server.stop()


def config(tmp_path: Path, moto_server, bucket: str | None, **remote):
    data = {"base_dir": str(tmp_path), "workers": {"devices": [], "remote": {
        "broker_url": f"redis://127.0.0.1:{free_port()}/0", "queues": {"gpu": 2}, "transfer": "s3", **remote}}}
    if bucket:
        data["s3"] = moto_server.s3_settings(bucket, part_size_mb=5)
    (tmp_path / "config.yaml").write_text(json.dumps(data))
    return load_config(tmp_path / "config.yaml", environ={})


def dispatcher(tmp_path: Path, moto_server, bucket: str) -> RemoteDispatcher:
    cfg = config(tmp_path, moto_server, bucket)
    return RemoteDispatcher(cfg, LifeCycle(cfg, Store(cfg.folder("state") / "heygem.db"), clock=FakeClock()))


def test_transfer_s3_without_an_s3_section_is_refused_with_the_fix(tmp_path, moto_server):
    with pytest.raises(ConfigError, match="transfer: s3 needs the s3 section"):
        config(tmp_path, moto_server, None)
    assert config(tmp_path, moto_server, None, transfer="shared").workers.remote.transfer == "shared"


def test_input_links_live_as_long_as_the_visibility_timeout_and_never_beyond_seven_days():
    assert link_seconds_for(3600) == 3600
    assert link_seconds_for(30 * 24 * 3600) == 7 * 24 * 3600


def test_a_task_travels_with_links_to_its_inputs_and_every_attempt_targets_one_key(tmp_path, moto_server, bucket):
    remote = dispatcher(tmp_path, moto_server, bucket)
    life = remote.life
    job = claimed(life, "alice", pairs=2, media=True)
    first = life.take("remote:gpu")
    _, spec = task_spec(remote.cfg, life, first, "remote:gpu")
    sent = json.loads(json.dumps(remote.s3.payload({}, first, spec)))
    assert sent["transfer"] == "s3" and sent["object"]["name"] == "v0.mp4"
    for name in ("audio", "portrait"):
        with urllib.request.urlopen(sent["links"][name]) as got:
            assert got.read() == getattr(spec, name).read_bytes()
    key = sent["object"]["key"]
    assert key.endswith("/alice/" + key.split("/")[-2] + "/v0.mp4")  # {date}/{job}/{token}/{file}, as delivery
    life.attempt_failed(first, Problem(Kind.ENGINE, "generate", "worker silent"), "remote:gpu")
    life.clock.advance(3600)
    again = life.take("remote:gpu")
    assert again.id == first.id and again.attempts == 2
    assert remote.s3.payload({}, again, spec)["object"]["key"] == key == life.store.tasks.get(first.id).object_key
    assert life.store.tasks.select(job.id)[1].object_key is None  # the other task gets its own key when sent


def test_a_jobs_inputs_are_uploaded_once_for_all_its_tasks(tmp_path, moto_server, bucket):
    remote = dispatcher(tmp_path, moto_server, bucket)
    life = remote.life
    job = claimed(life, "bob", pairs=3, media=True)
    for _ in range(3):
        task = life.take("remote:gpu")
        remote.s3.payload({}, task, task_spec(remote.cfg, life, task, "remote:gpu")[1])
    restarted = dispatcher(tmp_path, moto_server, bucket)  # a new run knows nothing staged: it asks the bucket
    task = life.store.tasks.select(job.id)[0]
    restarted.s3.payload({}, task, task_spec(restarted.cfg, life, task, "remote:gpu")[1])
    prefix = remote.transfer.staging_prefix(job.id)
    puts = re.findall(rf'"PUT /{bucket}/{re.escape(prefix)}(\S+) ', moto_server.log_path.read_text())
    assert sorted(puts) == ["face.jpg", "voice.wav"]


def test_the_fence_names_one_attempt_and_an_ended_attempt_never_drops_a_newer_ones(tmp_path):
    redis = RedisServer(tmp_path / "redis").start()
    try:
        client = make_app(Remote(broker_url=redis.url, queues={"gpu": 1}), sender=True).backend.client
        set_fence(client, 7, "attempt-1", 60)
        assert fence_holds(client, 7, "attempt-1")
        set_fence(client, 7, "attempt-2", 60)  # the daemon sent the task again
        assert not fence_holds(client, 7, "attempt-1") and fence_holds(client, 7, "attempt-2")
        drop_fence(client, 7, "attempt-1")  # the late end of the first changes nothing
        assert fence_holds(client, 7, "attempt-2")
        drop_fence(client, 7, "attempt-2")
        assert not fence_holds(client, 7, "attempt-2")
    finally:
        redis.stop()


@pytest.mark.parametrize("megabytes", [1, 12], ids=["one-put", "multipart"])
def test_an_upload_whose_fence_says_no_leaves_no_object_and_no_open_upload(tmp_path, moto_server, bucket, megabytes):
    settings = S3(**moto_server.s3_settings(bucket, part_size_mb=5))
    store = Store(tmp_path / "worker.db")
    video = write_noise_video(tmp_path / "v.mp4", megabytes) if megabytes > 1 else tmp_path / "v.mp4"
    if megabytes == 1:
        video.write_bytes(b"x" * MiB)
    store.deliveries.ensure_batch("w", "w", "", None)
    d = store.deliveries.add("w", str(video), "v.mp4", video.stat().st_size, "day/j/tok/v.mp4", None)
    with pytest.raises(Superseded):
        Uploader(make_client(settings), settings, store, Throttle(0), threading.Event()).upload(d, lambda: False)
    client = moto_server.client()
    assert client.list_objects_v2(Bucket=bucket).get("KeyCount", 0) == 0
    assert client.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []


def fenced_upload(cfg, client, video: Path, deadline: float) -> tuple[threading.Thread, dict]:
    """The worker's last step, the upload of a finished render under its attempt's fence, on a thread."""
    outcome: dict = {}

    def upload() -> None:
        try:
            outcome["up"] = upload_result(S3Side(cfg), video, "day/j/tok/v.mp4", "v.mp4",
                                          _fence(client, 7, "attempt-1", "task broker", deadline), deadline)
        except TaskFailed as failed:
            outcome["failed"] = failed.outcome

    thread = threading.Thread(target=upload)
    thread.start()
    return thread, outcome


def test_a_finished_upload_waits_for_redis_to_confirm_its_attempt_and_then_completes(tmp_path, moto_server, bucket,
                                                                                    redis):
    cfg = config(tmp_path, moto_server, bucket, broker_url=redis.url)
    client = make_app(cfg.workers.remote).backend.client  # the worker's
    set_fence(client, 7, "attempt-1", 600)
    video = write_noise_video(tmp_path / "video.mp4", 12)  # multipart: 5 MB parts
    redis.stop()  # a blink exactly when the render is done
    uploading, outcome = fenced_upload(cfg, client, video, time.monotonic() + 60)
    s3 = moto_server.client()

    parts = -(-video.stat().st_size // (cfg.s3.part_size_mb * 1024 * 1024))
    assert parts > 1

    def all_parts_sent() -> bool:
        uploads = s3.list_multipart_uploads(Bucket=bucket).get("Uploads", [])
        return len(uploads) == 1 and len(s3.list_parts(Bucket=bucket, Key=uploads[0]["Key"],
                                                        UploadId=uploads[0]["UploadId"]).get("Parts", [])) == parts
    deadline = time.monotonic() + 30
    while not all_parts_sent():  # the upload reaches the fence, where it waits for Redis
        assert time.monotonic() < deadline and uploading.is_alive(), outcome
        time.sleep(0.1)
    time.sleep(1.0)  # a while at the fence: still open, nothing completed, nothing aborted
    assert uploading.is_alive() and s3.list_objects_v2(Bucket=bucket).get("KeyCount", 0) == 0
    assert len(s3.list_multipart_uploads(Bucket=bucket).get("Uploads", [])) == 1
    redis.start()
    uploading.join(30)
    assert "failed" not in outcome and outcome["up"].sha256 == sha256_file(video)
    body = s3.get_object(Bucket=bucket, Key="day/j/tok/v.mp4")["Body"].read()
    assert hashlib.sha256(body).hexdigest() == sha256_file(video)


def test_a_fence_redis_never_confirms_before_the_time_limit_is_an_outage_and_completes_nothing(
        tmp_path, moto_server, bucket, redis):
    cfg = config(tmp_path, moto_server, bucket, broker_url=redis.url)
    client = make_app(cfg.workers.remote).backend.client
    video = write_noise_video(tmp_path / "video.mp4", 12)
    redis.stop()
    uploading, outcome = fenced_upload(cfg, client, video, time.monotonic() + 1)
    uploading.join(30)
    assert outcome["failed"]["kind"] == "outage" and outcome["failed"]["dependency"] == "task broker"
    assert "time limit" in outcome["failed"]["hint"]
    s3 = moto_server.client()
    assert s3.list_objects_v2(Bucket=bucket).get("KeyCount", 0) == 0
    assert s3.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []


def test_a_refused_input_link_is_a_counted_error_and_an_unreachable_store_an_outage(tmp_path, moto_server, bucket):
    missing = make_client(S3(**moto_server.s3_settings(bucket))).generate_presigned_url(
        "get_object", Params={"Bucket": bucket, "Key": "gone.wav"}, ExpiresIn=60)
    with pytest.raises(TaskFailed) as refused:
        fetch_input(missing, tmp_path / "in" / "gone.wav", 5)
    assert refused.value.outcome["kind"] == "internal" and "refused (404" in refused.value.outcome["reason"]
    assert "fresh links" in refused.value.outcome["hint"]
    port = free_port()
    with pytest.raises(TaskFailed) as down:
        fetch_input(f"http://127.0.0.1:{port}/{bucket}/a.wav?X-Amz-Signature=abc", tmp_path / "in" / "a.wav", 5)
    assert down.value.outcome["kind"] == "outage"
    assert down.value.outcome["dependency"] == f"object store 127.0.0.1:{port}"
    assert not list((tmp_path / "in").iterdir())


def worker_side(tmp_path: Path, moto_server, bucket: str) -> tuple[S3Side, dict]:
    """A worker whose s3 section keeps its objects under `studio/`, and a task payload it accepts."""
    s3 = moto_server.s3_settings(bucket, key_prefix="studio/{date}/{job}/{token}/{file}")
    data = {"base_dir": str(tmp_path), "s3": s3,
            "workers": {"devices": ["cpu"], "remote": {"broker_url": "redis://127.0.0.1:1/0", "queues": {"gpu": 1},
                                                       "transfer": "s3"}}}
    (tmp_path / "worker.yaml").write_text(json.dumps(data))
    side = S3Side(load_config(tmp_path / "worker.yaml", environ={}))
    link = side.client().generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": "studio/in/a.wav"},
                                                ExpiresIn=60)
    payload = {"links": {"audio": link, "portrait": link}, "object": {"key": "studio/day/j/v.mp4", "name": "v.mp4"}}
    check_payload(side, payload)
    return side, payload


@pytest.mark.parametrize("link", [
    "file:///etc/heygem/heygem-worker.env", "ftp://127.0.0.1/a.wav", "http://169.254.169.254/latest/meta-data/",
    "http://127.0.0.1:{other}/{bucket}/studio/in/a.wav"], ids=["file", "ftp", "metadata-service", "other-port"])
def test_a_worker_refuses_an_input_link_to_anything_but_its_object_store(tmp_path, moto_server, bucket, link):
    side, payload = worker_side(tmp_path, moto_server, bucket)
    payload["links"]["portrait"] = link.format(other=free_port(), bucket=bucket)
    with pytest.raises(SetupProblem) as refused:  # the worker's set-up (its endpoint), not the task, is at fault
        check_payload(side, payload)
    problem = refused.value
    assert "input portrait" in problem.reason and "refused" in problem.reason
    assert "X-Amz" not in problem.reason and "s3.endpoint_url" in problem.hint


@pytest.mark.parametrize("key", ["other/day/j/v.mp4", "studio/../other/v.mp4"], ids=["elsewhere", "dot-dot"])
def test_a_worker_refuses_to_upload_outside_its_key_prefix(tmp_path, moto_server, bucket, key):
    side, payload = worker_side(tmp_path, moto_server, bucket)
    payload["object"]["key"] = key
    with pytest.raises(SetupProblem) as refused:
        check_payload(side, payload)
    assert "outside this worker's key prefix 'studio/'" in refused.value.reason
    assert "s3.key_prefix" in refused.value.hint


def sent(remote: RemoteDispatcher, task) -> dict:
    return remote.s3.payload({}, task, task_spec(remote.cfg, remote.life, task, "remote:gpu")[1])


def finish_remotely(remote: RemoteDispatcher, task, body: bytes, sha256: str | None = None) -> tuple[str, str]:
    """The task's worker put `body` at the task's key and reported success; the daemon finishes the attempt.
    Returns the key and the object's ETag."""
    key = sent(remote, task)["object"]["key"]
    up = remote.transfer.client.put_object(Bucket=remote.cfg.s3.bucket, Key=key, Body=body)
    part = attempt_part(task.output, task.attempts)
    part.parent.mkdir(parents=True, exist_ok=True)
    info = {"ok": True, "key": key, "etag": up["ETag"], "size": len(body),
            "sha256": sha256 or hashlib.sha256(body).hexdigest()}
    settle(remote, Flight(task, "gpu", None, part, 1.0, 1.0), info)
    return key, up["ETag"]


def settle(remote: RemoteDispatcher, flight: Flight, info: dict) -> None:
    """A success reported by the worker, as the loop finishes it: the download runs on a transfer thread and
    is collected by a later step."""
    if not remote._finish(flight, Attempt(True), info):
        wait([flight.transfer])
        assert remote._advance(flight, False, None, lambda: None)


def finished_remotely(remote: RemoteDispatcher, body: bytes, sha256: str | None = None):
    job = claimed(remote.life, "carol", media=True)
    task = remote.life.take("remote:gpu")
    key, etag = finish_remotely(remote, task, body, sha256)
    return job, remote.store.tasks.get(task.id), key, etag


def staged(remote: RemoteDispatcher, job_id: str) -> int:
    prefix = remote.transfer.staging_prefix(job_id)
    return remote.transfer.client.list_objects_v2(Bucket=remote.cfg.s3.bucket, Prefix=prefix).get("KeyCount", 0)


def test_a_remote_video_is_downloaded_and_recorded_as_already_uploaded(tmp_path, moto_server, bucket):
    remote = dispatcher(tmp_path, moto_server, bucket)
    video = write_noise_video(tmp_path / "made.mp4", 1)
    job, task, key, etag = finished_remotely(remote, video.read_bytes())
    assert task.state == "done" and Path(task.output).read_bytes() == video.read_bytes()
    d = remote.store.deliveries.at(task.output)
    assert (d.state, d.key, d.etag, d.sha256, d.size) == ("uploaded", key, etag, sha256_file(video),
                                                          video.stat().st_size)
    assert d.batch_id == job.id and d.rel == "v0.mp4"
    assert not list(Path(task.output).parent.glob("*.part"))


def test_an_empty_remote_video_fails_the_check_and_leaves_no_delivery_record(tmp_path, moto_server, bucket):
    remote = dispatcher(tmp_path, moto_server, bucket)
    _, task, _, _ = finished_remotely(remote, b"")
    assert task.state == "queued" and "no output" in task.last_error["reason"]
    assert remote.store.deliveries.at(task.output) is None and not Path(task.output).exists()


def test_an_object_that_is_not_what_the_worker_uploaded_is_a_counted_retry(tmp_path, moto_server, bucket):
    remote = dispatcher(tmp_path, moto_server, bucket)
    _, task, _, _ = finished_remotely(remote, b"overwritten", sha256="0" * 64)
    assert task.state == "queued" and task.attempts == 1 and "sha256 differs" in task.last_error["reason"]
    assert remote.store.deliveries.at(task.output) is None and not Path(task.output).exists()


def test_a_jobs_staged_inputs_stay_while_it_runs_and_go_once_it_has_finished(tmp_path, moto_server, bucket):
    remote = dispatcher(tmp_path, moto_server, bucket)
    remote.transfer.delete_ended()  # the start's look for leftovers: none
    job = claimed(remote.life, "dave", pairs=2, media=True)
    first, second = remote.life.take("remote:gpu"), remote.life.take("remote:gpu")
    sent(remote, second)
    video = write_noise_video(tmp_path / "made.mp4", 1).read_bytes()
    finish_remotely(remote, first, video)
    remote.transfer.delete_ended()
    assert staged(remote, job.id) == 2  # the second task still needs them
    finish_remotely(remote, second, video)
    assert remote.store.jobs.state(job.id) == "done"
    remote.transfer.delete_ended()
    assert staged(remote, job.id) == 0


def test_staged_inputs_a_crash_left_behind_go_at_the_next_start(tmp_path, moto_server, bucket):
    crashed = dispatcher(tmp_path, moto_server, bucket)
    job, _, _, _ = finished_remotely(crashed, write_noise_video(tmp_path / "made.mp4", 1).read_bytes())
    assert staged(crashed, job.id) == 2  # it died before deleting them
    running = claimed(crashed.life, "erin", media=True)
    sent(crashed, crashed.life.take("remote:gpu"))
    restarted = dispatcher(tmp_path, moto_server, bucket)
    restarted.transfer.delete_ended()
    assert staged(restarted, job.id) == 0 and staged(restarted, running.id) == 2


def test_a_second_daemon_sharing_the_bucket_and_prefix_keeps_its_running_jobs_inputs(tmp_path, moto_server, bucket):
    for host in ("a", "b"):
        (tmp_path / host).mkdir()
    running = dispatcher(tmp_path / "a", moto_server, bucket)
    job = claimed(running.life, "nina", media=True)
    sent(running, running.life.take("remote:gpu"))
    other = dispatcher(tmp_path / "b", moto_server, bucket)  # same bucket and key prefix, its own store
    other.transfer.delete_ended()  # its start's look for leftovers
    assert staged(running, job.id) == 2


def test_inputs_of_a_job_whose_end_was_announced_before_its_state_was_written_go_once_it_is(tmp_path, moto_server,
                                                                                           bucket):
    remote = dispatcher(tmp_path, moto_server, bucket)
    remote.transfer.delete_ended()  # the start's look for leftovers: none
    job = claimed(remote.life, "olga", media=True)
    seen = []
    # The dispatcher's sweep runs between JobFinished and the job's final state (it runs on another thread).
    remote.life.events.subscribe(JobFinished, lambda _: (remote.transfer.delete_ended(),
                                                         seen.append(remote.store.jobs.state(job.id))))
    finish_remotely(remote, remote.life.take("remote:gpu"), write_noise_video(tmp_path / "made.mp4", 1).read_bytes())
    assert seen and seen[0] != "done" and staged(remote, job.id) == 2
    assert remote.store.jobs.state(job.id) == "done"
    remote.transfer.delete_ended()  # the dispatcher's next step
    assert staged(remote, job.id) == 0


def test_an_upload_false_jobs_video_passes_through_the_jobs_staging_folder_and_stays_local(tmp_path, moto_server,
                                                                                         bucket):
    remote = dispatcher(tmp_path, moto_server, bucket)
    job = claimed(remote.life, "frank", media=True, upload=False)
    task = remote.life.take("remote:gpu")
    key, _ = finish_remotely(remote, task, write_noise_video(tmp_path / "made.mp4", 1).read_bytes())
    assert key == remote.transfer.staging_prefix(job.id) + "out/v0.mp4"
    assert Path(task.output).is_file() and remote.store.deliveries.at(task.output) is None  # delivery keeps it local
    remote.transfer.delete_ended()
    assert staged(remote, job.id) == 0


def test_a_finished_video_gone_from_the_bucket_is_a_counted_attempt(tmp_path, moto_server, bucket):
    remote = dispatcher(tmp_path, moto_server, bucket)
    claimed(remote.life, "hal", media=True)
    task = remote.life.take("remote:gpu")
    key = sent(remote, task)["object"]["key"]  # nothing there: deleted since the worker's upload
    part = attempt_part(task.output, task.attempts)
    settle(remote, Flight(task, "gpu", None, part, 1.0, 1.0), {"ok": True, "key": key, "sha256": "0" * 64})
    task = remote.store.tasks.get(task.id)
    assert (task.state, task.attempts, task.last_error["kind"]) == ("queued", 1, "internal")
    assert "not in the bucket" in task.last_error["reason"] and remote.outages() == []


def live(tmp_path: Path, s3: dict, redis: RedisServer) -> RemoteDispatcher:
    """A dispatcher on a real redis-server whose queue no worker process serves: the tests play the worker
    (and its entry in Redis, so the queue counts as served)."""
    Presence(redis_client.Redis.from_url(redis.url), "tests@here", "gpu", ["cpu"]).beat()
    data = {"base_dir": str(tmp_path), "s3": s3, "workers": {"devices": [], "remote": {
        "broker_url": redis.url, "queues": {"gpu": 2}, "transfer": "s3"}}}
    (tmp_path / "config.yaml").write_text(json.dumps(data))
    cfg, clock = load_config(tmp_path / "config.yaml", environ={}), FakeClock()
    return RemoteDispatcher(cfg, LifeCycle(cfg, Store(cfg.folder("state") / "heygem.db"), clock=clock), clock)


def steps_until(remote: RemoteDispatcher, done, what: str) -> None:
    """The dispatcher's steps, as its loop runs them, until `done()`: transfers end on their own threads."""
    deadline = time.monotonic() + 30
    while not done():
        assert time.monotonic() < deadline, f"no {what} after 30 s"
        remote.step()
        time.sleep(0.02)


def sent_flight(remote: RemoteDispatcher, name: str) -> Flight:
    """A new job's one task, staged and sent."""
    job = claimed(remote.life, name, media=True)
    steps_until(remote, lambda: any(f.task.job_id == job.id and f.celery_id for f in remote.flights["gpu"]),
                f"send of {name}'s task")
    return next(f for f in remote.flights["gpu"] if f.task.job_id == job.id)


def rendered(moto_server, remote: RemoteDispatcher, flight: Flight, body: bytes) -> None:
    """What the worker does with the task: the video to the task's key, and its report in the result backend."""
    key = remote.store.tasks.get(flight.task.id).object_key
    up = moto_server.client().put_object(Bucket=remote.cfg.s3.bucket, Key=key, Body=body)
    remote.app.backend.store_result(flight.celery_id, {"ok": True, "key": key, "etag": up["ETag"], "size": len(body),
                                                       "sha256": hashlib.sha256(body).hexdigest()}, "SUCCESS")


def messages(redis: RedisServer) -> int:
    """Task messages sent to the queue (no worker takes them)."""
    return redis_client.Redis.from_url(redis.url).llen("gpu")


def test_a_finished_video_the_bucket_cannot_serve_now_is_downloaded_once_it_is_back_never_rendered_again(
        tmp_path, moto_server, bucket, redis):
    remote = live(tmp_path, moto_server.s3_settings(bucket), redis)
    flight = sent_flight(remote, "gina")
    video = write_noise_video(tmp_path / "made.mp4", 1).read_bytes()
    rendered(moto_server, remote, flight, video)
    configured = remote.transfer.client
    remote.transfer.client = MotoServer(tmp_path / "never-started.log").client()  # S3 away: nothing listens
    steps_until(remote, lambda: flight.trouble is not None and flight.transfer is None, "failed download")
    (outage,) = remote.outages()
    assert (outage["dependency"], outage["tasks"]) == (remote.transfer.dependency, 1)
    assert "cannot download" in outage["reason"] and remote.broker()["downloads_waiting"] == [outage]
    (line,) = _remote_lines({**remote.broker(), "workers": []})  # what `heygem-daemon status` prints
    assert line.startswith(f"finished remote videos waiting for {remote.transfer.dependency} since ")
    task = remote.store.tasks.get(flight.task.id)
    assert (task.state, task.attempts) == ("running", 1)
    remote.transfer.client = configured  # S3 is back; the download is tried again after its backoff
    remote.clock.advance(remote.cfg.workers.backoff_max_seconds)
    steps_until(remote, lambda: remote.store.tasks.get(task.id).state == "done", "download once S3 is back")
    assert Path(task.output).read_bytes() == video and remote.outages() == []
    assert remote.store.tasks.get(task.id).attempts == 1
    assert [a["remote_id"] for a in remote.store.tasks.attempts(task.id)] == [flight.celery_id]
    assert messages(redis) == 1  # the worker was asked once


def test_a_finished_video_waiting_in_the_bucket_is_deleted_when_its_job_is_cancelled(
        tmp_path, moto_server, bucket, redis):
    remote = live(tmp_path, moto_server.s3_settings(bucket), redis)
    flight = sent_flight(remote, "hugo")
    rendered(moto_server, remote, flight, write_noise_video(tmp_path / "made.mp4", 1).read_bytes())
    key = remote.store.tasks.get(flight.task.id).object_key
    configured = remote.transfer.client
    remote.transfer.client = MotoServer(tmp_path / "never-started.log").client()  # S3 away: the video waits
    steps_until(remote, lambda: flight.trouble is not None and flight.transfer is None, "failed download")
    remote.transfer.client = configured
    request_cancel(remote.store, "hugo")
    remote.life.settle_requests()
    steps_until(remote, lambda: remote.store.tasks.get(flight.task.id).state == "failed", "the cancel")
    assert "cancelled" in remote.store.tasks.get(flight.task.id).last_error["reason"]
    s3 = moto_server.client()
    steps_until(remote, lambda: s3.list_objects_v2(Bucket=bucket, Prefix=key).get("KeyCount", 0) == 0,
                "the cancelled task's video to leave the bucket")
    assert not Path(flight.task.output).exists()


def test_an_upload_a_cancelled_attempt_began_at_its_key_is_aborted_when_the_attempt_ends(
        tmp_path, moto_server, bucket, redis):
    remote = live(tmp_path, moto_server.s3_settings(bucket), redis)
    flight = sent_flight(remote, "ivan")
    key = remote.store.tasks.get(flight.task.id).object_key
    s3 = moto_server.client()
    s3.create_multipart_upload(Bucket=bucket, Key=key)  # its worker was killed mid-upload (its host died)
    request_cancel(remote.store, "ivan")
    remote.life.settle_requests()
    steps_until(remote, lambda: remote.store.tasks.get(flight.task.id).state == "failed", "the cancel")
    steps_until(remote, lambda: not s3.list_multipart_uploads(Bucket=bucket, Prefix=key).get("Uploads"),
                "the ended attempt's upload to be aborted")


def test_a_superseded_report_of_the_attempt_still_running_sends_it_again_without_counting_it(
        tmp_path, moto_server, bucket, redis):
    remote = live(tmp_path, moto_server.s3_settings(bucket), redis)
    flight = sent_flight(remote, "lena")
    # The worker found the fence gone (Redis lost its data) and aborted its upload: its report.
    remote.app.backend.store_result(flight.celery_id, {
        "ok": False, "kind": "internal", "superseded": True, "reason": "given up", "hint": "nothing to do"}, "SUCCESS")
    steps_until(remote, lambda: any(f.celery_id not in (None, flight.celery_id) for f in remote.flights["gpu"]),
                "the task sent again")
    task = remote.store.tasks.get(flight.task.id)
    assert (task.state, task.attempts, task.last_error) == ("running", 1, None)
    assert [a["outcome"] for a in remote.store.tasks.attempts(task.id)] == ["interrupted", None]
    assert messages(redis) == 2


def test_a_fence_redis_lost_is_set_again_for_the_attempt_still_running(tmp_path, moto_server, bucket, redis):
    remote = live(tmp_path, moto_server.s3_settings(bucket), redis)
    flight = sent_flight(remote, "max")
    client = redis_client.Redis.from_url(redis.url)
    client.delete(fence_key(flight.task.id))  # lost with Redis's data, or expired while the task was queued
    remote.step()
    assert fence_holds(client, flight.task.id, flight.celery_id)


def test_an_attempt_failed_because_it_cannot_be_followed_ends_its_fence_and_frees_its_worker(
        tmp_path, moto_server, bucket, redis):
    remote = live(tmp_path, moto_server.s3_settings(bucket), redis)
    flight = sent_flight(remote, "nora")
    beat = {"host": "w1", "device": "cuda:0", "devices": ["cuda:0"], "beat": 1.0, "progress": 0.5}
    remote.app.backend.store_result(flight.celery_id, beat, "PROGRESS")
    remote.step()
    worker = lambda: next(w for w in remote.describe() if w["host"] == "w1")  # noqa: E731
    assert worker()["tasks"] == {"cuda:0": flight.task.name}
    # A beat this daemon cannot read (a newer worker): the attempt fails, and the render must not complete
    # its upload to the task's key any more.
    remote.app.backend.store_result(flight.celery_id, {**beat, "beat": 2.0, "progress": "half"}, "PROGRESS")
    remote.step()
    task = remote.store.tasks.get(flight.task.id)
    assert (task.state, task.attempts, task.last_error["kind"]) == ("queued", 1, "internal")
    assert not fence_holds(redis_client.Redis.from_url(redis.url), task.id, flight.celery_id)
    assert worker()["tasks"] == {}


def test_a_task_staged_while_redis_stops_answering_waits_to_be_sent_until_the_backoff_is_over(
        tmp_path, moto_server, bucket, redis):
    remote = live(tmp_path, moto_server.s3_settings(bucket), redis)
    sent_flight(remote, "olga")  # a render in flight: its state is read at every step
    job = claimed(remote.life, "paul", media=True)
    remote.step()  # paul's inputs go to a transfer thread
    (staging,) = [f for f in remote.flights["gpu"] if f.task.job_id == job.id]
    wait([staging.transfer])
    os.kill(redis.proc.pid, signal.SIGSTOP)  # it still accepts connections, but answers nothing
    try:
        stepping = threading.Thread(target=remote.step, daemon=True)
        stepping.start()
        stepping.join(90)
        assert not stepping.is_alive(), "the dispatch loop hangs on a Redis that does not answer"
    finally:
        os.kill(redis.proc.pid, signal.SIGCONT)
    task = remote.store.tasks.get(staging.task.id)
    assert (task.state, task.attempts, task.last_error) == ("running", 1, None)  # not sent into it, no outage
    assert [a["remote_id"] for a in remote.store.tasks.attempts(task.id)] == [None]
    remote.clock.advance(remote.cfg.workers.backoff_seconds)
    remote.step()
    assert staging.celery_id and messages(redis) == 2


def test_a_big_download_does_not_hold_up_sending_other_tasks(tmp_path, moto_server, bucket, redis):
    slow_link = threading.Event()
    proxy = LimitedProxy(moto_server, lacking=(), hold_downloads=slow_link).start()
    try:
        remote = live(tmp_path, proxy.s3_settings(bucket), redis)
        first = sent_flight(remote, "ivan")
        rendered(moto_server, remote, first, write_noise_video(tmp_path / "made.mp4", 1).read_bytes())
        steps_until(remote, lambda: first.report is not None, "the download to begin")
        second = sent_flight(remote, "judy")  # sent while the first video is still on its way
        assert not first.transfer.done() and second.celery_id and messages(redis) == 2
        third = claimed(remote.life, "kim", media=True)
        remote.step()  # the download in progress still holds its place in the queue's limit (2)
        assert len(remote.flights["gpu"]) == 2 and remote.store.tasks.select(third.id)[0].state == "queued"
        slow_link.set()
        steps_until(remote, lambda: remote.store.tasks.get(first.task.id).state == "done", "the download")
        assert [f.task.job_id for f in remote.flights["gpu"]] == [second.task.job_id, third.id]
    finally:
        slow_link.set()
        proxy.stop()


def test_a_download_cut_short_by_a_stop_is_done_by_the_next_start_without_a_new_render(tmp_path, moto_server,
                                                                                      bucket, redis):
    slow_link = threading.Event()
    proxy = LimitedProxy(moto_server, lacking=(), hold_downloads=slow_link).start()
    try:
        stopped = live(tmp_path, proxy.s3_settings(bucket), redis)
        flight = sent_flight(stopped, "kate")
        video = write_noise_video(tmp_path / "made.mp4", 1).read_bytes()
        rendered(moto_server, stopped, flight, video)
        steps_until(stopped, lambda: flight.report is not None, "the download to begin")
        stopped.stop_event.set()
        slow_link.set()
        stopped._leave_running()  # what its loop does once stopped: the download leaves off at its first chunk
        task = flight.task
        assert not flight.part.exists() and not list(Path(task.output).parent.glob("*.s3.part"))
        restarted = live(tmp_path, proxy.s3_settings(bucket), redis)
        assert restarted.life.recover(restarted.adoptable())["adopted"] == 1
        restarted._adopt()
        steps_until(restarted, lambda: restarted.store.tasks.get(task.id).state == "done", "the adopted download")
        assert Path(task.output).read_bytes() == video and restarted.store.tasks.get(task.id).attempts == 1
        assert messages(redis) == 1
    finally:
        slow_link.set()
        proxy.stop()


UPLOAD_AND_DIE = """
import sys
from pathlib import Path
from heygem_daemon.config import load_config
from heygem_daemon.generation.s3_worker import S3Side, upload_result
upload_result(S3Side(load_config(Path(sys.argv[1]))), Path(sys.argv[2]), sys.argv[3], "v.mp4", lambda: True,
              float("inf"))
"""


def test_a_task_redelivered_to_a_host_that_died_mid_upload_resumes_its_upload(tmp_path, moto_server, bucket):
    host = tmp_path / "host"
    host.mkdir()
    # One part at a time at 5 MB/s: the worker is killed while parts remain to send.
    cfg = config(host, moto_server, bucket)
    settings = {**cfg.model_dump(mode="json"), "s3": moto_server.s3_settings(
        bucket, part_size_mb=5, part_concurrency=1, max_bandwidth_mb_s=5)}
    (host / "config.yaml").write_text(json.dumps(settings))
    video = write_noise_video(host / "work" / "video.mp4", 11)
    key = "day/job/tok/v.mp4"
    env = {**os.environ, **credentials_env(), "PYTHONPATH": str(REPO)}
    worker = subprocess.Popen([sys.executable, "-c", UPLOAD_AND_DIE, str(host / "config.yaml"), str(video), key],
                              env=env)
    store = Store(host / "state" / "heygem.db")
    deadline = time.monotonic() + 30
    while not ((d := store.deliveries.at(str(video))) and store.deliveries.parts(d.id)):
        assert time.monotonic() < deadline and worker.poll() is None, "no part recorded before the kill"
        time.sleep(0.05)
    worker.send_signal(signal.SIGKILL)
    worker.wait(10)
    upload_id = store.deliveries.at(str(video)).upload_id
    up = upload_result(S3Side(load_config(host / "config.yaml")), video, key, "v.mp4", lambda: True, float("inf"))
    assert 0 < up.sent_bytes < video.stat().st_size  # the parts the server held were not sent again
    numbers = [n for u, n in moto_server.part_puts(bucket) if u == upload_id]
    assert sorted(numbers) == sorted(set(numbers)) == list(range(1, len(numbers) + 1))
    body = moto_server.client().get_object(Bucket=bucket, Key=key)["Body"].read()
    assert hashlib.sha256(body).hexdigest() == sha256_file(video) == up.sha256
    assert store.deliveries.at(str(video)) is None  # done: the worker's store forgets it


def test_the_s3_path_passes_a_server_that_checks_signatures_keys_and_links(tmp_path, nanio_server, redis,
                                                                            monkeypatch):
    """nanio checks SigV4 signatures, access keys and presigned links (moto takes anything): the inputs'
    staging, the worker's link downloads and resumable upload, and the daemon's download all pass it."""
    for k, v in credentials_env().items():
        monkeypatch.setenv(k, v)
    bucket = nanio_server.new_bucket()
    (tmp_path / "daemon").mkdir()
    remote = live(tmp_path / "daemon", nanio_server.s3_settings(bucket, part_size_mb=5), redis)
    claimed(remote.life, "olga", media=True)
    task = remote.life.take("remote:gpu")
    spec = task_spec(remote.cfg, remote.life, task, "remote:gpu")[1]
    payload = sent(remote, task)  # the inputs staged through nanio, and signed links to them
    (tmp_path / "worker").mkdir()
    (tmp_path / "worker" / "worker.yaml").write_text(json.dumps({
        "base_dir": str(tmp_path / "worker"), "s3": nanio_server.s3_settings(bucket, part_size_mb=5),
        "workers": {"devices": ["cpu"], "remote": {"broker_url": redis.url, "queues": {"gpu": 1},
                                                   "transfer": "s3"}}}))
    side = S3Side(load_config(tmp_path / "worker" / "worker.yaml", environ={}))
    check_payload(side, payload)
    for name in ("audio", "portrait"):
        fetched = tmp_path / "worker" / "in" / name
        fetch_input(payload["links"][name], fetched, 10)
        assert fetched.read_bytes() == getattr(spec, name).read_bytes()
    video = write_noise_video(tmp_path / "worker" / "made.mp4", 12)  # more than one 5 MB part
    up = upload_result(side, video, payload["object"]["key"], payload["object"]["name"], lambda: True,
                       float("inf"))
    part = attempt_part(task.output, task.attempts)
    part.parent.mkdir(parents=True, exist_ok=True)
    settle(remote, Flight(task, "gpu", None, part, 1.0, 1.0), {
        "ok": True, "key": payload["object"]["key"], "etag": up.etag, "size": video.stat().st_size,
        "sha256": up.sha256})
    assert remote.store.tasks.get(task.id).state == "done"
    assert Path(task.output).read_bytes() == video.read_bytes()
