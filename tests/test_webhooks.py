"""Webhooks against a real HTTP receiver on 127.0.0.1 that verifies signatures as README "API" tells
receivers to, with a real SQLite store, the real outbox sender and the API's own job serialiser."""

import hashlib
import json
import ssl
import hmac
import threading
import time
from dataclasses import dataclass, replace
from http.server import BaseHTTPRequestHandler
from typing import Any

import pytest
import yaml

from heygem_daemon.cli import main
from heygem_daemon.config import Config
from heygem_daemon.delivery.report import BatchReport, VideoLink
from heygem_daemon.generation.lifecycle import JobFinished, JobState, TaskFinished
from heygem_daemon.notify.announce import Announcer
from heygem_daemon.notify.outbox import Notifier, Outbox
from heygem_daemon.notify import webhooks
from heygem_daemon.notify.webhooks import KIND, Unreachable, Webhooks, deliver, destination
from heygem_daemon.state import Store
from heygem_daemon.views import job_resource, job_view
from heygem_daemon.web.api import JobOut
from heygem_daemon.web.tokens import TokenError, create_token, rotate_secret, webhook_secret
from daemon_harness import DaemonHarness
from media_factory import FIXTURES
from notify_receiver import serve, shut, wait_until
from robot_receiver import SLACK, make_tls

LOOPBACK = ["127.0.0.0/8"]


@dataclass(frozen=True)
class Hit:
    headers: dict[str, str]
    body: bytes
    status: int


class HookReceiver:
    """Answers each POST with the next of `statuses` (then 200) and records what came."""

    def __init__(self, *statuses: int, tls: ssl.SSLContext | None = None) -> None:
        self.statuses, self.hits, self._lock = list(statuses), [], threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def setup(self) -> None:
                if tls is not None:
                    self.request = tls.wrap_socket(self.request, server_side=True)
                super().setup()

            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with receiver._lock:
                    status = receiver.statuses.pop(0) if receiver.statuses else 200
                    receiver.hits.append(Hit(dict(self.headers), body, status))
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *_: Any) -> None:
                pass

        self.server = serve(Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks/heygem?k=1"


def verify(secret: str, header: str, body: bytes) -> bool:
    """README "API"'s check: any v1= that matches HMAC-SHA256(secret, t.body)."""
    fields = [part.split("=", 1) for part in header.split(",")]
    t = next(v for k, v in fields if k == "t")
    expected = hmac.new(secret.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    return any(k == "v1" and hmac.compare_digest(v, expected) for k, v in fields)


@pytest.fixture
def receiver():
    made: list[HookReceiver] = []

    def make(*statuses: int, tls: ssl.SSLContext | None = None) -> HookReceiver:
        made.append(HookReceiver(*statuses, tls=tls))
        return made[-1]
    yield make
    for r in made:
        shut(r.server)


@pytest.fixture
def store(tmp_path):
    s = Store(tmp_path / "heygem.db")
    yield s
    s.close()


def rig(tmp_path, store: Store, url: str, allow: list[str]) -> tuple[Config, Webhooks, Notifier, str]:
    cfg = Config.model_validate({"base_dir": str(tmp_path), "web": {"webhook_allow": allow},
                                 "notify": {"retry_base_seconds": 0.1, "retry_max_seconds": 0.2}})
    outbox = Outbox(cfg, store)
    create_token(store, "shop", "alice", ("jobs:write",), url)
    hooks = Webhooks(outbox, store, lambda job: job_resource(cfg, store, job))
    notifier = Notifier(outbox, {KIND: lambda row: deliver(store, row, cfg.web.webhook_allow)})
    return cfg, hooks, notifier, webhook_secret(store, "shop") or ""


def api_job(store: Store, name: str = "promo", token: str = "shop"):
    store.web.record_owner(name, "alice", 0.0, token)
    return store.jobs.create(name, {"sources": [name], "folder": True})


def due_now(store: Store) -> None:
    for row in store.outbox.select(states=("retrying",)):
        store.outbox.postpone(row.id, 0.0)


def test_a_done_job_is_delivered_once_signed_with_the_api_job_resource_as_body(tmp_path, store, receiver):
    hook = receiver()
    cfg, hooks, notifier, secret = rig(tmp_path, store, hook.url, LOOPBACK)
    job = api_job(store)

    assert hooks.job_ended(replace(job, state="done")) == 1
    assert hooks.job_ended(replace(job, state="done")) == 0  # the same event again (recovery) adds nothing
    assert notifier.send_due() == 1

    [hit] = hook.hits
    assert verify(secret, hit.headers["X-Heygem-Signature"], hit.body)
    assert hit.headers["X-Heygem-Event"] == "job.done"
    assert hit.headers["X-Heygem-Event-Id"].startswith("evt_")
    assert hit.headers["Content-Type"] == "application/json"
    sent = JobOut.model_validate_json(hit.body)
    assert sent.ref == "promo" and sent.state == "done"
    assert sent.model_dump(mode="json") == JobOut.model_validate(job_resource(cfg, store, replace(
        job, state="done"))).model_dump(mode="json")
    assert [r.state for r in store.outbox.select(job.id)] == ["sent"]


def test_a_receiver_answering_500_then_200_gets_the_event_once_more_with_the_same_id(tmp_path, store, receiver):
    hook = receiver(500)
    _, hooks, notifier, secret = rig(tmp_path, store, hook.url, LOOPBACK)
    job = api_job(store)
    hooks.job_ended(replace(job, state="failed", error={"kind": "engine", "reason": "r", "hint": "h"}))

    assert notifier.send_due() == 0
    [row] = store.outbox.select(job.id)
    assert row.state == "retrying" and "HTTP 500" in (row.last_error or "")
    due_now(store)
    assert notifier.send_due() == 1
    assert notifier.send_due() == 0

    first, second = hook.hits
    assert first.body == second.body
    assert first.headers["X-Heygem-Event-Id"] == second.headers["X-Heygem-Event-Id"]
    assert second.headers["X-Heygem-Event"] == "job.failed"
    assert verify(secret, second.headers["X-Heygem-Signature"], second.body)
    assert [r.state for r in store.outbox.select(job.id)] == ["sent"]


def test_a_4xx_answer_is_refused_for_good_and_shown_on_the_job(tmp_path, store, receiver):
    hook = receiver(410)
    cfg, hooks, notifier, _ = rig(tmp_path, store, hook.url, LOOPBACK)
    job = api_job(store)
    hooks.enqueue("video.done", job, "1")

    notifier.send_due()
    due_now(store)
    notifier.send_due()

    assert len(hook.hits) == 1
    [shown] = job_view(cfg, store, job)["webhooks"]
    assert shown["event"] == "video.done" and shown["state"] == "gave_up" and "HTTP 410" in shown["error"]
    assert "chat" not in job_view(cfg, store, job)


@pytest.mark.parametrize(("status", "state"), [(302, "gave_up"), (401, "gave_up"), (408, "retrying"),
                                              (429, "retrying"), (503, "retrying")])
def test_redirects_and_4xx_are_refused_for_good_but_408_429_and_5xx_are_retried(tmp_path, store, receiver,
                                                                                 status, state):
    hook = receiver(status)
    _, hooks, notifier, _ = rig(tmp_path, store, hook.url, LOOPBACK)
    job = api_job(store)
    hooks.job_ended(replace(job, state="done"))

    notifier.send_due()

    [row] = store.outbox.select(job.id)
    assert row.state == state and f"HTTP {status}" in (row.last_error or "")


def test_a_loopback_callback_is_refused_unless_web_webhook_allow_lists_it(tmp_path, store, receiver):
    hook = receiver()
    _, hooks, notifier, _ = rig(tmp_path, store, hook.url, [])
    job = api_job(store)
    hooks.job_ended(replace(job, state="done"))

    notifier.send_due()

    assert hook.hits == []
    [row] = store.outbox.select(job.id)
    assert row.state == "gave_up" and "loopback" in (row.last_error or "")


@pytest.mark.parametrize("address", ["10.1.2.3", "169.254.169.254", "::1", "fd00::1", "224.0.0.1", "0.0.0.0",
                                     "100.64.0.1", "::ffff:127.0.0.1"])
def test_private_link_local_multicast_and_reserved_addresses_are_refused(address):
    with pytest.raises(Unreachable):
        destination("https://hooks.example.com/x", [], lambda host, port: [address])


def test_the_first_allowed_address_is_the_one_connected_to():
    resolved = lambda host, port: ["10.0.0.5", "93.184.215.14"]  # noqa: E731
    assert destination("https://hooks.example.com:8443/x", [], resolved) == ("hooks.example.com", 8443,
                                                                             "93.184.215.14")
    assert destination("http://hooks.example.com/x", ["10.0.0.0/8"], resolved)[2] == "10.0.0.5"
    assert destination("http://hooks.example.com/x", ["hooks.example.com"], resolved)[2] == "10.0.0.5"


def test_an_https_callback_goes_to_the_checked_address_with_its_certificate_checked_for_the_urls_host(
        tmp_path, store, receiver, monkeypatch):
    ca, context = make_tls(tmp_path / "tls")
    monkeypatch.setenv("SSL_CERT_FILE", str(ca))  # the test CA as the system's trust store
    monkeypatch.setattr(webhooks, "_resolve", lambda host, port: ["127.0.0.1"])  # the DNS answer
    hook = receiver(tls=context)
    port = hook.server.server_address[1]
    _, hooks, notifier, secret = rig(tmp_path, store, f"https://{SLACK}:{port}/hooks/heygem", LOOPBACK)
    create_token(store, "other", "alice", ("jobs:write",), f"https://erp.example.com:{port}/hooks")  # not in the cert
    hooks.job_ended(replace(api_job(store), state="done"))
    hooks.job_ended(replace(api_job(store, "second", token="other"), state="done"))

    assert notifier.send_due() == 1

    [hit] = hook.hits
    assert hit.headers["Host"] == f"{SLACK}:{port}" and verify(secret, hit.headers["X-Heygem-Signature"], hit.body)
    [mismatch] = store.outbox.select(states=("retrying",))
    assert mismatch.target == "webhook:other" and "SSLError" in (mismatch.last_error or "")


def test_during_a_rotation_both_secrets_sign_and_after_the_overlap_only_the_new_one(tmp_path, store, receiver):
    hook = receiver()
    _, hooks, notifier, old = rig(tmp_path, store, hook.url, LOOPBACK)
    new = rotate_secret(store, "shop", overlap_hours=1.0)
    job = api_job(store)
    hooks.job_ended(replace(job, state="done"))
    notifier.send_due()

    header = hook.hits[0].headers["X-Heygem-Signature"]
    assert header.count("v1=") == 2
    assert verify(old, header, hook.hits[0].body) and verify(new, header, hook.hits[0].body)

    newest = rotate_secret(store, "shop", overlap_hours=0.0)
    hooks.enqueue("video.done", job, "1")
    notifier.send_due()
    header = hook.hits[1].headers["X-Heygem-Signature"]
    assert header.count("v1=") == 1
    assert verify(newest, header, hook.hits[1].body) and not verify(new, header, hook.hits[1].body)


def test_jobs_not_made_by_a_token_with_a_callback_send_nothing(tmp_path, store, receiver):
    hook = receiver()
    _, hooks, _, _ = rig(tmp_path, store, hook.url, LOOPBACK)
    create_token(store, "reader", "alice", ("jobs:read",))
    assert hooks.job_ended(api_job(store, "from-console", token=None)) == 0  # type: ignore[arg-type]
    assert hooks.job_ended(api_job(store, "no-callback", token="reader")) == 0


def test_job_done_goes_out_when_delivery_reports_the_job_with_its_links_in_the_body(tmp_path, store, receiver):
    hook = receiver()
    cfg, hooks, notifier, _ = rig(tmp_path, store, hook.url, LOOPBACK)
    job = api_job(store)
    store.jobs.set_state(job.id, "done")
    link = "https://bucket.example.com/promo/anna.mp4?X-Amz-Signature=abc"
    (cfg.folder("outputs") / "promo").mkdir(parents=True)
    (cfg.folder("outputs") / "promo" / "links.json").write_text(json.dumps({"job": "promo", "written_at": "now",
        "files": [{"file": "anna.mp4", "size": 10, "link": link, "expires_at": "2026-12-01T00:00:00Z"}]}))

    Announcer(notifier.outbox, store, hooks).reported(BatchReport(job.id, "promo", [
        VideoLink("anna.mp4", 10, "0" * 64, 1.0, link)], [], None, None, 1_796_083_200.0))
    notifier.send_due()

    [hit] = hook.hits
    body = JobOut.model_validate_json(hit.body)
    assert hit.headers["X-Heygem-Event"] == "job.done" and body.state == "done"
    assert [(f.file, f.link) for f in body.links] == [("anna.mp4", link)]


def test_a_job_resource_that_cannot_be_made_is_logged_and_not_raised_into_the_life_cycle(tmp_path, store, receiver):
    _, hooks, _, _ = rig(tmp_path, store, receiver().url, LOOPBACK)

    def broken(job):
        raise KeyError("size")
    assert Webhooks(hooks.outbox, store, broken).job_ended(api_job(store)) == 0
    assert store.outbox.select() == []


def test_a_callback_must_be_an_http_url_without_credentials(store):
    for bad in ("ftp://example.com/x", "https://user:pw@example.com/x", "example.com"):
        with pytest.raises(TokenError):
            create_token(store, "bad", "alice", ("jobs:read",), bad)


def test_the_announcer_sends_job_failed_when_nothing_was_made_and_video_done_per_video(tmp_path, store, receiver):
    hook = receiver()
    _, hooks, notifier, _ = rig(tmp_path, store, hook.url, LOOPBACK)
    job = api_job(store)
    announcer = Announcer(notifier.outbox, store, hooks)
    announcer.video_made(TaskFinished(job.id, 7, "a", "a.mp4"))
    record = {"kind": "engine", "reason": "the engine failed", "hint": "retry"}
    announcer.finished(JobFinished(job, JobState.FAILED, [], [], record))
    notifier.send_due()

    events = {h.headers["X-Heygem-Event"]: JobOut.model_validate_json(h.body) for h in hook.hits}
    assert set(events) == {"video.done", "job.failed"}
    failed = events["job.failed"]
    assert failed.state == "failed" and failed.problem is not None and failed.problem.reason == "the engine failed"


def test_token_create_with_a_callback_prints_its_secret_once_and_rotate_secret_keeps_both_for_the_overlap(
        tmp_path, capsys):
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"base_dir": str(tmp_path), "logging": {"console": False},
                                                          "web": {"auth": "proxy"}}))
    cli = ["-c", str(tmp_path / "config.yaml"), "web", "token"]
    assert main([*cli, "create", "shop", "--user", "alice", "--callback", "https://erp.example.com/h?k=s3cr"]) == 0
    first = capsys.readouterr().out.split("webhook secret: ")[1].strip()
    assert main([*cli, "rotate-secret", "shop"]) == 0
    second = capsys.readouterr().out.split("webhook secret: ")[1].strip()
    assert main([*cli, "list"]) == 0
    listed = capsys.readouterr().out
    assert "callback https://erp.example.com" in listed and "s3cr" not in listed and first not in listed

    store = Store(tmp_path / "state" / "heygem.db")
    hook = store.api.webhook("shop", time.time())
    store.close()
    assert hook is not None and hook.secrets == (second, first)
    assert first not in repr(hook)


@pytest.mark.daemon
def test_the_daemon_sends_a_failed_api_job_once_across_sigkills_before_and_after_the_send(tmp_path, receiver, voice):
    hook = receiver(503)  # the receiver is down for the first try
    harness = DaemonHarness(tmp_path / "base", {"notify": {"retry_base_seconds": 0.2, "retry_max_seconds": 0.5},
                                                "web": {"webhook_allow": LOOPBACK}})
    store = harness.store()
    create_token(store, "shop", "alice", ("jobs:write",), hook.url)
    secret = webhook_secret(store, "shop") or ""
    for name in ("alpha", "bravo"):
        store.web.record_owner(name, "alice", 0.0, "shop")
    store.close()

    def drop(name: str) -> None:  # a portrait without a face: the job fails, nothing is made
        harness.drop(voice, "voice.wav", folder=f".{name}")
        harness.drop(FIXTURES / "no_face.jpg", "coffee.jpg", folder=f".{name}")
        (harness.inbox / f".{name}").rename(harness.inbox / name)

    def sent(name: str) -> None:
        job = harness.wait_job(name, timeout=60)
        wait_until(lambda: [r for r in harness.store().outbox.select(job.id) if r.state == "sent"], 30,
                   lambda: f"the webhook of {name} to be recorded as sent; hits: {hook.hits}")
    try:
        harness.start()
        drop("alpha")
        wait_until(lambda: hook.hits, 60, lambda: "a first delivery attempt")
        harness.kill()  # answered 503: recorded, not sent
        harness.start()
        sent("alpha")
        harness.kill()  # sent and recorded: a restart sends nothing again
        harness.start()
        drop("bravo")
        sent("bravo")
    finally:
        harness.stop()
    delivered = [JobOut.model_validate_json(h.body).ref for h in hook.hits if h.status == 200]
    assert sorted(delivered) == ["alpha", "bravo"]
    assert all(verify(secret, h.headers["X-Heygem-Signature"], h.body) for h in hook.hits)
    assert {h.headers["X-Heygem-Event"] for h in hook.hits} == {"job.failed"}
    assert secret not in harness.log_text()
