"""Stand-ins for the DingTalk, WeCom and Feishu/Lark group robots, reached as the real hosts through an HTTPS
proxy with a local CA (the clients pin oapi.dingtalk.com, qyapi.weixin.qq.com, open.feishu.cn).

Each checks what the real service documents and answers as it does — HTTP 200 with the verdict in the body:
- DingTalk (`/robot/send?access_token=&timestamp=&sign=`): unknown token 300001; with "sign" security the
  timestamp (ms) must be within an hour and `sign` — URL-decoded once — must equal
  base64(HMAC-SHA256(secret, "{timestamp}\\n{secret}")), else 310000; content over 20,000 bytes 460101;
  more than 20 messages a minute 130101; taken: errcode 0.
- WeCom (`/cgi-bin/webhook/send?key=`): unknown key 93000; text content over 2,048 UTF-8 bytes or markdown over
  4,096, 40058; more than 20 a minute 45009; taken: errcode 0.
- Feishu/Lark (`/open-apis/bot/v2/hook/{token}`): unknown token 19001; a body over 20 KB 9499; more than 5 a
  second or 100 a minute 11232; taken: code 0 (and the older StatusCode 0; `legacy` answers only StatusCode).
- Slack incoming webhooks (`/services/T/B/X`) answer in the HTTP status and a text body instead: unknown
  hook 404 `no_service`, a payload without text 400 `invalid_payload`; taken: 200 `ok`.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import hmac
import json
import socket
import ssl
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from notify_receiver import serve, shut

DINGTALK, WECOM, FEISHU, LARK = "oapi.dingtalk.com", "qyapi.weixin.qq.com", "open.feishu.cn", "open.larksuite.com"
SLACK = "hooks.slack.com"
HOSTS = (DINGTALK, WECOM, FEISHU, LARK, SLACK)


def make_tls(folder: Path) -> tuple[Path, ssl.SSLContext]:
    """A CA (its PEM for the client's REQUESTS_CA_BUNDLE) and a server context whose leaf cert it signed."""
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key, leaf_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "heygem test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(hours=1))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))
    leaf = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, DINGTALK)]))
            .issuer_name(ca_name).public_key(leaf_key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(h) for h in HOSTS]), critical=False)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    folder.mkdir(parents=True, exist_ok=True)
    ca_pem, chain = folder / "ca.pem", folder / "leaf.pem"
    ca_pem.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    chain.write_bytes(leaf.public_bytes(serialization.Encoding.PEM) + leaf_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(chain)
    return ca_pem, context


@dataclass(frozen=True)
class Received:
    service: str
    robot: str
    """The robot's token / key."""
    errcode: int
    text: str
    """The message as the chat shows it (content, or markdown text)."""
    raw_query: str
    payload: dict[str, Any]
    at: float
    """When the verdict was given (time.time()), just before the answer is written."""


@dataclass
class Robot:
    service: str
    token: str
    secret: str = ""
    sent: deque = field(default_factory=deque)
    """When it last took messages (for its rate limit)."""


class RobotServers:
    """The proxy (CONNECT only, for the robot hosts) and the robots behind it."""

    def __init__(self, folder: Path) -> None:
        self.ca, self._tls = make_tls(folder)
        self.robots: dict[tuple[str, str], Robot] = {}
        self.received: list[Received] = []
        self.legacy_feishu = False
        """Answer Feishu as its older API did: StatusCode only."""
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    # --- set-up ------------------------------------------------------------------------

    def add(self, service: str, token: str, secret: str = "") -> Robot:
        robot = self.robots[(service, token)] = Robot(service, token, secret)
        return robot

    def env(self) -> dict[str, str]:
        """What the sending process needs: the proxy, and the CA that signed the robots' certificate."""
        proxy = f"http://127.0.0.1:{self._server.server_address[1]}"
        return {"HTTPS_PROXY": proxy, "https_proxy": proxy, "REQUESTS_CA_BUNDLE": str(self.ca),
                "NO_PROXY": "", "no_proxy": ""}

    def start(self) -> "RobotServers":
        servers = self
        tls = self._tls

        class Service(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                host = self.headers.get("Host", "").split(":")[0]
                status, answer = (servers._slack(self.path, raw) if host == SLACK
                                  else (200, servers._answer(host, self.path, raw)))
                body = answer.encode() if isinstance(answer, str) else json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("Content-Type", "text/html" if isinstance(answer, str) else "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *_: Any) -> None:
                pass

        class Proxy(BaseHTTPRequestHandler):
            def do_CONNECT(self) -> None:  # noqa: N802
                host, _, port = self.path.partition(":")
                if host not in HOSTS or port != "443":
                    self.send_error(403, "only the robot hosts")
                    return
                self.send_response(200, "Connection established")
                self.end_headers()
                self.close_connection = True
                # Headers and body leave in separate writes: without this, Nagle holds the body back for the
                # client's delayed ACK (40 ms), which the real services' answers do not wait for.
                self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                try:
                    conn = tls.wrap_socket(self.connection, server_side=True)
                except (ssl.SSLError, OSError):
                    return
                try:
                    Service(conn, self.client_address, self.server)
                except (ssl.SSLError, OSError):
                    pass
                finally:
                    conn.close()

            def log_message(self, *_: Any) -> None:
                pass

        self._server = serve(Proxy)
        return self

    def stop(self) -> None:
        if self._server is not None:
            shut(self._server)

    # --- what the tests read ---------------------------------------------------------------

    def taken(self, service: str | None = None) -> list[Received]:
        with self._lock:
            return [r for r in self.received if r.errcode == 0 and service in (None, r.service)]

    def refused(self, errcode: int | None = None) -> list[Received]:
        with self._lock:
            return [r for r in self.received if r.errcode != 0 and errcode in (None, r.errcode)]

    # --- the services ----------------------------------------------------------------------

    def _answer(self, host: str, path: str, raw: bytes) -> dict[str, Any]:
        url = urlsplit(path)
        query = parse_qs(url.query)  # decodes once, as the services do
        payload = json.loads(raw or b"{}")
        if host == DINGTALK and url.path == "/robot/send":
            return self._dingtalk(query, payload, url.query)
        if host == WECOM and url.path == "/cgi-bin/webhook/send":
            return self._wecom(query, payload, url.query)
        if host in (FEISHU, LARK) and url.path.startswith("/open-apis/bot/v2/hook/"):
            return self._feishu(host, url.path.rsplit("/", 1)[-1], payload, len(raw))
        return {"errcode": 404, "errmsg": "请求的URI地址不存在"}

    def _slack(self, path: str, raw: bytes) -> tuple[int, str]:
        token = path.removeprefix("/services/")
        payload = json.loads(raw or b"{}")
        text = payload.get("text") or "\n".join(a.get("text", "") for a in payload.get("attachments", []))
        status, answer = ((404, "no_service") if ("slack", token) not in self.robots
                          else (400, "invalid_payload") if not text else (200, "ok"))
        self._record("slack", token, 0 if status == 200 else status, text, "", payload)
        return status, answer

    def _record(self, service: str, token: str, errcode: int, text: str, query: str,
                payload: dict[str, Any]) -> None:
        with self._lock:
            self.received.append(Received(service, token, errcode, text, query, payload, time.time()))

    def _too_fast(self, robot: Robot, limits: tuple[tuple[int, float], ...]) -> bool:
        now = time.monotonic()
        with self._lock:
            longest = max(s for _, s in limits)
            while robot.sent and robot.sent[0] < now - longest:
                robot.sent.popleft()
            if any(sum(t >= now - s for t in robot.sent) >= n for n, s in limits):
                return True
            robot.sent.append(now)
            return False

    def _dingtalk(self, query: dict[str, list[str]], payload: dict[str, Any], raw_query: str) -> dict[str, Any]:
        token = query.get("access_token", [""])[0]
        kind = payload.get("msgtype")
        text = payload.get(kind, {}).get("content" if kind == "text" else "text", "")
        robot = self.robots.get(("dingtalk", token))

        def verdict(code: int, msg: str) -> dict[str, Any]:
            self._record("dingtalk", token, code, text, raw_query, payload)
            return {"errcode": code, "errmsg": msg}

        if robot is None:
            return verdict(300001, "description:token is not exist")
        if robot.secret:
            ts, sign = query.get("timestamp", [""])[0], query.get("sign", [""])[0]
            expected = base64.b64encode(hmac.new(robot.secret.encode(), f"{ts}\n{robot.secret}".encode(),
                                                 hashlib.sha256).digest()).decode()
            if not ts.isdigit() or abs(time.time() * 1000 - int(ts)) > 3_600_000 or not hmac.compare_digest(
                    sign, expected):
                return verdict(310000, "description:sign not match")
        if kind not in ("text", "markdown") or not text:
            return verdict(40035, "缺少参数 json")
        if len(text.encode()) > 20_000:
            return verdict(460101, "message too long, exceed 20000 bytes")
        if self._too_fast(robot, ((20, 60.0),)):
            return verdict(130101, "send too fast, exceed 20 times per minute")
        return verdict(0, "ok")

    def _wecom(self, query: dict[str, list[str]], payload: dict[str, Any], raw_query: str) -> dict[str, Any]:
        key = query.get("key", [""])[0]
        kind = payload.get("msgtype")
        text = payload.get(kind, {}).get("content", "")
        robot = self.robots.get(("wecom", key))

        def verdict(code: int, msg: str) -> dict[str, Any]:
            self._record("wecom", key, code, text, raw_query, payload)
            return {"errcode": code, "errmsg": msg}

        if robot is None:
            return verdict(93000, "invalid webhook url")
        if kind not in ("text", "markdown") or not text:
            return verdict(40008, "invalid message type")
        if len(text.encode()) > (2048 if kind == "text" else 4096):
            return verdict(40058, f"{kind}.content exceed max length")
        if self._too_fast(robot, ((20, 60.0),)):
            return verdict(45009, "api freq out of limit")
        return verdict(0, "ok")

    def _feishu(self, host: str, token: str, payload: dict[str, Any], size: int) -> dict[str, Any]:
        service = "feishu" if host == FEISHU else "lark"
        card = payload.get("card", {}).get("elements", [{}])[0].get("text", {}).get("content", "")
        text = payload.get("content", {}).get("text", "") or card
        robot = self.robots.get((service, token))

        def verdict(code: int, msg: str) -> dict[str, Any]:
            self._record(service, token, code, text, "", payload)
            if code == 0:
                ok = {"StatusCode": 0, "StatusMessage": "success"}
                return ok if self.legacy_feishu else {**ok, "code": 0, "data": {}, "msg": "success"}
            return {"code": code, "data": {}, "msg": msg}

        if robot is None:
            return verdict(19001, "param invalid: incoming webhook access token invalid")
        if size > 20_000:
            return verdict(9499, "request body too large, exceed 20KB")
        if not text:
            return verdict(9499, "Bad Request")
        if self._too_fast(robot, ((5, 1.0), (100, 60.0))):
            return verdict(11232, "frequency limited")
        return verdict(0, "success")
