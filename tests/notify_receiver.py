"""A real chat-service stand-in: an HTTP server on 127.0.0.1 that records every POST apprise's json:// makes."""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable


@dataclass(frozen=True)
class Post:
    path: str
    status: int
    """What the receiver answered: 200 delivered, 503 while it plays 'down'."""
    headers: dict[str, str]
    payload: dict[str, Any]

    @property
    def text(self) -> str:
        return f"{self.payload.get('title', '')}\n{self.payload.get('message', '')}"


class Receiver:
    def __init__(self) -> None:
        self.posts: list[Post] = []
        self.status = 200
        self.port = 0
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    def start(self) -> "Receiver":
        """Listen (again on the same port after stop(), so URLs stay valid)."""
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                status = receiver.status
                with receiver._lock:
                    receiver.posts.append(Post(self.path, status, dict(self.headers), json.loads(raw or b"{}")))
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *_: Any) -> None:
                pass

        self._server = serve(Handler, self.port)
        self.port = self._server.server_address[1]
        return self

    def stop(self) -> None:
        if self._server is not None:
            shut(self._server)
            self._server = None

    def url(self, path: str = "/hook", auth: str = "") -> str:
        return f"json://{auth}127.0.0.1:{self.port}{path}"

    def delivered(self, path: str | None = None, containing: str = "") -> list[Post]:
        with self._lock:
            return [p for p in self.posts if p.status == 200 and (path is None or p.path == path)
                    and containing in p.text]

    def wait_delivered(self, count: int = 1, path: str | None = None, containing: str = "",
                       timeout: float = 60) -> list[Post]:
        return wait_until(lambda: (got := self.delivered(path, containing)) and len(got) >= count and got,
                          timeout, lambda: f"{count} messages on {path or 'any path'} containing {containing!r}; "
                                           f"posts so far: {self.posts}")

    def refused(self) -> int:
        with self._lock:
            return sum(p.status != 200 for p in self.posts)


def serve(handler: type[BaseHTTPRequestHandler], port: int = 0) -> ThreadingHTTPServer:
    """An HTTP server on 127.0.0.1 answering from a thread of its own."""
    server = ThreadingHTTPServer(("127.0.0.1", port), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    return server


def shut(server: ThreadingHTTPServer) -> None:
    server.shutdown()
    server.server_close()


def wait_until(cond: Callable[[], Any], timeout: float, what: Callable[[], str]) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what()}")
