"""DeliveryService in this process, on a real store, real videos and (for S3 mode) a real moto S3 server:
what it records for a finished job, without the daemon around it."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from heygem_daemon.config import Config, load_config
from heygem_daemon.delivery.audit import AUDIT_FILE
from heygem_daemon.delivery.report import BatchReport
from heygem_daemon.delivery.service import DeliveryService
from heygem_daemon.fs.files import sha256_file
from heygem_daemon.state import Job, NewTask, Store
from media_factory import write_portrait_video
from s3_server import credentials_env


@pytest.fixture
def aws_env(monkeypatch):
    for k, v in credentials_env().items():
        monkeypatch.setenv(k, v)


def make_cfg(tmp_path: Path, s3: dict[str, Any] | None = None) -> Config:
    (tmp_path / "base").mkdir()
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"base_dir": "base", "s3": s3 or {}}))
    return load_config(path, environ={})


def finished_job(cfg: Config, store: Store, name: str, videos: int, spec: dict[str, Any] | None = None) -> Job:
    """A job whose tasks all made their video in outputs/<name>/, as the workers leave it."""
    job = store.jobs.create(name, spec or {})
    outputs = [cfg.folder("outputs") / name / f"v{i}.mp4" for i in range(videos)]
    store.jobs.queue(job.id, [NewTask(p.stem, "a.wav", "p.jpg", str(p)) for p in outputs])
    outputs[0].parent.mkdir()
    clip = write_portrait_video(cfg.folder("work") / "clip.mp4", 0.4)
    for path in outputs:
        path.write_bytes(clip.read_bytes())
        task = store.tasks.take_next("cpu")
        assert task is not None and store.tasks.finish(task.id)
    store.jobs.set_state(job.id, "done")
    return store.jobs.get(job.id)


def deliver(cfg: Config, store: Store, job: Job) -> BatchReport:
    """Runs the service until the job's batch is reported; returns the report."""
    reports: list[BatchReport] = []
    service = DeliveryService(cfg, store, reports.append, lambda key, message: None)
    service.start()
    try:
        deadline = time.monotonic() + 60
        while not reports:
            assert time.monotonic() < deadline, "the batch was not reported within 60 s"
            time.sleep(0.05)
    finally:
        service.stop()
    [report] = reports
    assert report.job_id == job.id
    return report


def audit_lines(cfg: Config) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (cfg.folder("logs") / AUDIT_FILE).read_text().splitlines()]


def test_in_s3_mode_a_job_kept_local_is_audited_with_the_local_paths_of_its_videos_and_zip(tmp_path, moto_server,
                                                                                           aws_env):
    cfg = make_cfg(tmp_path, moto_server.s3_settings(moto_server.new_bucket()))
    store = Store(cfg.folder("state") / "heygem.db")
    job = finished_job(cfg, store, "private", 2, {"upload": False})  # job.yaml `upload: false`
    report = deliver(cfg, store, job)
    folder = cfg.folder("outputs") / "private"
    audit = audit_lines(cfg)
    videos = sorted((a for a in audit if a["event"] == "delivery"), key=lambda a: a["links"][0])
    assert [(a["keys"], a["links"]) for a in videos] == [([], [str(folder / "v0.mp4")]), ([], [str(folder / "v1.mp4")])]
    [zipped] = [a for a in audit if a["event"] == "zip"]
    assert report.zip_name and zipped["keys"] == [] and zipped["links"] == [str(folder / report.zip_name)]
    assert (folder / report.zip_name).is_file()


def test_in_s3_mode_an_uploaded_job_is_audited_with_the_keys_and_unsigned_links_of_its_videos_and_zip(
        tmp_path, moto_server, aws_env):
    cfg = make_cfg(tmp_path, moto_server.s3_settings(moto_server.new_bucket()))
    store = Store(cfg.folder("state") / "heygem.db")
    job = finished_job(cfg, store, "public", 2)
    deliver(cfg, store, job)
    keys = {d.key for d in store.deliveries.select(job.id)} | {store.deliveries.batch(job.id).zip_key}
    audit = audit_lines(cfg)
    assert len(audit) == 3 and {k for a in audit for k in a["keys"]} == keys
    for line in audit:
        [key], [link] = line["keys"], line["links"]
        assert link.startswith(moto_server.endpoint) and link.endswith(key) and "?" not in link


def test_the_outputs_of_a_finished_jobs_done_tasks_are_each_registered_once(tmp_path):
    cfg = make_cfg(tmp_path)
    store = Store(cfg.folder("state") / "heygem.db")
    job = finished_job(cfg, store, "batch", 3)
    tasks = store.tasks.select(job.id)
    early = tasks[0]  # the outputs watcher took this one before the job finished
    store.deliveries.ensure_batch(job.id, job.name, job.name, job.id)
    store.deliveries.add(job.id, early.output, Path(early.output).name, Path(early.output).stat().st_size, "", early.id)
    report = deliver(cfg, store, job)
    deliveries = store.deliveries.select(job.id)
    assert sorted((d.path, d.task_id) for d in deliveries) == sorted((t.output, t.id) for t in tasks)
    assert sorted(v.name for v in report.videos) == ["v0.mp4", "v1.mp4", "v2.mp4"]


def steps(service: DeliveryService) -> None:
    """One decision step of the delivery thread, and the work it handed to the pool, done."""
    service._step()
    deadline = time.monotonic() + 30
    while service._busy:
        assert time.monotonic() < deadline, "delivery work still running after 30 s"
        time.sleep(0.02)


def test_a_job_delivered_before_the_store_lost_its_rows_is_not_delivered_again_as_an_adhoc_batch(tmp_path):
    cfg = make_cfg(tmp_path)
    db = cfg.folder("state") / "heygem.db"
    store = Store(db)
    deliver(cfg, store, finished_job(cfg, store, "done-before", 2))
    store.close()
    for lost in db.parent.glob("heygem.db*"):  # the crash took the WAL with every row of the job
        lost.unlink()
    store = Store(db)
    service = DeliveryService(cfg, store, lambda report: None, lambda key, message: None)
    service.watcher.tracker.settle = 0.0  # the videos have long stopped changing
    steps(service)
    steps(service)
    videos = sorted((cfg.folder("outputs") / "done-before").glob("*.mp4"))
    assert len(videos) == 2 and all(store.deliveries.known(str(v)) for v in videos)
    assert store.deliveries.adhoc_batches(10) == [] and store.deliveries.select() == []


def test_a_remote_video_recorded_as_uploaded_is_linked_only_once_it_is_in_outputs(tmp_path, moto_server, aws_env):
    bucket = moto_server.new_bucket()
    cfg = make_cfg(tmp_path, moto_server.s3_settings(bucket))
    store = Store(cfg.folder("state") / "heygem.db")
    job = store.jobs.create("remote", {})
    output = cfg.folder("outputs") / "remote" / "v0.mp4"
    store.jobs.queue(job.id, [NewTask("v0", "a.wav", "p.jpg", str(output))])
    task = store.tasks.take_next("remote:gpu")
    clip = write_portrait_video(cfg.folder("work") / "clip.mp4", 0.4)
    # What the remote dispatcher does with a worker's upload (transfer: s3): the object is in the bucket and
    # recorded as uploaded; the MP4 check and the rename into outputs/ are still to come.
    key = "day/remote/tok/v0.mp4"
    up = moto_server.client().put_object(Bucket=bucket, Key=key, Body=clip.read_bytes())
    batch = store.deliveries.ensure_batch(job.id, job.name, job.name, job.id)
    d = store.deliveries.add_uploaded(batch.id, str(output), "v0.mp4", clip.stat().st_size, key, task.id,
                                      up["ETag"], sha256_file(clip))
    service = DeliveryService(cfg, store, lambda report: None, lambda key, message: None)
    try:
        steps(service)
        assert store.deliveries.get(d.id).state == "uploaded"
        assert not (cfg.folder("logs") / AUDIT_FILE).exists() and not output.parent.exists()
        output.parent.mkdir()
        output.write_bytes(clip.read_bytes())  # checked and renamed: the task is done
        assert store.tasks.finish(task.id)
        steps(service)
        assert store.deliveries.get(d.id).state == "linked"
        assert [(a["event"], a["keys"]) for a in audit_lines(cfg)] == [("delivery", [key])]
        assert [f["key"] for f in json.loads((output.parent / "links.json").read_text())["files"]] == [key]
    finally:
        service.stop()
