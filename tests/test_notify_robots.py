"""The chat robots that answer HTTP 200 with their verdict in the body (DingTalk, WeCom, Feishu), through the
real sender and outbox, against stand-ins that check what the services check (tests/robot_receiver.py),
reached as the real hosts through an HTTPS proxy with a local CA."""

import dataclasses
import time
from urllib.parse import quote

import pytest

from heygem_daemon.cli import main
from heygem_daemon.config import load_config
from heygem_daemon.delivery.report import BatchReport, VideoLink
from heygem_daemon.state import Store, db_path
from heygem_daemon.views import job_view
from robot_receiver import RobotServers
from test_notify_outbox import report, sender, store  # noqa: F401 (store is a fixture)

SECRET = "SEC0a1b2c3d4e5f"
CJK_NAME = "春季新品发布会主持人口播视频第一版横屏高清无字幕最终确认版本请勿外传仅供内部审阅使用谢谢合作"[:53]


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    s = RobotServers(tmp_path_factory.mktemp("robots")).start()
    yield s
    s.stop()


@pytest.fixture
def robots(servers, monkeypatch):
    for key, value in servers.env().items():
        monkeypatch.setenv(key, value)
    return servers


def presigned(key: str) -> str:
    """A link as S3 signs it: the key percent-encoded (9 bytes per CJK character), then the signature."""
    return (f"https://s3.example.com/media/{quote(key)}?X-Amz-Algorithm=AWS4-HMAC-SHA256"
            "&X-Amz-Credential=AKIAIOSFODNN7EXAMPLE%2F20261207%2Fus-east-1%2Fs3%2Faws4_request"
            "&X-Amz-Date=20261207T233900Z&X-Amz-Expires=604800&X-Amz-SignedHeaders=host"
            f"&X-Amz-Signature={'e3' * 32}")


def cjk_batch(n: int, name: str = CJK_NAME) -> BatchReport:
    videos = [VideoLink(f"{name}{i}.mp4", 48_000_000, f"{i:064d}", 31.0, presigned(f"{name}/{name}{i}.mp4"))
              for i in range(n)]
    return BatchReport(f"job-{n}", name, videos, [], f"{name}_20261207_2339.zip",
                       presigned(f"{name}/{name}_20261207_2339.zip"), 1_767_225_600.0)


def texts(received) -> str:
    return "\n".join(r.text for r in received)


def send_report(store, robots: RobotServers, service: str, url: str, robot: str, batch: BatchReport) -> list:
    """`batch` through the outbox to a new robot of `service`; what that robot received."""
    robots.add(service, robot)
    outbox, notifier = sender(store, urls=[url.format(t=robot)])
    outbox.enqueue_report(batch)
    notifier.send_due()
    return [r for r in robots.received if r.robot == robot]


def test_a_signed_dingtalk_robot_takes_the_report_signed_as_dingtalk_documents(store, robots):
    robots.add("dingtalk", "dtsigned", SECRET)
    outbox, notifier = sender(store, urls=[f"dingtalk://{SECRET}@dtsigned/"])
    outbox.enqueue_report(report())
    assert notifier.send_due() == 1
    (got,) = [r for r in robots.taken("dingtalk") if r.robot == "dtsigned"]
    assert "sign=" in got.raw_query and "%25" not in got.raw_query  # URL-encoded once
    assert "https://s3.example.com/b/v2.mp4?s=sig" in got.text
    assert [n.state for n in store.outbox.select()] == ["sent"]


def test_a_refused_message_is_not_recorded_sent_and_the_operator_is_alerted_once(store, robots):
    robots.add("dingtalk", "dtwrong", SECRET)
    robots.add("wecom", "ops-refused")
    outbox, notifier = sender(store, urls=["dingtalk://SECnotthesecret@dtwrong/"], operator_urls=["wecombot://ops-refused"])
    outbox.enqueue_report(report())
    outbox.enqueue_report(dataclasses.replace(report(), job_id="job2"))
    notifier.send_due()
    refused = [n for n in store.outbox.select() if n.kind == "report"]
    assert [n.state for n in refused] == ["gave_up", "gave_up"]
    assert all("310000" in n.last_error and "sign not match" in n.last_error for n in refused)
    (alert,) = [r for r in robots.taken("wecom") if r.robot == "ops-refused"]
    assert "310000" in alert.text and "DingTalk" in alert.text and SECRET not in alert.text


def test_a_rate_limit_answer_is_retried_later_not_refused(store, robots):
    busy = robots.add("wecom", "busy")
    busy.sent.extend([time.monotonic()] * 20)  # another program used this minute's 20 messages
    outbox, notifier = sender(store, urls=["wecombot://busy"])
    outbox.enqueue_report(report())
    notifier.send_due()
    (row,) = store.outbox.select()
    assert row.state == "retrying" and "45009" in row.last_error and row.next_at > time.time()
    assert robots.refused(45009) and not [r for r in robots.taken() if r.robot == "busy"]


def test_a_robot_gets_at_most_20_messages_a_minute_and_the_rest_wait(store, robots):
    robots.add("wecom", "paced")
    outbox, notifier = sender(store, urls=["wecombot://paced"])
    for i in range(25):
        outbox.enqueue_alert(f"alert-{i}", f"condition {i}")
    notifier.send_due()
    assert len([r for r in robots.received if r.robot == "paced"]) == 20  # none refused by the robot
    rows = store.outbox.select()
    first_sent = min(n.sent_at for n in rows if n.state == "sent")
    waiting = [n for n in rows if n.state == "pending"]
    assert len(waiting) == 5 and all(n.attempts == 0 and n.next_at >= first_sent + 60 for n in waiting)


@pytest.mark.parametrize("service,url", [("dingtalk", "dingtalk://{t}/"), ("wecom", "wecombot://{t}"),
                                         ("feishu", "feishu://{t}")])
def test_a_one_video_batch_with_a_long_cjk_name_arrives_with_its_link_and_the_zip_link(store, robots, service, url):
    batch = cjk_batch(1)
    got = send_report(store, robots, service, url, f"one{service}", batch)
    assert got and all(r.errcode == 0 for r in got)
    assert batch.videos[0].url in texts(got) and batch.zip_url in texts(got)
    assert {n.state for n in store.outbox.select()} == {"sent"}


@pytest.mark.parametrize("service,url,n", [("dingtalk", "dingtalk://{t}/", 15), ("wecom", "wecombot://{t}", 2),
                                           ("feishu", "feishu://{t}", 15)])
def test_a_cjk_batch_over_the_robots_byte_limit_arrives_whole_in_parts(store, robots, service, url, n):
    """15 such videos are 19,618 characters (apprise's DingTalk/Feishu limit is 19,985) but 21,360 bytes."""
    batch = cjk_batch(n)
    got = send_report(store, robots, service, url, f"parts{service}", batch)
    assert len(got) > 1 and all(r.errcode == 0 for r in got)
    assert all(v.url in texts(got) for v in batch.videos) and batch.zip_url in texts(got)


@pytest.mark.parametrize("service,url", [("dingtalk", "dingtalk://{t}/"), ("wecom", "wecombot://{t}"),
                                         ("feishu", "feishu://{t}")])
def test_a_batch_too_long_for_three_messages_is_one_summary_with_the_zip_link(store, robots, service, url):
    batch = cjk_batch(60)
    (got,) = send_report(store, robots, service, url, f"long{service}", batch)
    assert got.errcode == 0 and batch.zip_url in got.text and "60 videos" in got.text


def test_a_failure_naming_12_cjk_portraits_fits_wecoms_2048_bytes(store, robots):
    robots.add("wecom", "cjk-failure")
    outbox, notifier = sender(store, urls=["wecombot://cjk-failure"])
    job = store.jobs.create("春季新品", {"sources": ["春季新品"], "folder": True})
    problems = [{"file": f"{CJK_NAME[:40]}{i}.jpg", "reason": f"在{CJK_NAME[:40]}{i}.jpg中没有找到人脸",
                 "hint": "请使用正面清晰的人像照片"} for i in range(12)]
    outbox.enqueue_failure(job, {"stage": "intake", "problems": problems})
    notifier.send_due()
    (got,) = [r for r in robots.received if r.robot == "cjk-failure"]
    assert got.errcode == 0 and len(got.text.encode()) <= 2048
    assert "heygem-daemon retry 春季新品" in got.text and "more problems" in got.text


@pytest.mark.parametrize("legacy", [False, True], ids=["code", "StatusCode"])
def test_feishu_counts_as_delivered_only_on_its_success_answer(store, robots, legacy):
    robots.legacy_feishu = legacy
    try:
        robots.add("feishu", f"fs-{legacy}")
        outbox, notifier = sender(store, urls=[f"feishu://fs-{legacy}", "feishu://unknownhook"])
        outbox.enqueue_report(report())
        notifier.send_due()
    finally:
        robots.legacy_feishu = False
    states = sorted((n.state, n.last_error or "") for n in store.outbox.select() if n.kind == "report")
    assert states[0] == ("gave_up", "refused by Feishu: code 19001: param invalid: incoming webhook access token "
                                    "invalid") and states[1] == ("sent", "")


def test_a_refused_job_message_shows_in_status_and_the_job_view(robots, tmp_path, capsys):
    (tmp_path / "config.yaml").write_text("base_dir: .\n")
    cfg = load_config(tmp_path / "config.yaml", environ={})
    store = Store(db_path(cfg.folder("state")))
    outbox, notifier = sender(store, urls=["wecombot://nosuchrobot"])
    job = store.jobs.create("coffee", {"sources": ["coffee.jpg"], "folder": False})
    outbox.enqueue_failure(job, {"stage": "intake", "problems": [{"file": "coffee.jpg", "reason": "no face",
                                                                  "hint": ""}]})
    notifier.send_due()
    (refused,) = job_view(cfg, store, job)["chat"]["not_delivered"]
    assert refused["reason"] == "refused by WeCom Bot: errcode 93000: invalid webhook url"
    assert main(["-c", str(tmp_path / "config.yaml"), "status"]) == 0
    out = capsys.readouterr().out
    assert "    chat message not delivered: refused by WeCom Bot: errcode 93000" in out
    # the operator alert about it went to the same robot: refused too, and shown as a message of no job
    assert "chat message not delivered: [heygem] needs attention (refused by WeCom Bot: errcode 93000" in out
    store.close()


def test_slack_through_apprise_is_delivered_on_ok_and_refused_for_good_on_no_service(store, robots):
    hook = "T1JJ3T3L2/A1BRTD4JD/TIiajkdnlazkcOXrIdevi7"
    robots.add("slack", hook)
    outbox, notifier = sender(store, urls=[f"slack://{hook}/#general", "slack://T1JJ3T3L2/A1BRTD4JD/Gone0/#general"])
    outbox.enqueue_report(report())
    notifier.send_due()
    states = sorted((n.state, n.attempts, (n.last_error or "")[-10:]) for n in store.outbox.select()
                    if n.kind == "report")
    assert states == [("gave_up", 1, "error=404."), ("sent", 1, "")]
