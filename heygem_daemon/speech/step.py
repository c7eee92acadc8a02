"""The speech step of a script task, run by the worker just before the render engine: the script's text,
spoken sentence by sentence, each part from the cache when it was spoken before, so a retry, a re-render
or the same script in another job never asks the speech engine twice; subtitles from the parts' lengths.

The cache key is sha256 of (engine, what shapes its voice, text). A file lock per key lets two slots given
the same script at once make it once: the second waits (with heartbeats) and takes the first one's file.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import time
import wave
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from heygem_daemon.config import ConfigError
from heygem_daemon.engines.base import BadInputError, Reporter, SetupError, SpeechSpec, TaskSpec
from heygem_daemon.fs.ops import atomic_write_text
from heygem_daemon.speech.sentences import Cue, cues, split_script, srt, vtt
from heygem_daemon.speech.text import ScriptError, read_script

if TYPE_CHECKING:
    import numpy as np

CACHE_DIR = ".speech-cache"
JOIN_RATE = 44100
_LOCK_POLL = 0.1


def spoken(spec: TaskSpec, engines: dict[str, Any], progress: Reporter) -> tuple[TaskSpec, list[Cue]]:
    """The task with its script replaced by the spoken audio, and the subtitle cues of that audio. The
    script is spoken sentence by sentence, each part cached on its own: a part that fails is the only one
    asked again, and the parts are joined with a short pause."""
    plan = spec.speech
    assert plan is not None
    try:
        text = read_script(spec.audio, plan.max_chars)
    except ScriptError as exc:
        raise BadInputError(exc.reason, exc.hint) from None
    parts = split_script(text, plan.part_chars)
    wavs = [speak(plan, part, engines, progress) for part in parts]
    audio, seconds = _joined(plan, wavs)
    return replace(spec, audio=audio, speech=None), cues(parts, seconds, plan.pause_seconds)


def write_subtitles(stem: Path, said: list[Cue]) -> None:
    """`<video>.srt` and `<video>.vtt` beside the video."""
    atomic_write_text(stem.with_name(stem.name + ".srt"), srt(said))
    atomic_write_text(stem.with_name(stem.name + ".vtt"), vtt(said))


def _joined(plan: SpeechSpec, wavs: list[Path]) -> tuple[Path, list[float]]:
    """One audio of the parts with `pause_seconds` of silence between them (cached under the parts' names),
    and each part's length."""
    import numpy as np

    from heygem_daemon.media.audio import load_mono

    clips = [load_mono(w, JOIN_RATE) for w in wavs]
    seconds = [len(c) / JOIN_RATE for c in clips]
    if len(wavs) == 1:
        return wavs[0], seconds
    key = hashlib.sha256(json.dumps([w.stem for w in wavs] + [plan.pause_seconds]).encode()).hexdigest()
    joined = plan.cache / f"{key}.wav"
    if not joined.is_file():
        gap = np.zeros(round(plan.pause_seconds * JOIN_RATE), dtype=np.float32)
        pieces = [piece for c in clips for piece in (c, gap)][:-1]
        _write_wav(joined, np.concatenate(pieces))
    return joined, seconds


def _write_wav(path: Path, samples: np.ndarray) -> None:
    import numpy as np

    part = path.with_name(f".{path.stem}.{os.getpid()}.wav")
    pcm = (np.clip(samples, -1.0, 1.0) * 32767).astype("<i2")
    with wave.open(str(part), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(JOIN_RATE)
        w.writeframes(pcm.tobytes())
    os.replace(part, path)


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
        try:
            engines[key] = build_speech(plan.engine, plan.settings)
        except ConfigError as exc:
            raise SetupError(f"{exc}", "fix the speech: keys of the job's job.yaml (or the config's speech "
                             "section), then retry the job") from None
    return engines[key]


class _locked:
    def __init__(self, path: Path, progress: Reporter) -> None:
        self.path, self.progress = path, progress

    def __enter__(self) -> None:
        self.handle = open(self.path, "a+b")
        while True:
            try:
                fcntl.flock(self.handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                os.utime(self.path)  # in use: the cache sweep leaves it
                return
            except BlockingIOError:
                self.progress.heartbeat()
                time.sleep(_LOCK_POLL)

    def __exit__(self, *exc: object) -> None:
        self.handle.close()
