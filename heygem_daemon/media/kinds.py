"""Which file names are audio, scripts, portrait images or portrait videos (by extension, before any decoding)."""

from __future__ import annotations

from enum import Enum
from pathlib import PurePath


class MediaKind(str, Enum):
    AUDIO = "audio"
    IMAGE = "image"
    VIDEO = "video"
    SCRIPT = "script"
    """Text to be spoken: the speech engine makes the audio (heygem_daemon/speech/)."""
    OTHER = "other"


AUDIO_EXTS = frozenset({".wav", ".mp3", ".m4a", ".aac", ".flac", ".ogg", ".opus"})
IMAGE_EXTS = frozenset({".jpg", ".jpeg", ".png", ".webp"})
VIDEO_EXTS = frozenset({".mp4", ".mov", ".webm"})
SCRIPT_EXTS = frozenset({".txt"})
SPEECH_KINDS = frozenset({MediaKind.AUDIO, MediaKind.SCRIPT})
"""What a video's sound comes from: an audio file, or a script the speech engine reads out."""


def kind_of(path: PurePath | str) -> MediaKind:
    ext = PurePath(path).suffix.lower()
    if ext in AUDIO_EXTS:
        return MediaKind.AUDIO
    if ext in IMAGE_EXTS:
        return MediaKind.IMAGE
    if ext in VIDEO_EXTS:
        return MediaKind.VIDEO
    if ext in SCRIPT_EXTS:
        return MediaKind.SCRIPT
    return MediaKind.OTHER
