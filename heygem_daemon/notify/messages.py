"""Chat message text for a finished batch, a failed job and an operator alert — pure functions.

Every message fits the target service's limits, counted as that service counts them (characters, UTF-8
bytes, or bytes of the JSON request): the zip link comes right after the summary line; a batch whose links
do not fit one message is split into a few parts (each link whole) before anything is left out; a video
list too long even for that is replaced by a pointer to the zip, and lists that still do not fit end with
"and N more" — never a message cut off at a random character, and never a one-video batch without its link.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from typing import Any, Callable

from heygem_daemon.delivery.report import BatchReport, VideoLink, size_text

ELLIPSIS = "…"
MAX_PARTS = 3
"""A batch report is split into at most this many messages; beyond that the zip (or "and N more") speaks for
the list, so a big batch does not use up a robot's 20 messages a minute."""
_MD_SPECIAL = re.compile(r"([\\`*_\[\]<>#|])")
Size = Callable[[str], int]


@dataclass(frozen=True)
class Limits:
    body_max: int
    title_max: int
    markdown: bool
    title_in_body: bool
    """The service shows the title inside the body, so both share body_max."""
    unit: str = "chars"
    """How the service counts body_max: `chars`, `utf8` (bytes) or `json` (bytes of the JSON-encoded string,
    for a service that limits its whole request body)."""

    def size(self, text: str) -> int:
        if self.unit == "utf8":
            return len(text.encode())
        if self.unit == "json":
            return len(json.dumps(text, ensure_ascii=False).encode()) - 2
        return len(text)


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
    return _cut(text, limits.title_max, len) if limits.title_max > 0 else text


def _budget(limits: Limits, title: str) -> int:
    # A title shown in the body travels with a separator ("\r\n", or "# " and "\n" in markdown): 3 at most.
    room = limits.body_max - (limits.size(title) + 3 if limits.title_in_body and title else 0)
    return max(room, 0)


def _cut(text: str, room: int, size: Size) -> str:
    """Last resort only (a single line longer than the service allows): the longest head that fits, and …"""
    if size(text) <= room:
        return text
    lo, hi = 0, len(text)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if size(text[:mid]) + size(ELLIPSIS) <= room:
            lo = mid
        else:
            hi = mid - 1
    return text[:lo] + ELLIPSIS if room >= size(ELLIPSIS) else ""


def _join(blocks: list[str]) -> str:
    return "\n\n".join(b for b in blocks if b)


Shrinkable = tuple[list[str], Callable[[int], str]]
"""Lines that may be shortened, and the line that says how many were left out."""


def _take(lines: list[str], room: int, more: Callable[[int], str], size: Size) -> str:
    """As many whole lines as fit in `room`, then the line saying how many were left out."""
    if size("\n".join(lines)) <= room:
        return "\n".join(lines)
    prefix = [0]
    for line in lines:  # every unit counts the same alone as joined (per character), so sizes add up
        prefix.append(prefix[-1] + size(line) + size("\n"))
    for k in range(len(lines) - 1, -1, -1):
        tail = more(len(lines) - k)
        if prefix[k] + size(tail) <= room:
            return "\n".join([*lines[:k], tail])
    return ""


def _text(block: str | Shrinkable) -> str:
    return block if isinstance(block, str) else "\n".join(block[0])


def _fit(blocks: list[str | Shrinkable], room: int, size: Size) -> str:
    """Blocks in order, separated by blank lines; lists are shortened (the last one first) until it fits."""
    texts = [_text(b) for b in blocks]
    for i in reversed(range(len(blocks))):
        block = blocks[i]
        if isinstance(block, str) or size(_join(texts)) <= room:
            continue
        others = size(_join(texts[:i] + texts[i + 1:]))
        texts[i] = _take(block[0], room - others - size("\n\n"), block[1], size)
    return _cut(_join(texts), room, size)


def _pack(blocks: list[list[str]], room: int, size: Size) -> list[str]:
    """Whole lines, in order, into as few messages as they need (a block may go on in the next one)."""
    parts: list[str] = []
    current = ""
    for block in blocks:
        sep = "\n\n"
        for line in block:
            joined = f"{current}{sep}{line}" if current else line
            if current and size(joined) > room:
                parts.append(current)
                joined = line
            current, sep = joined, "\n"
    return [_cut(p, room, size) for p in [*parts, current] if p]


def _video_text(v: VideoLink, st: _Style, name: str) -> str:
    facts = ", ".join(x for x in (size_text(v.size), duration_text(v.duration) if v.duration else "") if x)
    if v.url and st.markdown:
        return f"- {st.link(name, v.url)} ({facts})"
    # Plain text: the link last and alone, so chat clients that auto-link take nothing after it.
    return f"- {name} ({facts}): {v.url}" if v.url else f"- {name} ({facts})"


def _video_line(v: VideoLink, st: _Style, room: int, size: Size) -> str:
    """One video; a name too long to go beside its link in one message is shortened, never the link."""
    line = _video_text(v, st, v.name)
    if size(line) <= room:
        return line
    name = _cut(v.name, max(room - size(_video_text(v, st, "")), size(ELLIPSIS)), size)
    return _video_text(v, st, name)
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


def _format(limits: Limits) -> str:
    return "markdown" if limits.markdown else "text"


def _parts(title: str, bodies: list[str], limits: Limits, kind: str) -> list[Message]:
    if len(bodies) == 1:
        return [Message(title, bodies[0], _format(limits), kind)]
    return [Message(_part_title(limits, title, i, len(bodies)), b, _format(limits), kind)
            for i, b in enumerate(bodies, 1)]


def _part_title(limits: Limits, title: str, i: int, n: int) -> str:
    return _title(limits, f"{title} ({i}/{n})")


def report_messages(report: BatchReport, limits: Limits, prefix: str) -> list[Message]:
    """Success (or partial success): count, total duration, expiry, zip link, one line per video — in one
    message, or split into up to MAX_PARTS when the links do not fit one."""
    st = _Style(limits.markdown)
    size = limits.size
    n = len(report.videos)
    state = "ready" if report.ok else f"ready, {len(report.failed)} failed"
    title = _title(limits, f"{prefix}{report.job_name}: {_plural(n, 'video')} {state}")
    kind = "success" if report.ok else "warning"
    summary = f"{st.bold(report.job_name)}: {_plural(n, 'video')}, {duration_text(report.total_duration)} in total."
    if report.expires_at:
        summary += f" Links work until {time_text(report.expires_at)}."
    zip_line = ""
    if report.zip_name and report.zip_url:
        zip_line = f"All videos in one zip: {st.link(report.zip_name, report.zip_url)}"
    elif report.zip_name:
        zip_line = f"All videos in one zip on the server: {st.esc(report.zip_name)}"
    room = _budget(limits, title)
    split_room = _budget(limits, _part_title(limits, title, MAX_PARTS, MAX_PARTS))
    videos = [_video_line(v, st, split_room, size) for v in report.videos]
    failed = _problem_lines([{"file": p.file, "reason": p.reason, "hint": p.hint} for p in report.failed], st)
    failed_block: Shrinkable = (["Not made:", *failed] if failed else [], _more("problems"))
    notes = _notes([{"file": p.file, "reason": p.reason, "hint": p.hint} for p in report.warnings], st)
    rest = _join([_text(failed_block), _text(notes)])
    whole = _join([summary, zip_line, "\n".join(videos), rest])
    if size(whole) <= room:
        return _parts(title, [whole], limits, kind)
    bodies = _pack([[summary], [zip_line] if zip_line else [], videos], split_room, size)
    if len(bodies) > MAX_PARTS:
        # Too many links even for a few messages: a summary and the zip beat a half list of links.
        video_block: str | Shrinkable = (videos, _more("videos (all in the zip)" if report.zip_name else "videos"))
        if report.zip_url:
            video_block = f"{_plural(n, 'video')}: too many links for one message; the zip holds them all."
        return _parts(title, [_fit([summary, zip_line, video_block, failed_block, notes], room, size)], limits, kind)
    if rest and size(_join([bodies[-1], rest])) <= split_room:
        bodies[-1] = _join([bodies[-1], rest])
    elif rest and len(bodies) < MAX_PARTS:
        bodies.append(_fit([failed_block, notes], split_room, size))
    elif rest:
        bodies[-1] = _fit([bodies[-1], failed_block, notes], split_room, size)
    return _parts(title, bodies, limits, kind)


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
    body = _fit([head, problem_block, tail, _notes(record.get("warnings") or [], st)], _budget(limits, title),
                limits.size)
    return Message(title, body, _format(limits), "failure")


def alert_message(text: str, limits: Limits, prefix: str, resolved: bool = False) -> Message:
    """Something the operator must fix (wrong credentials, a missing bucket ...), or that it is fixed now."""
    st = _Style(limits.markdown)
    title = _title(limits, f"{prefix}{'resolved' if resolved else 'needs attention'}")
    return Message(title, _cut(st.esc(text), _budget(limits, title), limits.size), _format(limits),
                   "success" if resolved else "warning")
