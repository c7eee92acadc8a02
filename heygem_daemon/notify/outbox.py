"""Chat notifications: an outbox in the store and one sender thread.

A message is rendered for each target (that service's length limit and markdown support) and recorded
under an event key before anything is sent, so a restart re-enqueueing the same event adds nothing and a
crash never loses a message. The sender retries a service that is down with backoff and jitter until
`notify.max_age_hours`, then gives up with a logged error. Enqueueing is one insert: generation and intake
never wait for a chat service.
"""

from __future__ import annotations

import hashlib
import threading
import time
from pathlib import Path
from typing import Any, Callable

from heygem_daemon.ops.checks import Check
from heygem_daemon.config import Config, ConfigError, Notify
from heygem_daemon.notify.messages import Message, alert_message, failure_message, report_messages
from heygem_daemon.delivery.report import BatchReport
from heygem_daemon.notify.robots import Answer
from heygem_daemon.notify.targets import (
    Target, configured_urls, job_target_urls, operator_urls, parse_target, send, target_id,
)
from heygem_daemon.log import get_logger
from heygem_daemon.state import Job, NewNotification, Notification, Store
from heygem_daemon.state.outbox import PART
from heygem_daemon.failures import backoff_delay

log = get_logger("heygem.notify")
IDLE_WAIT_SECONDS = 60.0
BATCH = 20


class Outbox:
    """Records messages; `wake` is set whenever there is something new to send."""

    def __init__(self, cfg: Config, store: Store) -> None:
        self.cfg = cfg.notify
        self.store = store
        self.wake = threading.Event()
        self._lock = threading.Lock()
        self._known: dict[str, str] = {}
        self.default_urls = configured_urls(self.cfg)
        self.operator_urls = operator_urls(self.cfg)
        for url in self.default_urls + self.operator_urls:
            self._known[target_id(url)] = url

    # --- enqueue ----------------------------------------------------------------------------

    def enqueue_report(self, report: BatchReport) -> int:
        """A finished batch. The event is the batch's outcome: the same videos and failures are one message,
        however often the report is handed over (links re-signed after a restart included)."""
        outcome = sorted((v.name, v.sha256) for v in report.videos) + sorted((p.file, "") for p in report.failed)
        key = f"report:{report.job_id}:{_digest(repr(outcome))}"
        urls = self.default_urls if report.notify_urls is None else report.notify_urls
        return self._enqueue(key, "report", report.job_id, urls,
                             lambda t: report_messages(report, t.limits(), self.cfg.title_prefix))

    def enqueue_failure(self, job: Job, record: dict[str, Any]) -> int:
        """A job refused at intake or failed in generation (the record is its error.json).
        A later failure of the same job after `retry` has more attempts, so it is a new event."""
        key = f"failed:{job.id}:{self.store.tasks.attempt_count(job.id)}"
        urls = self.job_urls(job)
        urls = self.default_urls if urls is None else urls
        return self._enqueue(key, "failure", job.id, urls,
                             lambda t: [failure_message(job.name, record, t.limits(), self.cfg.title_prefix)])

    def job_urls(self, job: Job) -> list[str] | None:
        """The chat targets of a job's own job.yaml that notify.job_targets allows ([] = none), read from the
        job.yaml kept with its inputs; None = the configured targets (also when that job.yaml is gone)."""
        ids = job.spec.get("notify_ids")
        if not ids:
            return ids
        folder = job.spec.get("inputs_at") or job.spec.get("staging")
        urls = job_target_urls(Path(folder), ids, self.cfg.job_targets) if folder else []
        if len(urls) < len(ids):
            log.warning("some chat targets of the job's job.yaml cannot be read any more or are no longer allowed",
                        job_id=job.id, job=job.name, found=len(urls), wanted=len(ids),
                        fallback="notify.urls" if not urls else None)
        return urls or None

    def enqueue_alert(self, key: str, text: str, resolved: bool = False) -> int:
        """Something the operator must fix (or, `resolved`, that it is fixed now). One message per key per
        `notify.alert_repeat_hours`, however often the condition is seen."""
        window = int(time.time() // (self.cfg.alert_repeat_hours * 3600))
        return self._enqueue(f"alert:{key}:{window}", "alert", None, self.operator_urls,
                             lambda t: [alert_message(text, t.limits(), self.cfg.title_prefix, resolved)])

    def _enqueue(self, key: str, kind: str, job_id: str | None, urls: list[str],
                 render: Callable[[Target], list[Message]]) -> int:
        # Called from intake and the worker supervisor: a problem here is logged, never raised into them.
        try:
            return self._record(key, kind, job_id, urls, render)
        except Exception:
            log.exception("could not record a notification", notification=key, job_id=job_id)
            return 0

    def _record(self, key: str, kind: str, job_id: str | None, urls: list[str],
                render: Callable[[Target], list[Message]]) -> int:
        rows = []
        for url in dict.fromkeys(urls):
            target = parse_target(url)
            if target is None:
                log.error("notification target is not a URL apprise understands; message not sent",
                          notification=key, target=f"#{target_id(url)[:8]}", job_id=job_id,
                          fix="check the URL against https://github.com/caronc/apprise/wiki")
                continue
            with self._lock:
                self._known[target.id] = url
            parts = render(target)
            for i, msg in enumerate(parts, 1):
                part_key = key if len(parts) == 1 else f"{key}{PART}{i}/{len(parts)}"
                rows.append(NewNotification(part_key, target.id, kind, job_id, msg.title, msg.body,
                                            msg.body_format, msg.kind))
        return self.record_rows(rows)

    def record_rows(self, rows: list[NewNotification]) -> int:
        """Rows made elsewhere (webhooks) into the store, and the sender woken. Never raises into the caller."""
        try:
            added = self.store.outbox.add(rows) if rows else 0
        except Exception:
            log.exception("could not record a notification", notification=rows[0].event_key, job_id=rows[0].job_id)
            return 0
        if added:
            log.info("notification queued", notification=rows[0].event_key, kind=rows[0].kind,
                     job_id=rows[0].job_id, targets=added)
            self.wake.set()
        return added

    # --- sending ----------------------------------------------------------------------------

    def url_for(self, row: Notification) -> str | None:
        """The URL behind a stored target: configured, seen since start-up, or from the job's job.yaml (kept with
        its inputs in work/, archive/ or failed/)."""
        with self._lock:
            url = self._known.get(row.target)
        if url is None and row.job_id:
            job = self.store.jobs.find(row.job_id)
            for candidate in (self.job_urls(job) or []) if job else []:
                if target_id(candidate) == row.target:
                    url = candidate
            if url is not None:  # notify.* changes only at a restart: read the job's job.yaml once
                with self._lock:
                    self._known[row.target] = url
        return url


class Notifier:
    """The sender thread: pending messages out, retries with backoff, give-up after max age."""

    name = "notify"

    def __init__(self, outbox: Outbox, senders: dict[str, Callable[[Notification], Answer]] | None = None) -> None:
        self.outbox = outbox
        self.senders = senders or {}
        """Rows of these kinds go to their own sender (webhooks); the rest are chat messages."""
        self.store = outbox.store
        self.cfg = outbox.cfg
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._quiet_from = 0.0  # monotonic time of the last look that found nothing due

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="notify", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 15.0) -> None:
        self._stop.set()
        self.outbox.wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def apply(self, cfg: Config) -> None:
        """notify.* takes effect at the next restart (ops.reload): the targets are the running ones."""

    def quiet_after(self, since: float) -> bool:
        """For a drain: whether a look at the outbox begun after `since` (monotonic) found nothing due, so
        every message recorded before `since` has gone out or waits for a retry; nudges the sender if not."""
        if self._quiet_from >= since:
            return True
        self.outbox.wake.set()
        return False

    def _run(self) -> None:
        while not self._stop.is_set():
            if self.store.db.full_since is not None:  # a send could not be recorded: it would go out twice
                self._stop.wait(1.0)
                continue
            try:
                self.send_due()
            except Exception:
                log.exception("notification sender failed; will try again")
            self.outbox.wake.wait(self._sleep())
            self.outbox.wake.clear()

    def _sleep(self) -> float:
        nxt = self.store.outbox.next_at()
        return IDLE_WAIT_SECONDS if nxt is None else min(max(nxt - time.time(), 0.05), IDLE_WAIT_SECONDS)

    def send_due(self) -> int:
        """Send every message that is due; returns how many went out."""
        sent = 0
        while not self._stop.is_set():
            looked = time.monotonic()
            due = self.store.outbox.due(time.time(), BATCH)
            if not due:
                self._quiet_from = looked
                return sent
            for row in due:
                sent += self._deliver(row)
        return sent

    def _deliver(self, row: Notification) -> int:
        if row.kind in self.senders:
            bound = log.bind(notification=row.event_key, job_id=row.job_id, target=row.target)
            return self._settle(row, self.senders[row.kind](row), bound, row.kind)
        url = self.outbox.url_for(row)
        bound = log.bind(notification=row.event_key, job_id=row.job_id, target=f"#{row.target[:8]}")
        if url is None:
            self.store.outbox.failed(row.id, "target no longer configured", None)
            bound.error("notification dropped: its target is no longer in notify.urls", title=row.title)
            return 0
        target = parse_target(url)
        if target is None:
            self.store.outbox.failed(row.id, "not a URL apprise understands", None)
            bound.error("notification dropped: apprise does not understand the target URL", title=row.title)
            return 0
        bound = bound.bind(target=target.label)
        paced_until = self._paced_until(target)
        if paced_until is not None:
            self.store.outbox.postpone(row.id, paced_until)
            return 0
        answer = send(target, Message(row.title, row.body, row.body_format, row.notify_type))
        if answer.outcome == "refused":
            self._alert_refused(target, row, answer.detail)
        return self._settle(row, answer, bound, target.plugin.service_name or "the chat service")

    def _settle(self, row: Notification, answer: Answer, bound: Any, service: str) -> int:
        """Record a send's outcome: sent, refused for good, given up after max age, or a retry with backoff."""
        if answer.outcome == "delivered":
            # Recorded before anything else: a kill between the service's answer and this commit sends the
            # message again at the next start (at-least-once); nothing else runs inside that window.
            self.store.outbox.sent(row.id)
            bound.info("notification sent", attempts=row.attempts + 1)
            return 1
        if answer.outcome == "refused":
            self.store.outbox.failed(row.id, f"refused by {service}: {answer.detail}", None)
            bound.error("notification refused; it will not be sent again", error=answer.detail,
                        title=row.title, fix="check the target's URL, token and secret (heygem-daemon doctor)")
            return 0
        age = time.time() - row.created_at
        if age >= self.cfg.max_age_hours * 3600:
            self.store.outbox.failed(row.id, answer.detail, None)
            bound.error("notification given up: the service kept failing it", error=answer.detail,
                        attempts=row.attempts + 1, title=row.title,
                        fix="check the service and the URL (heygem-daemon doctor)")
            return 0
        delay = backoff_delay(row.attempts + 1, self.cfg.retry_base_seconds, self.cfg.retry_max_seconds)
        self.store.outbox.failed(row.id, answer.detail, time.time() + delay)
        bound.warning("notification not delivered; will retry", error=answer.detail, attempts=row.attempts + 1,
                      retry_in=round(delay, 1))
        return 0

    def _paced_until(self, target: Target) -> float | None:
        """When the robot's rate limit (N messages per S seconds) lets the next message go, if not now. Read
        from the sent times in the store, so a restart does not reset the count."""
        if target.robot is None:
            return None
        now = time.time()
        until = now
        for count, seconds in target.robot.pace:
            sent = self.store.outbox.sent_since(target.id, now - seconds)
            if len(sent) >= count:
                until = max(until, sent[len(sent) - count] + seconds)
        return until if until > now else None

    def _alert_refused(self, target: Target, row: Notification, detail: str) -> None:
        """One alert per refusing target (per `alert_repeat_hours`): an alert refused by the same target adds
        nothing, so a target that refuses everything cannot make a loop."""
        self.outbox.enqueue_alert(
            f"chat-refused:{target.id}",
            f"{target.label} refused a chat message ({detail}); \"{row.title}\" was not delivered and will not "
            "be sent again. Check that target's URL, token and secret (heygem-daemon doctor); `heygem-daemon "
            "status` lists the refused messages.")


def alert_now(cfg: Notify, key: str, text: str) -> threading.Thread:
    """An alert the store cannot record (its disk is full, and the outbox is in it): sent straight to the
    operator targets, one try each, on a thread of its own so the caller never waits for a chat service.
    Holding it until there is room would tell the operator only once the trouble is over."""
    def go() -> None:
        for url in dict.fromkeys(operator_urls(cfg)):
            target = parse_target(url)
            if target is None:
                continue
            answer = send(target, alert_message(text, target.limits(), cfg.title_prefix))
            if answer.outcome == "delivered":
                log.info("operator alert sent straight to the chat target", alert=key, target=target.label)
            else:
                log.warning("operator alert not delivered (the log and status say it)", alert=key,
                            target=target.label, error=answer.detail)

    thread = threading.Thread(target=go, name=f"alert-{key}", daemon=True)
    thread.start()
    return thread


def notify_checks(cfg: Config) -> list[Check]:
    """`heygem-daemon doctor` lines: every configured URL parses with apprise. Nothing is sent and no service is
    asked (a test message would reach people), and each line says so: OK means understood, not reachable."""
    try:
        urls = configured_urls(cfg.notify)
    except ConfigError as exc:
        return [Check("notify.urls_file", False, str(exc), "fix notify.urls_file or remove it")]
    ops = operator_urls(cfg.notify) if cfg.notify.operator_urls is not None else []
    if not urls and not ops:
        allowed = cfg.notify.job_targets
        per_job = "off" if allowed == "off" else ", ".join(allowed)
        return [Check("notify", True, f"off (notify.urls is empty); job.yaml targets allowed: {per_job}")]
    checks = []
    for key, group in (("notify.urls", urls), ("notify.operator_urls", ops)):
        for i, url in enumerate(group, 1):
            target = parse_target(url)
            name = f"{key}[{i}] #{target_id(url)[:8]}"
            if target is None:
                checks.append(Check(name, False, f"{url.split('://', 1)[0]}:// URL not understood by apprise",
                                    "check the URL format for that service in the apprise wiki"))
            else:
                limits = target.limits()
                unit = {"chars": "characters", "utf8": "bytes", "json": "bytes"}[limits.unit]
                checks.append(Check(name, True, f"URL valid, not contacted: {target.plugin.service_name}, up to "
                                    f"{limits.body_max} {unit}"
                                    f"{', markdown' if limits.markdown else ', plain text'}"))
    return checks


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]
