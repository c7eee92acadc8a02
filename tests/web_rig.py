"""The web console for tests: the real app under uvicorn on 127.0.0.1 in a thread, and a client that
logs in and speaks tus the way tus-js-client does."""

from __future__ import annotations

import base64
import re
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import requests
import uvicorn
import yaml

from heygem_daemon.config import Config, load_config
from heygem_daemon.web.app import create_app
from heygem_daemon.web.auth import hash_password
from heygem_daemon.web.guard import proxy_options
from s3_server import free_port

PASSWORDS = {"alice": "alice-pass-1", "bob": "bob-pass-2", "carol": "carol-pass-3"}
HASHES = {name: hash_password(pw) for name, pw in PASSWORDS.items()}
USERS = {**HASHES, "carol": {"hash": HASHES["carol"], "role": "admin"}}
TUS = {"Tus-Resumable": "1.0.0"}


def web_settings(**extra: Any) -> dict[str, Any]:
    return {"web": {"enabled": True, "users": USERS, **extra}}


def console_config(base: Path, **web: Any) -> Path:
    """config.yaml for a console under `base`: these web settings, quiet logs, audio up to 30 s."""
    settings = {"base_dir": str(base), "logging": {"console": False}, "limits": {"max_audio_seconds": 30},
                **web_settings(**web)}
    (base / "config.yaml").write_text(yaml.safe_dump(settings))
    return base / "config.yaml"


class WebServer:
    def __init__(self, config_path: Path) -> None:
        self.config_path = config_path
        self.cfg: Config = load_config(config_path)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.app = create_app(self.cfg, config_path, "test-session-key")
        # The forwarded headers as `heygem-daemon web` believes them (web.trusted_proxies).
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    timeout_graceful_shutdown=1, **proxy_options(self.cfg.web)))
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

    def client(self, user: str | None = "alice", source: str | None = None) -> "Client":
        client = Client(self.url, source)
        if user:
            assert client.login(user, PASSWORDS[user]).status_code == 200
        return client


class FromAddress(requests.adapters.HTTPAdapter):
    """Connections from another loopback address (Linux routes all of 127.0.0.0/8 to lo): clients the
    console tells apart by their real address, no forwarded header needed."""

    def __init__(self, address: str) -> None:
        self.address = address
        super().__init__()

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, source_address=(self.address, 0), **kwargs)


class Client:
    def __init__(self, url: str, source: str | None = None) -> None:
        self.url = url
        self.http = requests.Session()
        if source:
            self.http.mount("http://", FromAddress(source))
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


class ApiClient(Client):
    """A program using the HTTP API: its bearer token on every request, tus included; no cookie, no CSRF."""

    def __init__(self, url: str, token: str) -> None:
        super().__init__(url)
        self.http.headers["Authorization"] = f"Bearer {token}"
        self.csrf = "unused"  # Client.create fetches a page for the token otherwise

    def headers(self, **extra: str) -> dict[str, str]:
        return {**TUS, **extra}

    def api(self, method: str, path: str, **kw: Any) -> requests.Response:
        return self.http.request(method, f"{self.url}/api/v1{path}", timeout=60, **kw)


def serving(config: Path) -> Iterator[WebServer]:
    """A console on `config` for a fixture's lifetime (`yield from serving(...)`)."""
    server = WebServer(config).start()
    yield server
    server.stop()
