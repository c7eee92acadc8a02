"""The HeyGem / Duix-Avatar voice service (fish-speech, port 18180), as its official client calls it:
`POST /v1/invoke` with the whole text and a trained voice (reference audio + its text, as
`/v1/preprocess_and_tran` answered), the answer's body being the audio (shared/reference: HEYGEM_TTS.md).

Each service runs one request at a time (one GPU): a lock file per service beside the cache, held for the
request, serialises this host's workers. A service that does not take the connection is out: the next
one is tried, and when none answers the task waits without using an attempt (an outage). A 4xx answer is
the service refusing this text: bad input, failed once. Anything else that is not decodable audio (5xx,
JSON instead of audio, audio that does not decode, no answer within the limit) is a counted attempt.
"""

from __future__ import annotations

import os
import time
import uuid
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any, ClassVar

import requests
from pydantic import Field

from heygem_daemon.engines.base import BadInputError, EngineError, EngineSettings, OutageError, Reporter
from heygem_daemon.engines.heygem.pool import ServicePool
from heygem_daemon.engines.heygem.settings import Endpoint
from heygem_daemon.speech.base import check_speech

# What the official client sends with every request.
CLIENT_PARAMS: dict[str, Any] = {
    "format": "wav", "topP": 0.7, "max_new_tokens": 1024, "chunk_length": 100, "repetition_penalty": 1.2,
    "temperature": 0.7, "need_asr": False, "streaming": False, "is_fixed_seed": 0, "is_norm": 1,
}
_WAIT_POLL = 0.2
_BEAT_SECONDS = 0.5


class HeygemTtsSettings(EngineSettings):
    services: list[str] = Field(["http://127.0.0.1:18180"], min_length=1,
                                description="base URLs, one per TTS container (each speaks one request at a time)")
    reference_audio: str = Field("", description="the trained voice: asr_format_audio_url from /v1/preprocess_and_tran")
    reference_text: str = Field("", description="the trained voice: reference_audio_text from the same answer")
    params: dict[str, Any] = Field(default_factory=dict, description="over the client's topP, temperature, ...")
    connect_seconds: float = Field(5.0, gt=0.0)
    answer_seconds: float = Field(600.0, gt=0.0, description="longest wait for one answer (the client waits forever)")


class _Down(Exception):
    """The service did not take the connection."""


class HeygemTtsEngine:
    name: ClassVar[str] = "heygem-tts"
    Settings = HeygemTtsSettings

    def __init__(self, settings: HeygemTtsSettings) -> None:
        self.settings = settings
        self.session = requests.Session()

    def voice(self) -> dict[str, Any]:
        s = self.settings
        return {"reference_audio": s.reference_audio, "reference_text": s.reference_text,
                "params": {**CLIENT_PARAMS, **s.params}}

    def synthesise(self, text: str, out: Path, progress: Reporter) -> None:
        urls = [u.rstrip("/") for u in self.settings.services]
        pool = ServicePool([Endpoint(u, out.parent) for u in urls])
        down: dict[str, str] = {}
        while True:
            lease = pool.try_acquire(os.getpid() % len(urls), skip=down)
            if lease is None:
                if len(down) == len(urls):
                    raise OutageError("no TTS service answers: " + "; ".join(f"{u}: {why}" for u, why in down.items()),
                                      "start the duix-avatar-tts container(s); the task waits and runs by itself",
                                      dependency=f"heygem-tts {' '.join(urls)}")
                progress.heartbeat()  # every service is speaking for another task
                time.sleep(_WAIT_POLL)
                continue
            with lease:
                try:
                    body = self._invoke(lease.url, text, progress)
                except _Down as exc:
                    down[lease.url] = str(exc)
                    continue
            out.write_bytes(body)
            check_speech(out, f"the TTS service {lease.url}")
            return

    def _invoke(self, url: str, text: str, progress: Reporter) -> bytes:
        s = self.settings
        payload = {**CLIENT_PARAMS, **s.params, "speaker": str(uuid.uuid4()), "text": text,
                   "reference_audio": s.reference_audio, "reference_text": s.reference_text}
        with ThreadPoolExecutor(1) as pool:  # the request blocks; the worker must keep beating meanwhile
            fut = pool.submit(self.session.post, f"{url}/v1/invoke", json=payload,
                              timeout=(s.connect_seconds, s.answer_seconds))
            while not wait([fut], timeout=_BEAT_SECONDS).done:
                progress.heartbeat()
        try:
            answer = fut.result()
        except requests.ConnectionError as exc:
            if isinstance(exc, requests.ReadTimeout) or "Read timed out" in str(exc):
                raise EngineError(f"{url} gave no answer within {s.answer_seconds:g} s",
                                  "the service may be stuck; the task is tried again") from None
            raise _Down(type(exc).__name__) from None
        except requests.Timeout:
            raise EngineError(f"{url} gave no answer within {s.answer_seconds:g} s",
                              "the service may be stuck; the task is tried again") from None
        return _audio_of(url, answer)

    @classmethod
    def doctor(cls, settings: HeygemTtsSettings) -> list[Any]:
        from heygem_daemon.ops.checks import Check

        checks = []
        for url in settings.services:
            try:
                requests.get(url, timeout=settings.connect_seconds)
                checks.append(Check(f"speech heygem-tts {url}", True, "answers"))
            except requests.RequestException as exc:
                checks.append(Check(f"speech heygem-tts {url}", False, f"does not answer ({type(exc).__name__})",
                                    "start the duix-avatar-tts container or fix speech.engines.heygem-tts.services"))
        if not settings.reference_audio:
            checks.append(Check("speech heygem-tts voice", False, "no reference_audio set",
                                "train a voice (/v1/preprocess_and_tran) and set reference_audio and reference_text"))
        return checks


def _audio_of(url: str, answer: requests.Response) -> bytes:
    said = answer.content[:200].decode("utf-8", "replace").strip()
    if 400 <= answer.status_code < 500:
        raise BadInputError(f"the TTS service {url} refused the script (HTTP {answer.status_code}: {said})",
                            "check the script's text (and speech.engines.heygem-tts settings)")
    if not answer.ok:
        raise EngineError(f"the TTS service {url} failed (HTTP {answer.status_code}: {said})",
                          "the task is tried again")
    if "json" in answer.headers.get("Content-Type", "") or answer.content.lstrip()[:1] in (b"{", b"["):
        raise EngineError(f"the TTS service {url} answered JSON instead of audio: {said}", "the task is tried again")
    return answer.content
