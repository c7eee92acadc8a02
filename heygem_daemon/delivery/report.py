"""What a finished batch tells people: the hand-off between delivery (links, zip) and notification."""

from __future__ import annotations

from dataclasses import dataclass, field

from heygem_daemon.failures import Problem


def size_text(size: int) -> str:
    """The one way sizes are written for people (links.txt, chat messages): decimal units, as file managers."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size} B"


@dataclass(frozen=True)
class VideoLink:
    name: str
    """File name relative to the batch folder, e.g. `alice.mp4`."""
    size: int
    sha256: str
    duration: float | None = None
    url: str | None = None
    """Presigned GET link; None in local-only mode."""
    local_path: str | None = None


@dataclass(frozen=True)
class BatchReport:
    job_id: str
    job_name: str
    videos: list[VideoLink] = field(default_factory=list)
    failed: list[Problem] = field(default_factory=list)
    zip_name: str | None = None
    zip_url: str | None = None
    expires_at: float | None = None
    """Unix time when the links stop working."""
    notify_urls: list[str] | None = None
    """Per-job override of notify.urls (from job.yaml); None means the configured default."""
    warnings: list[Problem] = field(default_factory=list)
    """What was not done as asked though the job ran (a job.yaml chat target refused by notify.job_targets)."""

    @property
    def ok(self) -> bool:
        return not self.failed

    @property
    def total_duration(self) -> float:
        return sum(v.duration or 0.0 for v in self.videos)
