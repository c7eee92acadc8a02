"""Who is told what when a job ends: the one place that decides, from the life cycle's events.

- Refused at intake, or nothing made: a failure message now (reason, hint, where the inputs are).
- Some or all videos made: the batch report from delivery, once the videos are linked and zipped; it
  lists what failed as well, so a job that half failed is announced once, not twice.
- Duplicates are told nothing (the first drop was).
The same moments are the webhooks' job.done / job.failed (video.done when each video is made), so a
webhook's body carries the links the report has. Every message goes through the outbox, whose event keys
make a repeated event (recovery) add nothing.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from heygem_daemon.delivery.report import BatchReport
from heygem_daemon.failures import Problem
from heygem_daemon.generation.lifecycle import Events, JobFinished, JobRefused, JobState, TaskFinished
from heygem_daemon.notify.outbox import Outbox
from heygem_daemon.notify.webhooks import Webhooks
from heygem_daemon.state import Job, Store


def told_by_report(videos: int) -> bool:
    """The rule: a job that made videos is announced by its delivery report, otherwise by a failure message."""
    return videos > 0


class Announcer:
    def __init__(self, outbox: Outbox, store: Store, webhooks: Webhooks | None = None) -> None:
        self.outbox, self.store, self.webhooks = outbox, store, webhooks

    def subscribe(self, events: Events) -> None:
        events.subscribe(JobRefused, self.refused)
        events.subscribe(JobFinished, self.finished)
        events.subscribe(TaskFinished, self.video_made)

    def refused(self, event: JobRefused) -> None:
        self.outbox.enqueue_failure(event.job, event.record)
        self._failed_webhook(event.job, event.record)

    def finished(self, event: JobFinished) -> None:
        if event.record is not None and not told_by_report(len(event.videos)):
            self.outbox.enqueue_failure(event.job, event.record)
            self._failed_webhook(event.job, event.record)

    def video_made(self, event: TaskFinished) -> None:
        job = self.store.jobs.find(event.job_id) if self.webhooks else None
        if self.webhooks and job is not None:
            self.webhooks.enqueue("video.done", job, str(event.task_id))

    def _failed_webhook(self, job: Job, record: dict[str, Any]) -> None:
        # Emitted before the store moves the job: the body says what the job is about to be.
        if self.webhooks:
            self.webhooks.job_ended(replace(job, state=JobState.FAILED.value, error=record))

    def reported(self, report: BatchReport) -> None:
        """Delivery's hand-off for a batch (a job's, or videos another tool left in outputs/)."""
        if not told_by_report(len(report.videos)):
            return  # the job's failure message already said why nothing was made
        job = self.store.jobs.find(report.job_id) if report.job_id else None
        if job is not None:
            warnings = [Problem.of_input(w["file"], w["reason"], w["hint"], "notify")
                        for w in job.spec.get("warnings", [])]
            report = replace(report, notify_urls=self.outbox.job_urls(job), warnings=warnings)
        self.outbox.enqueue_report(report)
        if job is not None and self.webhooks:
            self.webhooks.job_ended(job)
