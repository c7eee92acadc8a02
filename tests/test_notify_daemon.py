"""Notifications from the real daemon process to a real HTTP receiver: failures, job.yaml overrides,
secrets kept out of the logs, and no duplicate or lost message across SIGKILL restarts."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from daemon_harness import DaemonHarness
from heygem_daemon.notify.targets import target_id
from media_factory import FIXTURES
from notify_receiver import Receiver, wait_until

pytestmark = pytest.mark.daemon  # starts the real daemon: left out of `make test-fast`

TOKEN, PASSWORD = "TOKENabc123xyz", "PASSWORD987zyx"
JOB_TOKEN = "JOBTOKENqrs456"  # a job.yaml target's secret: the store keeps its digest only
FAST_RETRY = {"retry_base_seconds": 0.2, "retry_max_seconds": 0.5}


@pytest.fixture(scope="module")
def receiver():
    r = Receiver().start()
    yield r
    r.stop()


@pytest.fixture(scope="module")
def daemon(tmp_path_factory, receiver):
    """Targets come from the environment, as they would from a systemd EnvironmentFile."""
    allowed = {"job_targets": [f"json://127.0.0.1:{receiver.port}"]}  # job.yaml may name this receiver only
    harness = DaemonHarness(tmp_path_factory.mktemp("notify") / "base", {"notify": {**FAST_RETRY, **allowed}})
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HEYGEM_NOTIFY__URLS", receiver.url(f"/hook/{TOKEN}", auth=f"bot:{PASSWORD}@"))
        harness.start()
    yield harness
    harness.stop()


def drop_faceless(daemon: DaemonHarness, voice: Path, name: str, manifest: str | None = None) -> None:
    if manifest is None:
        daemon.drop(voice, f"{name}.wav")
        daemon.drop(FIXTURES / "no_face.jpg", f"{name}.jpg")
        return
    daemon.drop(voice, "voice.wav", folder=f".{name}")
    daemon.drop(FIXTURES / "no_face.jpg", "coffee.jpg", folder=f".{name}")
    (daemon.inbox / f".{name}" / "job.yaml").write_text(manifest)
    (daemon.inbox / f".{name}").rename(daemon.inbox / name)


def sent_rows(daemon: DaemonHarness, job_name: str):
    job = daemon.wait_job(job_name, timeout=60)
    assert job.state == "failed"
    return wait_until(lambda: [n for n in daemon.store().outbox.select(job.id) if n.state == "sent"] or None,
                      30, lambda: f"the notification of {job_name} to be sent")


def test_faceless_portrait_gets_one_failure_message_with_input_reason_and_hint(daemon, receiver, voice):
    drop_faceless(daemon, voice, "coffee")
    (row,) = sent_rows(daemon, "coffee")
    (post,) = receiver.delivered(f"/hook/{TOKEN}", "coffee")
    assert post.payload["type"] == "failure" and post.payload["title"] == "[heygem] coffee: refused"
    assert "coffee.jpg" in post.payload["message"] and "no face" in post.payload["message"]
    assert "front-facing photo" in post.payload["message"]
    assert post.headers["Authorization"].startswith("Basic ")


def test_job_yaml_notify_sends_to_the_job_target_only(daemon, receiver, voice):
    drop_faceless(daemon, voice, "teamb", f"notify: [{receiver.url(f'/team-b/{JOB_TOKEN}')}]\n")
    (row,) = sent_rows(daemon, "teamb")
    assert row.target == target_id(receiver.url(f"/team-b/{JOB_TOKEN}"))
    assert len(receiver.delivered(f"/team-b/{JOB_TOKEN}", "teamb")) == 1
    assert receiver.delivered(f"/hook/{TOKEN}", "teamb") == []


def test_a_job_target_outside_notify_job_targets_is_refused_and_the_configured_target_says_so(
        daemon, receiver, voice):
    # Same receiver, other host name: were it sent, it would arrive at /internal.
    sneaky = f"json://localhost:{receiver.port}/internal"
    drop_faceless(daemon, voice, "sneaky", f"notify: [{sneaky}]\n")
    sent_rows(daemon, "sneaky")
    (post,) = receiver.delivered(f"/hook/{TOKEN}", "sneaky")
    assert f"#{target_id(sneaky)[:8]}" in post.payload["message"] and "not allowed" in post.payload["message"]
    assert receiver.delivered("/internal") == []
    record = json.loads((daemon.folder("failed") / "sneaky" / "error.json").read_text())
    [warning] = record["warnings"]
    assert "notify entry 1" in warning["reason"] and "host localhost" in warning["reason"]
    assert "notify.job_targets" in warning["hint"]
    status = subprocess.run([sys.executable, "-m", "heygem_daemon.cli", "-c", str(daemon.config_path), "status"],
                            capture_output=True, text=True)
    assert "warning: notify entry 1 (json:// #" in status.stdout


def test_job_yaml_notify_false_sends_nothing(daemon, voice):
    drop_faceless(daemon, voice, "quiet", "notify: false\n")
    job = daemon.wait_job("quiet", timeout=60)
    assert job.state == "failed" and daemon.store().outbox.select(job.id) == []


def test_url_secrets_never_reach_the_logs_or_the_store(daemon, receiver, voice):
    drop_faceless(daemon, voice, "secrets")
    drop_faceless(daemon, voice, "jobsecret", f"notify: [{receiver.url(f'/team-c/{JOB_TOKEN}')}]\n")
    sent_rows(daemon, "secrets")
    sent_rows(daemon, "jobsecret")
    files = [daemon.folder("logs") / "heygem.log", daemon.console, *daemon.folder("state").glob("heygem.db*")]
    for path in files:
        raw = path.read_bytes()
        assert TOKEN.encode() not in raw and PASSWORD.encode() not in raw, path
        assert JOB_TOKEN.encode() not in raw, path
    assert "notification sent" in daemon.log_text()


def test_sigkill_before_and_after_sending_neither_loses_nor_repeats_a_message(tmp_path, voice):
    receiver = Receiver().start()
    url = receiver.url(f"/hook/{TOKEN}", auth=f"bot:{PASSWORD}@")
    receiver.stop()  # the chat service is down
    harness = DaemonHarness(tmp_path / "base", {"notify": {"urls": [url], **FAST_RETRY}})
    try:
        harness.start()
        drop_faceless(harness, voice, "alpha")
        job = harness.wait_job("alpha", timeout=60)
        wait_until(lambda: [n for n in harness.store().outbox.select(job.id) if n.attempts >= 1],
                   30, lambda: "a failed delivery attempt")
        harness.kill()  # recorded, not sent
        receiver.start()
        harness.start()
        sent_rows(harness, "alpha")
        harness.kill()  # sent
        harness.start()
        drop_faceless(harness, voice, "bravo")
        sent_rows(harness, "bravo")
        assert len(receiver.delivered(containing="alpha")) == 1
        assert len(receiver.delivered(containing="bravo")) == 1
        log = harness.log_text()
        assert "notification not delivered; will retry" in log and TOKEN not in log and PASSWORD not in log
    finally:
        harness.stop()
        receiver.stop()
