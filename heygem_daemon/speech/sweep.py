"""The `speech_cache` cleanup sweep: spoken scripts in work/.speech-cache/ not used for `speech.cache_days`.

The speech step touches a part each time it is used (and its lock each time it is taken), so what goes is
what no retry, re-render or duplicate script has needed for that long."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from heygem_daemon.speech.step import CACHE_DIR

if TYPE_CHECKING:
    from heygem_daemon.ops.cleanup import Sweep

DAY = 86400.0


def sweep_speech_cache(sweep: Sweep) -> None:
    cache = sweep.cfg.folder("work") / CACHE_DIR
    cutoff = sweep.now - sweep.cfg.speech.cache_days * DAY
    try:
        entries = list(os.scandir(cache))
    except FileNotFoundError:
        return
    for entry in entries:  # files only: the services' lock folder stays
        if entry.is_file(follow_symlinks=False) and entry.stat(follow_symlinks=False).st_mtime < cutoff:
            sweep.remove(Path(entry.path))
