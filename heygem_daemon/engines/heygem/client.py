"""HeyGem's video service over HTTP: submit and query, each answer code turned into what it means."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

import requests

from heygem_daemon.engines.base import BadInputError, EngineError
from heygem_daemon.log import redact_text

OK, SYSTEM_ERROR, BUSY, BAD_PARAMETER, NOT_FOUND = 10000, 9999, 10001, 10002, 10004
RUNNING, SUCCEEDED, FAILED = 1, 2, 3
_RETRY_HINT = "the task will be retried"
CONTAINERS = "heygem-gen-video (HeyGem) or duix-avatar-gen-video (Duix-Avatar)"
LOG_HINT = "see the container's log: docker logs heygem-gen-video (HeyGem) or duix-avatar-gen-video (Duix-Avatar)"

# Status-3 messages that mean the inputs cannot work (from the service's logged answers and the official
# client): a substring of the service's message -> what it means and what the person should do.
_BAD_MEDIA: list[tuple[tuple[str, ...], str, str]] = [
    (("存在多人脸", "multiple faces", "more than one face"), "the portrait shows more than one face",
     "use a portrait with exactly one person in view"),
    (("未检测到人脸", "no face detected"), "the service found no face in the portrait",
     "use a front-facing portrait where the face is clearly visible"),
    (("获取音频时长失败", "failed to get audio duration"), "the service could not read the audio's length",
     "export the audio again as WAV or MP3 and drop it in again"),
    (("format video error",), "the service could not convert the portrait video",
     "export the portrait again as MP4 (H.264) and drop it in again"),
]


def bad_media(msg: str) -> tuple[str, str] | None:
    """(what it means, hint) when a failed job's message says the inputs are unusable; None otherwise."""
    low = msg.lower()
    for needles, meaning, hint in _BAD_MEDIA:
        if any(n in low for n in needles):
            return meaning, hint
    return None


class ServiceBusy(Exception):
    """10001: the service is running another job (one at a time); try later or another service."""


class ServiceUnreachable(EngineError):
    """No HTTP answer at all: the container is down or restarting, the URL is wrong, or the network is.
    The engine turns it into an outage once no other service can take the job."""

    def __init__(self, reason: str, hint: str, delivered: bool) -> None:
        super().__init__(reason, hint)
        self.delivered = delivered
        """The request went out and only the answer is missing (a read timeout): a submit may have
        been taken, so its code must be treated as known to the service."""


@dataclass(frozen=True)
class TaskState:
    status: int
    progress: float
    """0..100 as the service reports it."""
    result: str
    msg: str


def service_name(url: str) -> str:
    """A service as `status`, alerts and waiting tasks name it (no credentials from the URL)."""
    return f"heygem service {redact_text(url.rstrip('/'))}"


class HeygemClient:
    def __init__(self, base_url: str, timeout: float) -> None:
        self.base_url = base_url.rstrip("/")
        # Messages end up in error.json and logs: credentials in a URL must not.
        self.shown = redact_text(self.base_url)
        self.timeout = timeout
        self.session = requests.Session()

    def submit(self, code: str, audio: str, video: str, chaofen: bool, watermark: bool) -> None:
        """Start a job; ServiceBusy when the service runs another one."""
        body = {"audio_url": audio, "video_url": video, "code": code, "chaofen": int(chaofen),
                "watermark_switch": int(watermark), "pn": 1}
        self._check(self._call("POST", "/easy/submit", json=body))

    def query(self, code: str) -> TaskState | None:
        """The task's state, or None when the service does not know the code (10004)."""
        answer = self._call("GET", "/easy/query", params={"code": code})
        if answer.get("code") == NOT_FOUND:
            return None
        self._check(answer)
        data = answer.get("data") or {}
        try:
            return TaskState(int(data.get("status", RUNNING)), float(data.get("progress") or 0.0),
                             str(data.get("result") or ""), str(data.get("msg") or ""))
        except (TypeError, ValueError):
            raise EngineError(f"heygem service at {self.shown} answered a malformed task state: {data!r:.200}",
                              _RETRY_HINT) from None

    def _call(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        try:
            resp = self.session.request(method, self.base_url + path, timeout=self.timeout, **kwargs)
        except requests.RequestException as exc:
            raise ServiceUnreachable(
                f"heygem service at {self.shown} unreachable ({type(exc).__name__})",
                "check that its container runs (docker ps: heygem-gen-video or duix-avatar-gen-video) and "
                "engines.heygem.services is right; the task waits without using an attempt",
                isinstance(exc, requests.ReadTimeout),
            ) from None
        try:
            answer = resp.json()
        except ValueError:
            answer = None
        if not isinstance(answer, dict):
            raise EngineError(f"heygem service at {self.shown} answered HTTP {resp.status_code} without a JSON object",
                              "is this URL the HeyGem video service (port 8383)?")
        return answer

    def _check(self, answer: dict[str, Any]) -> None:
        code, msg = answer.get("code"), str(answer.get("msg") or "no message")
        if code == OK:
            return
        if code == BUSY:
            raise ServiceBusy(self.base_url)
        if code == BAD_PARAMETER:
            raise BadInputError(f"heygem service at {self.shown} refused the inputs: {msg}",
                                "check that the audio and the portrait play; a retry cannot help")
        what = "had a system error" if code == SYSTEM_ERROR else f"answered code {code}"
        raise EngineError(f"heygem service at {self.shown} {what}: {msg}", f"{LOG_HINT}; {_RETRY_HINT}")


def unanswered(client: HeygemClient) -> str:
    """Why the service does not answer a query, or "" when it does (an unknown code is an answer)."""
    try:
        client.query(f"heygem-daemon-probe-{uuid.uuid4()}")
    except EngineError as exc:
        return exc.reason
    return ""
