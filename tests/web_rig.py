"""The web console for tests: the real app under uvicorn on 127.0.0.1 in a thread, and a client that
logs in and speaks tus the way tus-js-client does."""

from __future__ import annotations

import base64
import re
import threading
import time
from pathlib import Path
from typing import Any

import requests
import uvicorn

from heygem_daemon.config import Config, load_config
from heygem_daemon.web.app import create_app
from heygem_daemon.web.auth import hash_password
from s3_server import free_port

PASSWORDS = {"alice": "alice-pass-1", "bob": "bob-pass-2", "carol": "carol-pass-3"}
USERS = {name: hash_password(pw) for name, pw in PASSWORDS.items()}
TUS = {"Tus-Resumable": "1.0.0"}


def web_settings(**extra: Any) -> dict[str, Any]:
    return {"web": {"enabled": True, "users": USERS, **extra}}


class WebServer:
    def __init__(self, config_path: Path) -> None:
        self.config_path = config_path
        self.cfg: Config = load_config(config_path)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        app = create_app(self.cfg, config_path, "test-session-key")
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    timeout_graceful_shutdown=1))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def start(self) -> "WebServer":
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline, "web console did not start"
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)

    def client(self, user: str | None = "alice") -> "Client":
        client = Client(self.url)
        if user:
            assert client.login(user, PASSWORDS[user]).status_code == 200
        return client


class Client:
    def __init__(self, url: str) -> None:
        self.url = url
        self.http = requests.Session()
        self.csrf = ""

    def _token(self, answer: requests.Response) -> requests.Response:
        found = re.search(r'name="csrf-token" content="([^"]+)"', answer.text)
        if found:
            self.csrf = found.group(1)
        return answer

    def get(self, path: str, **kw: Any) -> requests.Response:
        return self._token(self.http.get(self.url + path, timeout=30, **kw))

    def login(self, user: str, password: str) -> requests.Response:
        self.get("/login")
        return self._token(self.http.post(self.url + "/login", timeout=30,
                                          data={"user": user, "password": password, "csrf": self.csrf}))

    def headers(self, **extra: str) -> dict[str, str]:
        return {**TUS, "X-CSRF-Token": self.csrf, **extra}

    def create(self, name: str, length: int) -> requests.Response:
        meta = "filename " + base64.b64encode(name.encode()).decode()
        if not self.csrf:
            self.get("/upload")
        return self.http.post(self.url + "/tus/", timeout=30,
                              headers=self.headers(**{"Upload-Length": str(length), "Upload-Metadata": meta}))

    def head(self, location: str) -> requests.Response:
        return self.http.head(self.url + location, headers=self.headers(), timeout=30)

    def patch(self, location: str, offset: int, data: bytes) -> requests.Response:
        return self.http.patch(self.url + location, data=data, timeout=60, headers=self.headers(**{
            "Upload-Offset": str(offset), "Content-Type": "application/offset+octet-stream"}))

    def upload(self, path: Path, name: str | None = None) -> str:
        """A whole file through tus; returns the upload id."""
        data = path.read_bytes()
        created = self.create(name or path.name, len(data))
        assert created.status_code == 201, created.text
        done = self.patch(created.headers["Location"], 0, data)
        assert done.status_code == 204, done.text
        return created.headers["Location"].rsplit("/", 1)[1]

    def submit(self, ids: list[str], **form: Any) -> requests.Response:
        return self.http.post(self.url + "/upload/submit", json={"ids": ids, **form}, timeout=120,
                              headers={"X-CSRF-Token": self.csrf})
