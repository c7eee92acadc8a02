"""The outbox and its sender against a real HTTP receiver (apprise json://) and a real SQLite store."""

import dataclasses

import pytest

from heygem_daemon.config import Config, load_config
from heygem_daemon.notify.outbox import Notifier, Outbox
from heygem_daemon.delivery.report import BatchReport, VideoLink
from heygem_daemon.failures import Kind, Problem
from heygem_daemon.generation.lifecycle import LifeCycle, request_retry
from heygem_daemon.notify.announce import Announcer
from heygem_daemon.state import NewTask, Store
from notify_receiver import Receiver, wait_until

ZIP_URL = "https://s3.example.com/b/promo.zip?X-Amz-Signature=zipsig"
FAST = {"retry_base_seconds": 0.1, "retry_max_seconds": 0.3}


@pytest.fixture
def receiver():
    r = Receiver().start()
    yield r
    r.stop()


@pytest.fixture
def store(tmp_path):
    s = Store(tmp_path / "heygem.db")
    yield s
    s.close()


def sender(store: Store, **notify) -> tuple[Outbox, Notifier]:
    outbox = Outbox(Config.model_validate({"notify": {**FAST, **notify}}), store)
    return outbox, Notifier(outbox)


@pytest.fixture
def running():
    started: list[Notifier] = []
    yield started
    for n in started:
        n.stop()


def start(running, notifier: Notifier) -> Notifier:
    notifier.start()
    running.append(notifier)
    return notifier


def report(n: int = 3, signature: str = "sig") -> BatchReport:
    return BatchReport("job1", "promo", [
        VideoLink(f"v{i}.mp4", 1_000_000, f"{i:064d}", 10.0, f"https://s3.example.com/b/v{i}.mp4?s={signature}")
        for i in range(n)], [], "promo.zip", ZIP_URL, 1_767_225_600.0)


def test_success_report_is_delivered_with_every_link(store, receiver, running):
    outbox, notifier = sender(store, urls=[receiver.url()])
    start(running, notifier)
    outbox.enqueue_report(report())
    (post,) = receiver.wait_delivered()
    assert post.payload["type"] == "success" and "promo: 3 videos ready" in post.payload["title"]
    for i in range(3):
        assert f"https://s3.example.com/b/v{i}.mp4?s=sig" in post.payload["message"]
    assert ZIP_URL in post.payload["message"] and "0:30 in total" in post.payload["message"]
    assert [n.state for n in store.outbox.select()] == ["sent"]


def test_long_batch_arrives_as_a_summary_with_the_zip_link_within_the_plugin_limit(store, receiver, running):
    outbox, notifier = sender(store, urls=[receiver.url()])
    start(running, notifier)
    long = dataclasses.replace(report(), videos=[
        dataclasses.replace(v, name=f"v{i}.mp4", url=f"https://s3.example.com/b/v{i}.mp4?s=" + "f" * 400)
        for i, v in enumerate(report(400).videos)])
    outbox.enqueue_report(long)
    (post,) = receiver.wait_delivered()
    assert len(post.payload["message"]) <= 32768  # apprise's json:// body_maxlen
    assert ZIP_URL in post.payload["message"] and "400 videos" in post.payload["message"]
    assert "v0.mp4?s=" not in post.payload["message"]


def test_the_same_event_is_recorded_once_even_with_links_signed_again(store, receiver):
    outbox, _ = sender(store, urls=[receiver.url()])
    assert outbox.enqueue_report(report(signature="first")) == 1
    assert outbox.enqueue_report(report(signature="second")) == 0
    assert len(store.outbox.select()) == 1


def test_receiver_down_then_up_delivers_exactly_once(store, receiver, running):
    receiver.status = 503
    outbox, notifier = sender(store, urls=[receiver.url()])
    start(running, notifier)
    outbox.enqueue_report(report())
    wait_until(lambda: receiver.refused() >= 2, 30, lambda: "two refused attempts")
    (row,) = store.outbox.select()
    assert row.state == "retrying" and "503" in row.last_error
    receiver.status = 200
    receiver.wait_delivered(1)
    outbox.enqueue_alert("marker", "a later message, sent after the first by the same sender")
    receiver.wait_delivered(1, containing="a later message")
    assert len(receiver.delivered(containing="promo")) == 1
    assert store.outbox.select()[0].state == "sent"


def test_one_target_down_does_not_make_the_other_hear_twice(store, receiver, running):
    outbox, notifier = sender(store, urls=[receiver.url("/up"), receiver.url("/down")])
    outbox.enqueue_report(report())
    receiver.status = 503
    notifier.send_due()
    receiver.status = 200
    start(running, notifier)
    receiver.wait_delivered(1, path="/down")
    outbox.enqueue_alert("marker", "later")
    receiver.wait_delivered(1, path="/up", containing="later")
    assert len(receiver.delivered("/up", "promo")) == 1 and len(receiver.delivered("/down", "promo")) == 1


def test_a_message_refused_past_max_age_is_given_up_with_the_reason(store, receiver):
    receiver.status = 503
    outbox, notifier = sender(store, urls=[receiver.url()], max_age_hours=1e-9)
    outbox.enqueue_report(report())
    notifier.send_due()
    (row,) = store.outbox.select()
    assert row.state == "gave_up" and "503" in row.last_error


def test_alerts_go_to_operator_urls_once_per_key(store, receiver, running):
    outbox, notifier = sender(store, urls=[receiver.url("/team")], operator_urls=[receiver.url("/ops")])
    start(running, notifier)
    assert outbox.enqueue_alert("s3-403", "S3 refused the credentials (403)") == 1
    assert outbox.enqueue_alert("s3-403", "S3 refused the credentials (403)") == 0
    (post,) = receiver.wait_delivered(path="/ops")
    assert post.payload["type"] == "warning" and "403" in post.payload["message"]
    assert receiver.delivered("/team") == []


def test_report_goes_to_the_job_override_instead_of_the_configured_urls(store, receiver, running):
    outbox, notifier = sender(store, urls=[receiver.url("/team")])
    start(running, notifier)
    outbox.enqueue_report(dataclasses.replace(report(), notify_urls=[receiver.url("/job")]))
    receiver.wait_delivered(path="/job")
    outbox.enqueue_report(dataclasses.replace(report(1), job_id="job2", notify_urls=[]))
    outbox.enqueue_alert("marker", "later")
    receiver.wait_delivered(path="/team", containing="later")
    assert receiver.delivered("/team", "promo") == [] and len(store.outbox.select()) == 2


def test_url_secrets_are_used_but_never_stored(store, receiver, running, tmp_path):
    url = receiver.url("/hook/TOKENabc123xyz", auth="bot:PASSWORD987zyx@")
    outbox, notifier = sender(store, urls=[url])
    start(running, notifier)
    outbox.enqueue_report(report())
    (post,) = receiver.wait_delivered()
    assert post.path == "/hook/TOKENabc123xyz" and post.headers["Authorization"].startswith("Basic ")
    store.close()
    raw = b"".join(p.read_bytes() for p in tmp_path.glob("heygem.db*"))
    assert b"TOKENabc123xyz" not in raw and b"PASSWORD987zyx" not in raw


def test_a_pending_message_is_sent_by_the_next_sender_after_a_restart(store, receiver):
    url = receiver.url()
    receiver.stop()
    outbox, notifier = sender(store, urls=[url])
    outbox.enqueue_report(report())
    notifier.send_due()
    assert store.outbox.select()[0].state == "retrying"
    receiver.start()
    outbox2, notifier2 = sender(Store(store.path), urls=[url])
    assert outbox2.enqueue_report(report()) == 0
    wait_until(lambda: notifier2.send_due(), 30, lambda: "the retry to come due")
    assert len(receiver.delivered()) == 1


def test_generation_failure_is_reported_again_only_after_a_retry(tmp_path, receiver, running):
    (tmp_path / "config.yaml").write_text("base_dir: .\n")
    cfg = load_config(tmp_path / "config.yaml", environ={"HEYGEM_NOTIFY__URLS": receiver.url()})
    store = Store(cfg.folder("state") / "heygem.db")
    outbox = Outbox(cfg, store)
    start(running, Notifier(outbox))
    life = LifeCycle(cfg, store)
    Announcer(outbox, store).subscribe(life.events)
    staging = cfg.folder("work") / "x" / "in"
    staging.mkdir(parents=True)
    job = store.jobs.create("promo", {"sources": ["promo"], "folder": True, "staging": str(staging)})
    life.queue(job, [NewTask("anna", "a.wav", "anna.jpg", str(cfg.folder("outputs") / "promo/anna.mp4"))])
    crash = Problem(Kind.SETUP, "generate", "engine crashed on frame 12", "try the 480p preset")

    def fail_generation() -> None:
        life.attempt_failed(life.take("cpu"), crash, "cpu")

    fail_generation()
    (post,) = receiver.wait_delivered(containing="engine crashed")
    assert "promo: failed" in post.payload["title"] and "try the 480p preset" in post.payload["message"]
    assert outbox.enqueue_failure(store.jobs.get(job.id), store.jobs.get(job.id).error) == 0
    request_retry(store, "promo")
    life.settle_requests()
    fail_generation()
    receiver.wait_delivered(2, containing="engine crashed")


def test_a_claim_undone_by_recovery_takes_its_unsent_message_with_it(store, receiver):
    outbox, _ = sender(store, urls=[receiver.url()])
    job = store.jobs.create("coffee", {"sources": ["coffee.jpg"], "folder": False})
    record = {"stage": "intake", "problems": [{"file": "coffee.jpg", "reason": "no face", "hint": "use a photo"}]}
    assert outbox.enqueue_failure(job, record) == 1
    store.jobs.delete(job.id)
    assert store.outbox.select() == []


def test_a_webhook_answering_4xx_is_refused_for_good_without_retries(store, receiver):
    receiver.status = 404
    outbox, notifier = sender(store, urls=[receiver.url("/gone")], operator_urls=[receiver.url("/ops")])
    outbox.enqueue_report(report())
    notifier.send_due()
    (row,) = [n for n in store.outbox.select() if n.kind == "report"]
    assert row.state == "gave_up" and row.attempts == 1 and "404" in row.last_error
    assert len([p for p in receiver.posts if p.path == "/gone"]) == 1
    alerts = [p for p in receiver.posts if "refused a chat message" in p.text]
    assert {p.path for p in alerts} == {"/ops"} and len(alerts) == 2  # about /gone, then about /ops itself


def test_a_report_rendered_again_into_another_number_of_parts_adds_nothing(store):
    outbox, _ = sender(store, urls=["wecombot://botkey"])
    assert outbox.enqueue_report(report(signature="s" * 700)) == 2  # 2,048 bytes: two parts
    assert outbox.enqueue_report(report(signature="short")) == 0
    assert len(store.outbox.select()) == 2
