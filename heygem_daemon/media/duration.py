"""How long a finished video plays, from its container header (no decoding)."""

from __future__ import annotations

from pathlib import Path

import av


def container_seconds(path: Path) -> float | None:
    """Duration in seconds, or None when the file is not a readable media container."""
    try:
        with av.open(str(path)) as container:
            return container.duration / av.time_base if container.duration else None
    except (av.FFmpegError, OSError):
        return None
