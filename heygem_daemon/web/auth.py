"""Who is asking: password logins (argon2 hashes from the config, sessions held in the store) or a trusted
reverse proxy's header; the session key, CSRF tokens and the size of what a login may send."""

from __future__ import annotations

import hmac
import secrets
from typing import Any, Mapping, MutableMapping

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from heygem_daemon.config import Web
from heygem_daemon.log import get_logger
from heygem_daemon.secrets import get_secret
from heygem_daemon.web.sessions import Sessions

log = get_logger("heygem.web")
_HASHER = PasswordHasher()
# Verified when the user is unknown, so a wrong name costs as long as a wrong password.
_DUMMY = _HASHER.hash(secrets.token_hex(16))
SESSION_KEY_CREDENTIAL = "web-session-key"
SESSION_KEY_ENV = "HEYGEM_WEB_SESSION_KEY"
MAX_USER_CHARS = 128
MAX_PASSWORD_CHARS = 1024


def hash_password(password: str) -> str:
    return _HASHER.hash(password)


def check_password(hashes: Mapping[str, str], user: str, password: str) -> bool:
    try:
        return _HASHER.verify(hashes.get(user, _DUMMY), password) and user in hashes
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


def current_user(web: Web, sessions: Sessions, headers: Mapping[str, str],
                 cookie: MutableMapping[str, Any]) -> str | None:
    if web.auth == "proxy":
        return headers.get(web.proxy_header) or None
    return sessions.user(cookie)


def csrf_token(session: dict[str, Any]) -> str:
    if "csrf" not in session:
        session["csrf"] = secrets.token_urlsafe(32)
    return str(session["csrf"])


def csrf_ok(session: dict[str, Any], given: str | None) -> bool:
    expected = session.get("csrf")
    return bool(expected and given and hmac.compare_digest(str(expected), given))
