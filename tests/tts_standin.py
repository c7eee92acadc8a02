"""A stand-in for the HeyGem / Duix-Avatar voice service (fish-speech `tools/api_server.py`, port 18180),
built from what the official client is known to do with it (shared/reference/HEYGEM_TTS.md):

- `POST /v1/preprocess_and_tran` {format, reference_audio, lang} -> JSON {code: 0, asr_format_audio_url,
  reference_audio_text}; any other code is a failure.
- `POST /v1/invoke` {speaker, text, format: wav, reference_audio, reference_text, ...} -> the body IS the
  audio (WAV). Failure answers are not documented: the modes below are the ones the reference says to treat
  as failures (non-2xx, JSON where audio is expected, audio that does not decode) plus a hang.
- One GPU: one request at a time. Requests are served one after another; `overlaps` counts requests that
  arrived while another was being served (a client that keeps to one at a time leaves it 0).

The speech is a tone `SECONDS_PER_CHAR` long per character of text, so a test knows how long it must be.
"""

from __future__ import annotations

import io
import json
import threading
import time
import wave
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np

SECONDS_PER_CHAR = 0.05
RATE = 44100  # fish-speech's output rate


def tone_wav(seconds: float) -> bytes:
    t = np.arange(int(seconds * RATE)) / RATE
    samples = (0.3 * np.sin(2 * np.pi * 220 * t) * 32767).astype("<i2")
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(RATE)
        w.writeframes(samples.tobytes())
    return buf.getvalue()


def speech_seconds(text: str) -> float:
    return len(text) * SECONDS_PER_CHAR


class TtsStandin:
    """mode: ok | http500 | http422 | json | garbage | hang (until `release` is set or the server stops)."""

    def __init__(self) -> None:
        self.mode = "ok"
        self.invokes: list[dict[str, Any]] = []
        self.seconds_per_request = 0.0
        """How long each answer takes (a GPU speaking), one request after another."""
        self.fail_once: set[str] = set()
        """Texts answered HTTP 500 the first time they are asked for."""
        self.overlaps = 0
        self.release = threading.Event()
        self._serving = threading.Lock()
        self._busy = 0
        self._count = threading.Lock()
        standin = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                self._send(404, b'{"detail": "Not Found"}', "application/json")

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                with standin._count:
                    standin._busy += 1
                    standin.overlaps += standin._busy > 1
                try:
                    with standin._serving:
                        self._answer(body)
                finally:
                    with standin._count:
                        standin._busy -= 1

            def _answer(self, body: dict[str, Any]) -> None:
                if self.path == "/v1/preprocess_and_tran":
                    ref = body.get("reference_audio", "")
                    self._json(200, {"code": 0, "asr_format_audio_url": f"/code/data/asr/{ref}",
                                     "reference_audio_text": "hello this is my voice"})
                    return
                if self.path != "/v1/invoke":
                    self._send(404, b'{"detail": "Not Found"}', "application/json")
                    return
                standin.invokes.append(body)
                time.sleep(standin.seconds_per_request)
                mode = standin.mode
                if body.get("text") in standin.fail_once:
                    standin.fail_once.discard(body["text"])
                    mode = "http500"
                if mode == "hang":  # until released: then it answers as the mode says by then
                    standin.release.wait(30)
                    mode = standin.mode
                    if mode == "hang":
                        return
                if mode == "http500":
                    self._send(500, b"Internal Server Error", "text/plain")
                elif mode == "http422":
                    self._json(422, {"detail": [{"loc": ["body", "text"], "msg": "field required"}]})
                elif mode == "json":
                    self._json(200, {"code": 1, "msg": "synthesis failed"})
                elif mode == "garbage":
                    self._send(200, b"RIFF\x00\x00\x00\x00WAVEnot really audio", "audio/wav")
                else:
                    self._send(200, tone_wav(speech_seconds(body.get("text", ""))), "audio/wav")

            def _json(self, code: int, data: Any) -> None:
                self._send(code, json.dumps(data).encode(), "application/json")

            def _send(self, code: int, data: bytes, ctype: str) -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)

    def start(self) -> TtsStandin:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()
