"""The speech step of a script task, run by the worker just before the render engine: the script's text,
spoken, from the cache when it was spoken before, so a retry, a re-render or the same script in another
job never asks the speech engine twice.

The cache key is sha256 of (engine, what shapes its voice, text). A file lock per key lets two slots given
the same script at once make it once: the second waits (with heartbeats) and takes the first one's file.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from heygem_daemon.engines.base import BadInputError, Reporter, SpeechSpec, TaskSpec
from heygem_daemon.speech.text import ScriptError, read_script

CACHE_DIR = ".speech-cache"
_LOCK_POLL = 0.1


def spoken(spec: TaskSpec, engines: dict[str, Any], progress: Reporter) -> TaskSpec:
    """The task with its script replaced by the spoken audio (made now, or found in the cache)."""
    assert spec.speech is not None
    try:
        text = read_script(spec.audio, spec.speech.max_chars)
    except ScriptError as exc:
        raise BadInputError(exc.reason, exc.hint) from None
    return replace(spec, audio=speak(spec.speech, text, engines, progress), speech=None)


def speak(plan: SpeechSpec, text: str, engines: dict[str, Any], progress: Reporter) -> Path:
    engine = _engine(plan, engines)
    key = cache_key(plan.engine, engine.voice(), text)
    plan.cache.mkdir(parents=True, exist_ok=True)
    wav = plan.cache / f"{key}.wav"
    with _locked(plan.cache / f".{key}.lock", progress):
        if wav.is_file():
            os.utime(wav)  # last used: what a sweep of the cache would go by
            return wav
        part = plan.cache / f".{key}.{os.getpid()}.wav"
        try:
            engine.synthesise(text, part, progress)
            os.replace(part, wav)
        finally:
            part.unlink(missing_ok=True)
    return wav


def cache_key(engine: str, voice: dict[str, Any], text: str) -> str:
    blob = json.dumps({"engine": engine, "voice": voice, "text": text}, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()


def _engine(plan: SpeechSpec, engines: dict[str, Any]) -> Any:
    """Built once per worker process and settings (a reload may change them)."""
    from heygem_daemon.speech.registry import build_speech

    key = "speech:" + plan.engine + json.dumps(plan.settings, sort_keys=True, default=str)
    if key not in engines:
        engines[key] = build_speech(plan.engine, plan.settings)
    return engines[key]


class _locked:
    def __init__(self, path: Path, progress: Reporter) -> None:
        self.path, self.progress = path, progress

    def __enter__(self) -> None:
        self.handle = open(self.path, "a+b")
        while True:
            try:
                fcntl.flock(self.handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                self.progress.heartbeat()
                time.sleep(_LOCK_POLL)

    def __exit__(self, *exc: object) -> None:
        self.handle.close()
