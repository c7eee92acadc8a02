"""Who is asking: password logins (argon2 hashes from the config) or a trusted reverse proxy's header;
the session key, CSRF tokens and the login rate limit."""

from __future__ import annotations

import hmac
import secrets
import time
from collections import defaultdict, deque
from typing import Any, Callable, MutableMapping

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from heygem_daemon.config import Web
from heygem_daemon.log import get_logger
from heygem_daemon.secrets import get_secret

log = get_logger("heygem.web")
_HASHER = PasswordHasher()
# Verified when the user is unknown, so a wrong name costs as long as a wrong password.
_DUMMY = _HASHER.hash(secrets.token_hex(16))
SESSION_KEY_CREDENTIAL = "web-session-key"
SESSION_KEY_ENV = "HEYGEM_WEB_SESSION_KEY"


def hash_password(password: str) -> str:
    return _HASHER.hash(password)


def check_password(users: dict[str, str], user: str, password: str) -> bool:
    try:
        return _HASHER.verify(users.get(user, _DUMMY), password) and user in users
    except (VerificationError, InvalidHashError):
        return False


def session_key(environ: dict[str, str] | None = None) -> str:
    """The key signing session cookies. Without one configured, a random key: sessions end on restart."""
    key = get_secret(SESSION_KEY_CREDENTIAL, SESSION_KEY_ENV, environ)
    if key:
        return key
    log.warning("no web session key (credential web-session-key or $HEYGEM_WEB_SESSION_KEY); using a random "
                "one, so everyone logs in again after a restart")
    return secrets.token_urlsafe(32)


def current_user(web: Web, headers: MutableMapping[str, str] | Any, session: dict[str, Any]) -> str | None:
    if web.auth == "proxy":
        return headers.get(web.proxy_header) or None
    user = session.get("user")
    return user if user in web.users else None  # a user removed from the config is logged out


def csrf_token(session: dict[str, Any]) -> str:
    if "csrf" not in session:
        session["csrf"] = secrets.token_urlsafe(32)
    return str(session["csrf"])


def csrf_ok(session: dict[str, Any], given: str | None) -> bool:
    expected = session.get("csrf")
    return bool(expected and given and hmac.compare_digest(str(expected), given))


class LoginLimit:
    """At most `attempts` failed logins per (address, user) within `window` seconds."""

    def __init__(self, attempts: int, window: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.attempts = attempts
        self.window = window
        self.clock = clock
        self._failures: dict[str, deque[float]] = defaultdict(deque)

    def _recent(self, key: str) -> deque[float]:
        failures = self._failures[key]
        while failures and failures[0] < self.clock() - self.window:
            failures.popleft()
        return failures

    def blocked(self, key: str) -> bool:
        return len(self._recent(key)) >= self.attempts

    def failed(self, key: str) -> None:
        self._recent(key).append(self.clock())

    def succeeded(self, key: str) -> None:
        self._failures.pop(key, None)
