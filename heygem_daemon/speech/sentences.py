"""A script cut into the parts it is spoken in, and the subtitles those parts make.

Parts end at sentence ends (Chinese and Latin punctuation, line breaks); a sentence longer than the part
limit is cut at its last pause (comma, space) before the limit, or at the limit when it has none. Each part is
one subtitle cue, timed by its own spoken length. Pure functions."""

from __future__ import annotations

import re
from dataclasses import dataclass

# Chinese marks end a sentence wherever they stand; Latin ones only before a space ("3.5", "e.g.x" go on).
_SENTENCE_END = re.compile(r"(?<=[。！？；…])\s*|(?<=[.!?;])\s+|\s*\n\s*")
_PAUSES = "，、,;； "


@dataclass(frozen=True)
class Cue:
    start: float
    end: float
    text: str


def split_script(text: str, max_chars: int) -> list[str]:
    parts: list[str] = []
    for sentence in _SENTENCE_END.split(text):
        sentence = sentence.strip()
        while len(sentence) > max_chars:
            cut = max(sentence.rfind(p, 0, max_chars) for p in _PAUSES) + 1 or max_chars
            parts.append(sentence[:cut].strip())
            sentence = sentence[cut:].strip()
        if sentence:
            parts.append(sentence)
    return parts


def cues(parts: list[str], seconds: list[float], pause: float) -> list[Cue]:
    out, at = [], 0.0
    for text, length in zip(parts, seconds):
        out.append(Cue(at, at + length, text))
        at += length + pause
    return out


def srt(cues_: list[Cue]) -> str:
    return "".join(f"{i}\n{_stamp(c.start, ',')} --> {_stamp(c.end, ',')}\n{c.text}\n\n"
                   for i, c in enumerate(cues_, 1))


def vtt(cues_: list[Cue]) -> str:
    return "WEBVTT\n\n" + "".join(f"{_stamp(c.start, '.')} --> {_stamp(c.end, '.')}\n{c.text}\n\n" for c in cues_)


def _stamp(seconds: float, mark: str) -> str:
    ms = round(seconds * 1000)
    return f"{ms // 3_600_000:02d}:{ms // 60_000 % 60:02d}:{ms // 1000 % 60:02d}{mark}{ms % 1000:03d}"
