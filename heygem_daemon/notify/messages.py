"""Chat message text for a finished batch, a failed job and an operator alert — pure functions.

Every message fits the target service's limits: the zip link comes right after the summary line, a video
list too long for the service is replaced by a pointer to the zip, and lists that still do not fit end
with "and N more" — never a message cut off at a random character.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Any, Callable

from heygem_daemon.delivery.report import BatchReport, VideoLink, size_text

ELLIPSIS = "…"
_MD_SPECIAL = re.compile(r"([\\`*_\[\]<>#|])")


@dataclass(frozen=True)
class Limits:
    body_max: int
    title_max: int
    markdown: bool
    title_in_body: bool
    """The service shows the title inside the body, so both share body_max."""


@dataclass(frozen=True)
class Message:
    title: str
    body: str
    body_format: str
    """apprise body format: `markdown` or `text`."""
    kind: str
    """apprise notify type: `success`, `warning` or `failure`."""


class _Style:
    def __init__(self, markdown: bool) -> None:
        self.markdown = markdown

    def esc(self, text: str) -> str:
        return _MD_SPECIAL.sub(r"\\\1", text) if self.markdown else text

    def link(self, label: str, url: str) -> str:
        return f"[{self.esc(label)}]({url})" if self.markdown else f"{label}: {url}"

    def bold(self, text: str) -> str:
        return f"**{self.esc(text)}**" if self.markdown else text

    def code(self, text: str) -> str:
        return f"`{text}`" if self.markdown else text


def duration_text(seconds: float) -> str:
    s = int(round(seconds))
    h, rest = divmod(s, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"


def time_text(unix: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(unix))


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _title(limits: Limits, text: str) -> str:
    return _cut(text, limits.title_max) if limits.title_max > 0 else text


def _budget(limits: Limits, title: str) -> int:
    room = limits.body_max - (len(title) + 2 if limits.title_in_body and title else 0)
    return max(room, 0)


def _cut(text: str, room: int) -> str:
    """Last resort only (a single line longer than the service allows)."""
    return text if len(text) <= room else text[: max(room - 1, 0)] + ELLIPSIS


def _join(blocks: list[str]) -> str:
    return "\n\n".join(b for b in blocks if b)


Shrinkable = tuple[list[str], Callable[[int], str]]
"""Lines that may be shortened, and the line that says how many were left out."""


def _take(lines: list[str], room: int, more: Callable[[int], str]) -> str:
    """As many whole lines as fit in `room`, then the line saying how many were left out."""
    if len("\n".join(lines)) <= room:
        return "\n".join(lines)
    prefix = [0]
    for line in lines:
        prefix.append(prefix[-1] + len(line) + 1)
    for k in range(len(lines) - 1, -1, -1):
        tail = more(len(lines) - k)
        if prefix[k] + len(tail) <= room:
            return "\n".join([*lines[:k], tail])
    return ""


def _fit(blocks: list[str | Shrinkable], room: int) -> str:
    """Blocks in order, separated by blank lines; lists are shortened (the last one first) until it fits."""
    texts = [b if isinstance(b, str) else "\n".join(b[0]) for b in blocks]
    for i in reversed(range(len(blocks))):
        block = blocks[i]
        if isinstance(block, str) or len(_join(texts)) <= room:
            continue
        others = len(_join(texts[:i] + texts[i + 1:]))
        texts[i] = _take(block[0], room - others - 2, block[1])
    return _cut(_join(texts), room)


def _video_line(v: VideoLink, st: _Style) -> str:
    facts = ", ".join(x for x in (size_text(v.size), duration_text(v.duration) if v.duration else "") if x)
    if v.url and st.markdown:
        return f"- {st.link(v.name, v.url)} ({facts})"
    # Plain text: the link last and alone, so chat clients that auto-link take nothing after it.
    return f"- {v.name} ({facts}): {v.url}" if v.url else f"- {v.name} ({facts})"


def _problem_lines(problems: list[dict[str, Any]], st: _Style) -> list[str]:
    lines = []
    for p in problems:
        what = f"{st.bold(p['file'])}: {st.esc(p['reason'])}" if p.get("file") else st.esc(p["reason"])
        hint = f" — what to do: {st.esc(p['hint'])}" if p.get("hint") else ""
        lines.append(f"- {what}{hint}")
    return lines


def _notes(warnings: list[dict[str, Any]], st: _Style) -> Shrinkable:
    """What the job asked for but did not get (a refused chat target): last, and shortened first."""
    return (["Note:", *_problem_lines(warnings, st)] if warnings else [], _more("notes"))


def _more(what: str) -> Callable[[int], str]:
    return lambda n: f"- … and {n} more {what}"


def report_message(report: BatchReport, limits: Limits, prefix: str) -> Message:
    """Success (or partial success): count, total duration, expiry, zip link, one line per video."""
    st = _Style(limits.markdown)
    n = len(report.videos)
    state = "ready" if report.ok else f"ready, {len(report.failed)} failed"
    title = _title(limits, f"{prefix}{report.job_name}: {_plural(n, 'video')} {state}")
    summary = f"{st.bold(report.job_name)}: {_plural(n, 'video')}, {duration_text(report.total_duration)} in total."
    if report.expires_at:
        summary += f" Links work until {time_text(report.expires_at)}."
    zip_line = ""
    if report.zip_name and report.zip_url:
        zip_line = f"All videos in one zip: {st.link(report.zip_name, report.zip_url)}"
    elif report.zip_name:
        zip_line = f"All videos in one zip on the server: {st.esc(report.zip_name)}"
    videos = [_video_line(v, st) for v in report.videos]
    room = _budget(limits, title)
    video_block: str | Shrinkable = (videos, _more("videos (all in the zip)" if report.zip_name else "videos"))
    if report.zip_url and len(_join([summary, zip_line, *videos])) > room:
        # A long batch: a summary and the zip beat a half list of links.
        video_block = f"{_plural(n, 'video')}: too many links for one message; the zip holds them all."
    failed = _problem_lines([{"file": p.file, "reason": p.reason, "hint": p.hint} for p in report.failed], st)
    failed_block: Shrinkable = (["Not made:", *failed] if failed else [], _more("problems"))
    notes = _notes([{"file": p.file, "reason": p.reason, "hint": p.hint} for p in report.warnings], st)
    body = _fit([summary, zip_line, video_block, failed_block, notes], room)
    return Message(title, body, "markdown" if limits.markdown else "text", "success" if report.ok else "warning")


def failure_message(job_name: str, record: dict[str, Any], limits: Limits, prefix: str) -> Message:
    """A job refused at intake or failed in generation: which input, the reason, the hint."""
    st = _Style(limits.markdown)
    problems = record.get("problems") or [{"file": "", "reason": record.get("reason", "unknown error"),
                                           "hint": record.get("hint", "")}]
    tail = (f"The inputs are in failed/{st.esc(job_name)}/ with error.json. Fix them, then run "
            f"{st.code(f'heygem-daemon retry {job_name}')}.")
    if record.get("stage") == "intake":
        title = _title(limits, f"{prefix}{job_name}: refused")
        head = f"{st.bold(job_name)} was refused at intake; nothing was generated."
    elif record.get("kind") == "cancelled":
        made = record.get("videos_made") or []
        title = _title(limits, f"{prefix}{job_name}: cancelled")
        head = f"{st.bold(job_name)} was cancelled by the operator{f'; {len(made)} video(s) made' if made else ''}."
        tail = (f"The inputs are in failed/{st.esc(job_name)}/. To make it after all, run "
                f"{st.code(f'heygem-daemon retry {job_name}')}.")
        problems = []
    else:
        made = record.get("videos_made") or []
        title = _title(limits, f"{prefix}{job_name}: failed")
        head = (f"{st.bold(job_name)}: {_plural(len(problems), 'video')} could not be made"
                f"{f', {len(made)} made' if made else ''}.")
    problem_block = (_problem_lines(problems, st), _more("problems (see error.json)"))
    body = _fit([head, problem_block, tail, _notes(record.get("warnings") or [], st)], _budget(limits, title))
    return Message(title, body, "markdown" if limits.markdown else "text", "failure")


def alert_message(text: str, limits: Limits, prefix: str) -> Message:
    """Something the operator must fix (wrong credentials, a missing bucket ...)."""
    st = _Style(limits.markdown)
    title = _title(limits, f"{prefix}needs attention")
    return Message(title, _cut(st.esc(text), _budget(limits, title)),
                   "markdown" if limits.markdown else "text", "warning")
