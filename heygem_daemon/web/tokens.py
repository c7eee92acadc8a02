"""Bearer tokens of the HTTP API: made by `heygem-daemon web token create`, shown once, kept as their sha256
(a copy of the database opens nothing). A token acts as its user (her role decides whose jobs she may cancel)
within its scopes. The rate limit is per token, in the web process's memory."""

from __future__ import annotations

import hashlib
import math
import re
import secrets
import threading
import time
from typing import Callable
from urllib.parse import urlsplit

from heygem_daemon.state import ApiToken, Store

SCOPES = ("jobs:read", "jobs:write")
PREFIX = "hgd_"
SECRET_PREFIX = "whsec_"
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
LAST_USED_EVERY = 60.0
"""Seconds between writes of a token's last-used time: one write a minute, not one per request."""


class TokenError(ValueError):
    pass


class Refused(Exception):
    """A request the API turns away: its HTTP status, reason and hint (and headers, e.g. Retry-After)."""

    def __init__(self, status: int, reason: str, hint: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(reason)
        self.status, self.reason, self.hint, self.headers = status, reason, hint, headers


def digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def parse_scopes(text: str) -> tuple[str, ...]:
    scopes = tuple(dict.fromkeys(s.strip() for s in text.split(",") if s.strip()))
    unknown = [s for s in scopes if s not in SCOPES]
    if unknown or not scopes:
        raise TokenError(f"unknown scope(s) {', '.join(unknown) or '(none given)'}; use {', '.join(SCOPES)}")
    return scopes


def create_token(store: Store, name: str, user: str, scopes: tuple[str, ...], callback: str | None = None) -> str:
    """A new token (256 random bits); only its digest is stored. With a callback URL, a webhook signing secret
    too (`webhook_secret` reads it, to show it once with the token)."""
    if not NAME.fullmatch(name):
        raise TokenError(f"token name {name!r}: letters, digits, '.', '_' and '-', at most 64")
    if not user:
        raise TokenError("--user names the console user the token acts as")
    if callback is not None:
        check_callback(callback)
    token = PREFIX + secrets.token_urlsafe(32)
    if not store.api.add_token(name, user, scopes, digest(token), callback, new_secret() if callback else None):
        raise TokenError(f"a token called {name!r} exists (revoked ones keep their name); pick another name")
    return token


def webhook_secret(store: Store, name: str) -> str | None:
    """The secret that signs the token's webhooks now (None without a callback)."""
    hook = store.api.webhook(name, time.time())
    return hook.secrets[0] if hook else None


def new_secret() -> str:
    return SECRET_PREFIX + secrets.token_urlsafe(32)


def check_callback(url: str) -> None:
    """Only the form is checked here; the address is checked each time a webhook is sent (notify/webhooks.py)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.username or parts.password:
        raise TokenError(f"--callback {url!r}: an http(s) URL with a host and no user:password@")


def rotate_secret(store: Store, name: str, overlap_hours: float) -> str:
    """A new signing secret for the token's webhooks; the old one signs too for `overlap_hours`."""
    secret = new_secret()
    if not store.api.rotate_secret(name, secret, time.time() + overlap_hours * 3600):
        raise TokenError(f"no live token {name!r} with a callback URL")
    return secret


class Tokens:
    """The live tokens as the API checks them: by digest, not revoked, its user still configured."""

    def __init__(self, store: Store, user_known: Callable[[str], bool], per_minute: int,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.store, self.user_known, self.per_minute, self.clock = store, user_known, per_minute, clock
        self._written: dict[str, float] = {}
        self._buckets: dict[str, tuple[float, float]] = {}  # name: (tokens left, when counted)
        self._lock = threading.Lock()

    def find(self, token: str) -> ApiToken | None:
        found = self.store.api.token(digest(token))
        if found is None or found.revoked_at is not None or not self.user_known(found.user):
            return None
        now = time.time()
        if now - self._written.get(found.name, 0.0) >= LAST_USED_EVERY:
            self._written[found.name] = now
            self.store.api.used(found.name, now)
        return found

    def check(self, credentials: str | None, scope: str) -> ApiToken:
        """The live token of an `Authorization: Bearer` value, within its rate and holding `scope`; else Refused."""
        if not credentials:
            raise Refused(401, "no bearer token", "send Authorization: Bearer <token>", {"WWW-Authenticate": "Bearer"})
        token = self.find(credentials)
        if token is None:
            raise Refused(401, "unknown or revoked token", "ask the operator for a token "
                          "(heygem-daemon web token create)", {"WWW-Authenticate": "Bearer"})
        wait = self.wait(token.name)
        if wait > 0:
            seconds = str(math.ceil(wait))
            raise Refused(429, f"more than {self.per_minute} requests a minute", f"try again in {seconds} s",
                          {"Retry-After": seconds})
        if scope not in token.scopes:
            raise Refused(403, f"the token {token.name!r} lacks the scope {scope}", "ask the operator for a token "
                          "with it")
        return token

    def wait(self, name: str) -> float:
        """0 when the token may make a request now (and counts it), else the seconds until it may: a bucket of
        per_minute requests, refilled evenly over the minute."""
        rate = self.per_minute / 60.0
        with self._lock:
            now = self.clock()
            left, then = self._buckets.get(name, (float(self.per_minute), now))
            left = min(float(self.per_minute), left + (now - then) * rate)
            if left < 1.0:
                self._buckets[name] = (left, now)
                return (1.0 - left) / rate
            self._buckets[name] = (left - 1.0, now)
            return 0.0
