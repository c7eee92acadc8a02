"""Message text per chat service: markdown where the service renders it, within its length limit, with
the zip link kept when a batch is too long to list. Limits come from the real apprise plugins."""

import dataclasses

import pytest

from heygem_daemon.notify.messages import failure_message, report_messages
from heygem_daemon.delivery.report import BatchReport, VideoLink
from heygem_daemon.failures import Problem
from heygem_daemon.notify.targets import parse_target

PREFIX = "[heygem] "
ZIP_URL = "https://s3.example.com/bucket/promo.zip?X-Amz-Signature=zipsig"


def video(i: int) -> VideoLink:
    return VideoLink(f"clip-{i:03d}.mp4", 12_300_000, "a" * 64, 27.0,
                     f"https://s3.example.com/bucket/k{i}/clip-{i:03d}.mp4?X-Amz-Signature=" + "f" * 300)


def batch(n: int, zip_url: str | None = ZIP_URL, failed: list[Problem] | None = None) -> BatchReport:
    return BatchReport("j1", "promo", [video(i) for i in range(n)], failed or [], "promo_20250101_1200.zip",
                       zip_url, 1_767_225_600.0)


def limits(url: str):
    return parse_target(url).limits()


def shown_length(msg, lim) -> int:
    """What the service counts: the title travels inside the body (with a separator) when the service has no
    title field."""
    return lim.size(msg.title) + 3 + lim.size(msg.body) if lim.title_in_body else lim.size(msg.body)


def test_report_names_the_job_count_total_duration_expiry_and_every_link():
    (msg,) = report_messages(batch(3), limits("json://127.0.0.1/hook"), PREFIX)
    assert "promo" in msg.title and "3 videos" in msg.title
    assert "3 videos, 1:21 in total" in msg.body
    assert "2026-01-01 00:00 UTC" in msg.body
    assert ZIP_URL in msg.body
    for i in range(3):
        assert video(i).url in msg.body
    assert msg.kind == "success"


def test_markdown_for_services_that_render_it_plain_text_for_the_others():
    (md,) = report_messages(batch(2), limits("json://127.0.0.1/hook"), PREFIX)
    (text,) = report_messages(batch(2), limits("wecombot://botkey"), PREFIX)
    assert md.body_format == "markdown" and f"]({video(0).url})" in md.body
    assert text.body_format == "text" and "](" not in text.body and "**" not in text.body
    assert f"clip-000.mp4 (12.3 MB, 0:27): {video(0).url}" in text.body


@pytest.mark.parametrize("url", ["wecombot://botkey", "tgram://123456789:abcdefg_hijklmnop/12315544",
                                 "json://127.0.0.1/hook", "dingtalk://token/"])
def test_long_batch_becomes_a_summary_with_the_zip_link_within_the_service_limit(url):
    lim = limits(url)
    (msg,) = report_messages(batch(300), lim, PREFIX)
    assert shown_length(msg, lim) <= lim.body_max
    assert ZIP_URL in msg.body and "300 videos" in msg.body
    assert video(0).url not in msg.body


def test_long_batch_without_a_zip_link_lists_what_fits_and_says_how_many_more():
    lim = limits("wecombot://botkey")
    (msg,) = report_messages(batch(40, zip_url=None), lim, PREFIX)
    assert shown_length(msg, lim) <= lim.body_max
    listed = [i for i in range(40) if video(i).url in msg.body]
    assert listed == list(range(len(listed))) and 0 < len(listed) < 40
    assert f"and {40 - len(listed)} more videos" in msg.body


def test_partly_failed_batch_lists_what_was_not_made():
    (msg,) = report_messages(batch(1, failed=[Problem.of_input("ben.mp4", "no face found", "use a front photo")]),
                         limits("json://127.0.0.1/hook"), PREFIX)
    assert msg.kind == "warning" and "1 failed" in msg.title
    assert "ben.mp4" in msg.body and "no face found" in msg.body and "use a front photo" in msg.body


def test_a_refused_job_target_is_a_note_after_the_videos_and_keeps_the_report_a_success():
    note = Problem.of_input("job.yaml", "notify entry 1 (json:// #1a2b3c4d) not used: host 10.0.0.5 is not allowed",
                   "ask the operator to allow it in notify.job_targets")
    (msg,) = report_messages(dataclasses.replace(batch(2), warnings=[note]), limits("json://127.0.0.1/hook"), PREFIX)
    assert msg.kind == "success" and "failed" not in msg.title
    assert msg.body.index(video(1).url) < msg.body.index("Note:") < msg.body.index("#1a2b3c4d")
    assert "ask the operator to allow it" in msg.body


def test_failure_names_the_input_the_reason_and_the_hint():
    record = {"stage": "intake", "reason": "coffee.jpg: no face found",
              "problems": [{"file": "coffee.jpg", "reason": "no face found in coffee.jpg",
                            "hint": "use a front-facing photo"}]}
    msg = failure_message("coffee", record, limits("wecombot://botkey"), PREFIX)
    assert msg.kind == "failure" and msg.title == "[heygem] coffee: refused"
    assert "- coffee.jpg: no face found in coffee.jpg — what to do: use a front-facing photo" in msg.body
    assert "heygem-daemon retry coffee" in msg.body


def test_a_cancelled_job_is_said_to_be_cancelled_not_to_need_fixing():
    from heygem_daemon.failures import Kind, Problem, error_record
    from heygem_daemon.generation.lifecycle import CANCELLED_HINT, CANCELLED_REASON

    record = error_record("coffee", "generate", [Problem(Kind.CANCELLED, "generate", CANCELLED_REASON, CANCELLED_HINT)])
    msg = failure_message("coffee", record, limits("json://127.0.0.1/hook"), PREFIX)
    assert msg.title.endswith("coffee: cancelled") and "cancelled by the operator" in msg.body
    assert "fix" not in msg.body.lower() and "heygem-daemon retry coffee" in msg.body


def test_failure_with_many_problems_stays_within_the_limit_and_counts_the_rest():
    problems = [{"file": f"take-{i}.jpg", "reason": "no face found " + "x" * 80, "hint": "use a front photo"}
                for i in range(100)]
    lim = limits("wecombot://botkey")
    msg = failure_message("big", {"stage": "generate", "problems": problems}, lim, PREFIX)
    assert shown_length(msg, lim) <= lim.body_max
    shown = sum(f"take-{i}.jpg" in msg.body for i in range(100))
    assert 0 < shown < 100 and f"and {100 - shown} more problems" in msg.body
    assert "heygem-daemon retry big" in msg.body


def test_markdown_in_file_names_is_shown_literally():
    record = {"stage": "intake", "problems": [{"file": "[x](http://evil)*.jpg", "reason": "bad", "hint": ""}]}
    msg = failure_message("x", record, limits("json://127.0.0.1/hook"), PREFIX)
    assert "\\[x\\](http://evil)\\*.jpg" in msg.body



def test_a_video_name_too_long_to_go_beside_its_link_is_shortened_never_the_link():
    lim = limits("wecombot://botkey")
    long = dataclasses.replace(video(0), name="长" * 700 + ".mp4")
    msgs = report_messages(dataclasses.replace(batch(1), videos=[long]), lim, PREFIX)
    assert all(shown_length(m, lim) <= lim.body_max for m in msgs)
    assert long.url in "".join(m.body for m in msgs) and ZIP_URL in "".join(m.body for m in msgs)
    assert [m.title[-5:] for m in msgs] == ["(1/2)", "(2/2)"]
