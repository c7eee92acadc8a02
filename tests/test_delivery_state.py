"""Delivery state that must survive a crash, and the views (`status`, `jobs`) that show it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from daemon_harness import DaemonHarness
from heygem_daemon.cli import main
from heygem_daemon.delivery.s3 import S3Failure
from heygem_daemon.fs.files import sha256_file
from heygem_daemon.state import Store
from media_factory import write_portrait_video
from test_delivery_daemon import FAST_DELIVERY, log_events, wait_delivered, wait_reported


@pytest.mark.daemon  # starts the real daemon: left out of `make test-fast`
def test_a_delivery_left_uploaded_by_a_crash_is_linked_and_reported_at_start(tmp_path):
    harness = DaemonHarness(tmp_path / "base", FAST_DELIVERY)
    clip = harness.folder("outputs") / "cut" / "clip.mp4"
    clip.parent.mkdir()
    shutil.copyfile(write_portrait_video(tmp_path / "clip.mp4", 0.4), clip)
    store = harness.store()  # the last run finished the upload, then died before linking it
    store.deliveries.ensure_batch("adhoc-cut", "cut", "cut", None)
    d = store.deliveries.add("adhoc-cut", str(clip), "clip.mp4", clip.stat().st_size, "", None)
    store.deliveries.finish_upload(d.id, None, sha256_file(clip))
    harness.start()
    try:
        wait_delivered(harness, clip)
        wait_reported(harness, "adhoc-cut")
    finally:
        harness.stop()
    links = json.loads((clip.parent / "links.json").read_text())
    assert [f["file"] for f in links["files"]] == ["clip.mp4"] and links["files"][0]["sha256"] == sha256_file(clip)
    assert len(log_events(harness, "batch reported", job="cut")) == 1


def _config(tmp_path: Path) -> Path:
    (tmp_path / "base").mkdir()
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"base_dir": str(tmp_path / "base")}))
    return path


def test_status_and_jobs_show_ad_hoc_batches_with_their_delivery_state(tmp_path, capsys):
    config = _config(tmp_path)
    main(["-c", str(config), "status"])  # creates the folders and the store
    capsys.readouterr()
    store = Store(tmp_path / "base" / "state" / "heygem.db")
    store.deliveries.ensure_batch("adhoc-1", "render", "render", None)
    outputs = tmp_path / "base" / "outputs" / "render"
    blocked = store.deliveries.add("adhoc-1", str(outputs / "a.mp4"), "a.mp4", 10, "k/a.mp4", None)
    store.deliveries.add("adhoc-1", str(outputs / "b.mp4"), "b.mp4", 10, "k/b.mp4", None)
    store.deliveries.retry(blocked.id, {"reason": "bucket 'videos' does not exist", "hint": "create it"}, 0)

    assert main(["-c", str(config), "status"]) == 0
    [line] = [x for x in capsys.readouterr().out.splitlines() if x.startswith("render")]
    assert "ad hoc" in line and "delivery open (2 pending)" in line and "bucket 'videos' does not exist" in line
    assert main(["-c", str(config), "status", "--json"]) == 0
    [view] = json.loads(capsys.readouterr().out)["adhoc"]
    assert view["delivery"] == {"state": "open", "files": {"pending": 2}, "zip": None,
                                "problem": {"reason": "bucket 'videos' does not exist", "hint": "create it",
                                            "blocked": False}}
    assert view["outputs"] == str(outputs) and view["error"]["hint"] == "create it"
    assert main(["-c", str(config), "jobs"]) == 0
    out = capsys.readouterr().out
    assert "no jobs yet" not in out and "render" in out and "hint:   create it" in out


def test_status_shows_a_job_whose_delivery_is_blocked_with_its_reason_and_hint(tmp_path, capsys):
    config = _config(tmp_path)
    main(["-c", str(config), "status"])
    capsys.readouterr()
    store = Store(tmp_path / "base" / "state" / "heygem.db")
    job = store.jobs.create("promo", {})
    store.deliveries.ensure_batch(job.id, job.name, job.name, job.id)
    d = store.deliveries.add(job.id, str(tmp_path / "promo.mp4"), "promo.mp4", 10, "k/promo.mp4", None)
    failure = S3Failure("S3 refused access to bucket 'videos' (SignatureDoesNotMatch)", "check the credentials",
                        False, "SignatureDoesNotMatch")
    store.deliveries.retry(d.id, failure.as_dict(), 0)

    assert main(["-c", str(config), "status", "--json"]) == 0
    [view] = json.loads(capsys.readouterr().out)["jobs"]
    assert view["delivery"]["problem"] == {"reason": failure.reason, "hint": failure.hint, "blocked": True}
    assert main(["-c", str(config), "status"]) == 0
    out = capsys.readouterr().out.splitlines()
    [line] = [x for x in out if x.startswith("promo")]
    assert f"delivery open (1 pending) BLOCKED: {failure.reason}" in line
    assert out[out.index(line) + 1] == "    hint:   check the credentials"
