"""Remote workers that share no folder with the daemon (workers.remote.transfer: s3), end to end: the real
daemon, a real redis-server, a real nanio S3 server (it checks keys and signatures) and `heygem-daemon worker`
processes with their own base folders, the `command` engine running the fake lip-sync tool. Inputs reach the
worker as presigned links and the worker uploads each video straight to its final key: the daemon downloads
it, never uploads it. Beside the good worker run two misconfigured ones (a key the bucket refuses; another
key prefix than the daemon's): they must never take a task from it."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import urllib.request
import zipfile

import pytest
from daemon_harness import REPO, DaemonHarness
from test_remote import status_text
from media_factory import PORTRAIT_JPG
from remote_rig import CLI, RedisServer, RemoteWorker, assert_bad_input_fails_once, stop_all
from s3_server import credentials_env
from test_command_engine import ARGS

from heygem_daemon.generation.s3_transfer import STAGING_FOLDER, installation_id

pytestmark = pytest.mark.daemon  # real daemon, Redis, S3 and a worker: left out of `make test-fast`


BAD_KEY, OTHER_PREFIX = "bad-key@c", "other-prefix@b"


@pytest.fixture(scope="module")
def rig(tmp_path_factory, nanio_server):
    root = tmp_path_factory.mktemp("remote-s3")
    bucket = nanio_server.new_bucket()
    s3 = nanio_server.s3_settings(bucket, part_size_mb=5, retry_seconds=0.5, retry_max_seconds=1)
    redis = RedisServer(root / "redis").start()
    engine = {"args": ARGS, "timeout": 60, "bad_input_exit_codes": [3], "progress_regex": r"(\d+)%"}
    remote = {"broker_url": redis.url, "queues": {"gpu": 2}, "beat_seconds": 0.3, "poll_seconds": 0.1,
              "transfer": "s3"}
    def host(name: str, folder: str, s3: dict, env: dict) -> RemoteWorker:
        """Pool children in one process play a host's cards; its base folder is its own, unshared."""
        return RemoteWorker(root / folder, name, {
            "engine": {"name": "command"}, "engines": {"command": {**engine, "cwd": str(root / folder)}},
            "workers": {"devices": ["cpu", "cpu"], "remote": remote}, "s3": s3}, env)

    worker = host("w1@gpu-host", "gpu-host", s3, {**credentials_env(), "FAKE_SLOW_SECONDS": "3"}).launch()
    bad = [host(BAD_KEY, "bad-key", s3, {**credentials_env(), "AWS_SECRET_ACCESS_KEY": "wrong"})
           .launch("worker set-up problem"),
           host(OTHER_PREFIX, "other-prefix", {**s3, "key_prefix": "elsewhere/{job}/{token}/{file}"},
                credentials_env()).launch()]
    for w in (worker, *bad):
        w.wait_started()
    daemon = DaemonHarness(root / "daemon", {
        "engine": {"name": "command"}, "engines": {"command": {**engine, "cwd": str(root / "daemon")}},
        "dedupe": {"window_hours": 0}, "s3": s3, "delivery": {"adhoc_quiet_seconds": 1},
        "workers": {"devices": [], "stall_seconds": 5, "outage_alert_seconds": 1, "remote": remote},
    }).start(credentials_env())
    yield daemon, worker, nanio_server.client(), bucket, bad
    daemon.stop()
    stop_all([worker, *bad])
    redis.stop()


def daemon_events(daemon: DaemonHarness, event: str) -> list[dict]:
    lines = [json.loads(line) for line in daemon.log_text().splitlines() if line.startswith("{")]
    return [e for e in lines if e.get("event") == event]


def fetch(url: str) -> bytes:
    with urllib.request.urlopen(url) as resp:
        return resp.read()


def test_the_workers_upload_is_the_delivered_object_and_the_daemon_never_uploads_it(rig, voice):
    daemon, worker, client, bucket, _ = rig
    for name in ("a0.wav", "a1.wav"):
        daemon.drop(voice, name, folder="nomount")
    daemon.drop(PORTRAIT_JPG, "face.jpg", folder="nomount")
    assert daemon.wait_job("nomount", timeout=60).state == "done"
    outputs = daemon.folder("outputs") / "nomount"
    links = daemon.wait_for(lambda: (outputs / "links.json").exists() and json.loads(
        (outputs / "links.json").read_text()), 30, "links.json")
    daemon.wait_for(lambda: json.loads((outputs / "links.json").read_text())["zip"], 30, "the batch zip")
    links = json.loads((outputs / "links.json").read_text())
    assert sorted(f["file"] for f in links["files"]) == ["a0.mp4", "a1.mp4"]
    keys = {t.name + ".mp4": t.object_key for t in daemon.store().tasks.select(daemon.job("nomount").id)}
    for entry in links["files"]:
        assert entry["key"] == keys[entry["file"]]  # the key fixed at the first send is the delivered one
        assert fetch(entry["link"]) == (outputs / entry["file"]).read_bytes()
    with zipfile.ZipFile(io.BytesIO(fetch(links["zip"]["link"]))) as z:
        assert sorted(z.namelist()) == ["a0.mp4", "a1.mp4"]
    assert worker.text().count("video uploaded to its final key") == 2
    assert not [e for e in daemon_events(daemon, "video uploaded") if e.get("file", "").startswith("a")]
    assert sorted(e["file"] for e in daemon_events(daemon, "video already in the bucket; linking it")) == [
        "a0.mp4", "a1.mp4"]
    job = daemon.job("nomount")
    # The job's inputs leave the bucket with the job (the dispatcher deletes them at its next poll).
    staging = f"{STAGING_FOLDER}/{installation_id(daemon.folder('state'))}/{job.id}/"
    daemon.wait_for(lambda: client.list_objects_v2(Bucket=bucket, Prefix=staging)
                    .get("KeyCount", 0) == 0, 15, "the staged inputs to be deleted")
    assert list((worker.folder / "work" / "remote").iterdir()) == []  # each task's scratch folder is gone


def test_a_remote_bad_input_fails_once_with_its_reason_and_hint(rig, voice):
    daemon, _, _, _, _ = rig
    assert_bad_input_fails_once(daemon, voice, "badinput-s3")


def test_misconfigured_workers_render_nothing_are_named_in_status_and_alerted_once_and_every_task_is_done(
        rig, voice):
    daemon, worker, client, bucket, bad = rig
    uploaded = worker.text().count("video uploaded to its final key")
    worker.pause()  # only the misconfigured worker that consumes is there to take the first task
    try:
        for i in range(4):
            daemon.drop(voice, f"a{i}.wav", folder="farm")
        daemon.drop(PORTRAIT_JPG, "face.jpg", folder="farm")
        bad[1].wait_log("this worker takes no more tasks", 30)
    finally:
        worker.resume()
    assert daemon.wait_job("farm", timeout=60).state == "done"
    tasks = daemon.store().tasks.select(daemon.job("farm").id)
    assert [t.attempts for t in tasks] == [1, 1, 1, 1]  # a task a bad worker sent back used no attempt
    assert worker.text().count("video uploaded to its final key") == uploaded + 4  # each rendered once, here
    for w in bad:
        assert "video uploaded" not in w.text()
    # The one with a key the bucket refuses never consumed; the other quarantined itself at its first task.
    assert "ready." not in bad[0].text() and "cannot write to bucket" in bad[0].text()
    status = daemon.wait_for(lambda: (text := status_text(daemon)).count("QUARANTINED") == 2 and text, 30,
                             "status to name both quarantined workers")
    assert f"remote worker {BAD_KEY}" in status and f"remote worker {OTHER_PREFIX}" in status
    assert "outside this worker's key prefix" in status and "cannot write to bucket" in status
    # Outages due together share one alert, keyed "outage:<dependency>@<since>,...".
    alerted = lambda: [mark.rsplit("@", 1)[0] for e in daemon_events(daemon, "operator alert")  # noqa: E731
                       if e["alert"].startswith("outage:") for mark in e["alert"][len("outage:"):].split(",")]
    wanted = sorted(f"remote worker {h}" for h in (BAD_KEY, OTHER_PREFIX))
    daemon.wait_for(lambda: set(wanted) <= set(alerted()), 30, "an alert for each quarantined worker")
    assert sorted(d for d in alerted() if d.startswith("remote worker")) == wanted
    assert client.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []


def test_a_cancelled_remote_render_leaves_no_scratch_folder_on_its_worker(rig, voice):
    daemon, worker, _, _, _ = rig
    scratch = worker.folder / "work" / "remote"
    daemon.drop_pair(voice, PORTRAIT_JPG, "slow-cancel")
    daemon.wait_for(lambda: scratch.is_dir() and any(scratch.iterdir()), 30, "the render to start")
    said = subprocess.run([sys.executable, "-c", CLI, "-c", str(daemon.config_path), "cancel", "slow-cancel"],
                          cwd=REPO, capture_output=True, text=True, timeout=30)
    assert said.returncode == 0, said.stderr
    assert daemon.wait_job("slow-cancel", timeout=30).state == "failed"
    # Revoked, its pool child killed: the worker's main process removes what the attempt left at once.
    daemon.wait_for(lambda: not any(scratch.iterdir()), 15, "the scratch folder to go")
