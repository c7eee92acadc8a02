"""ASGI middlewares: security headers on every answer, the door (a body larger than a form needs is refused
before anything reads it; only tus PATCH streams large bodies, to disk), the session cookie (Secure over
HTTPS), and the gate every request passes: a known user (else the login page, or 401 for scripts), and a
CSRF token on every state-changing request. Which proxies' forwarded headers uvicorn believes.

The HTTP API (API_PREFIX) has its own bearer-token check (web/api.py): no cookie reaches it and the gate
lets it through; its multipart job requests may be as large as web.api_multipart_mb."""

from __future__ import annotations

from typing import Any, Literal
from urllib.parse import parse_qs

from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.middleware.sessions import SessionMiddleware
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from heygem_daemon.config import Web
from heygem_daemon.web.auth import csrf_ok, current_user
from heygem_daemon.web.sessions import SID, Sessions
from heygem_daemon.web.tokens import Refused, Tokens

SAFE_METHODS = ("GET", "HEAD", "OPTIONS")
PUBLIC = ("/login", "/favicon.ico")
PUBLIC_PREFIX = "/static/"
MAX_FORM_BYTES = 64 * 1024
"""The largest body of any request but a tus PATCH: a login, a form, the upload's submit (ids of up to
web.max_files uploads)."""
FORM = "application/x-www-form-urlencoded"
TUS_PREFIX = "/tus/"
STREAMED = ("PATCH", TUS_PREFIX)
API_PREFIX = "/api/"
MULTIPART = "multipart/form-data"


def is_api(scope: Scope) -> bool:
    return str(scope["path"]).startswith(API_PREFIX)


def proxy_options(web: Web) -> dict[str, Any]:
    """uvicorn's settings for X-Forwarded-For/-Proto: believed only from web.trusted_proxies (none by default);
    uvicorn's own default would believe any client of a proxy on the loopback that passes the header on."""
    return {"proxy_headers": bool(web.trusted_proxies), "forwarded_allow_ips": list(web.trusted_proxies)}


def content_security_policy(media_origin: str | None) -> str:
    media = "'self'" + (f" {media_origin}" if media_origin else "")
    return ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
            f"media-src {media}; connect-src 'self'; object-src 'none'; base-uri 'none'; "
            "form-action 'self'; frame-ancestors 'none'")


class SecurityHeaders:
    def __init__(self, app: ASGIApp, csp: str) -> None:
        self.app = app
        self.headers = [(b"content-security-policy", csp.encode()), (b"x-content-type-options", b"nosniff"),
                        (b"x-frame-options", b"DENY"), (b"referrer-policy", b"no-referrer"),
                        (b"cross-origin-opener-policy", b"same-origin")]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *self.headers]
            await send(message)

        await self.app(scope, receive, with_headers if scope["type"] == "http" else send)


class SessionCookies:
    """Starlette's signed session cookie, with the Secure flag per request: `secure` True or False, or "auto":
    when the request came over HTTPS. The scheme is uvicorn's: https under TLS, or what X-Forwarded-Proto
    says when the proxy sending it is one of web.trusted_proxies (proxy_options)."""

    def __init__(self, app: ASGIApp, secure: bool | Literal["auto"], **session: Any) -> None:
        self.secure = secure
        self.plain_cookie = SessionMiddleware(app, https_only=False, **session)
        self.secure_cookie = SessionMiddleware(app, https_only=True, **session)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and is_api(scope):  # bearer tokens only: a cookie never counts there
            scope = {**scope, "headers": [(k, v) for k, v in scope["headers"] if k != b"cookie"]}
        secure = scope.get("scheme") in ("https", "wss") if self.secure == "auto" else self.secure
        await (self.secure_cookie if secure else self.plain_cookie)(scope, receive, send)


async def _read_body(receive: Receive, limit: int) -> bytes | None:
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if len(body) > limit:
            return None
        if not message.get("more_body"):
            return body


def _too_large(limit: int = MAX_FORM_BYTES, hint: str = "send the form as the page does; files go through the "
               "upload") -> Response:
    return JSONResponse({"reason": f"the request body is larger than {limit // 1024} KiB", "hint": hint}, 413)


class Door:
    """Reads the body of every state-changing request but a tus PATCH, at most MAX_FORM_BYTES, before any
    other part sees it: memory per request stays small, whoever sends it. An API multipart request declares
    its length (at most `multipart_bytes`; uvicorn holds the body to it) and streams on: its files spool to disk."""

    def __init__(self, app: ASGIApp, multipart_bytes: int = 0) -> None:
        self.app = app
        self.multipart_bytes = multipart_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in SAFE_METHODS or (
                scope["method"] == STREAMED[0] and scope["path"].startswith(STREAMED[1])):
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        declared = headers.get("content-length", "")
        if is_api(scope) and headers.get("content-type", "").startswith(MULTIPART):
            await self._multipart(declared, scope, receive, send)
            return
        body = None if declared.isascii() and declared.isdigit() and int(declared) > MAX_FORM_BYTES else (
            await _read_body(receive, MAX_FORM_BYTES))
        if body is None:
            await _too_large()(scope, receive, send)
            return
        await self.app(scope, _replay(body), send)

    async def _multipart(self, declared: str, scope: Scope, receive: Receive, send: Send) -> None:
        if not (declared.isascii() and declared.isdigit()):
            await JSONResponse({"reason": "a multipart request needs a Content-Length",
                                "hint": "send the files in one request of known length, or upload them with "
                                "tus first"}, 411)(scope, receive, send)
        elif int(declared) > self.multipart_bytes:
            await _too_large(self.multipart_bytes, "upload large files with tus (/tus/) and create the job from "
                             "their ids (POST /api/v1/jobs)")(scope, receive, send)
        else:
            await self.app(scope, receive, send)


class Gate:
    """Runs inside the session middleware: sets scope["state"]["user"] or turns the request away."""

    def __init__(self, app: ASGIApp, web: Web, sessions: Sessions, tokens: Tokens) -> None:
        self.app = app
        self.web = web
        self.sessions = sessions
        self.tokens = tokens

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or is_api(scope):
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        if scope["path"].startswith(TUS_PREFIX) and headers.get("authorization", "").lower().startswith("bearer "):
            await self._bearer(headers["authorization"][7:].strip(), scope, receive, send)
            return
        session = scope["session"]
        user = current_user(self.web, self.sessions, headers, session)
        if user is None and SID in session:
            session.clear()  # ended (logout, revoked, expired): its CSRF token goes with it
        scope.setdefault("state", {})["user"] = user
        path = scope["path"]
        public = path in PUBLIC or path.startswith(PUBLIC_PREFIX)
        if user is None and not public:
            wants_page = scope["method"] == "GET" and "text/html" in headers.get("accept", "")
            answer: Response = (RedirectResponse("/login", 303) if wants_page else
                                JSONResponse({"reason": "not logged in", "hint": "log in first"}, 401))
            await answer(scope, receive, send)
            return
        if scope["method"] not in SAFE_METHODS:
            token = headers.get("x-csrf-token")
            if token is None and headers.get("content-type", "").startswith(FORM):
                body = await _read_body(receive, MAX_FORM_BYTES)
                token = next(iter(parse_qs((body or b"").decode("latin-1")).get("csrf", [])), None)
                receive = _replay(body or b"")
            if not csrf_ok(session, token):
                await JSONResponse({"reason": "missing or wrong CSRF token",
                                    "hint": "reload the page and try again"}, 403)(scope, receive, send)
                return
        await self.app(scope, receive, send)

    async def _bearer(self, token: str, scope: Scope, receive: Receive, send: Send) -> None:
        """tus uploads for the API: an API token (jobs:write) in place of a session, so no cookie and no CSRF
        token (a bearer token is never sent by a browser on its own)."""
        try:
            found = await run_in_threadpool(self.tokens.check, token, "jobs:write")
        except Refused as exc:
            await JSONResponse({"reason": exc.reason, "hint": exc.hint}, exc.status, exc.headers)(scope, receive, send)
            return
        scope.setdefault("state", {})["user"] = found.user
        await self.app(scope, receive, send)


def _replay(body: bytes) -> Receive:
    sent = False

    async def receive() -> Message:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return receive
