"""Logged-in sessions kept in the store, so they end on the server: at logout, when the user's password
changes or she leaves web.users, and on `heygem-daemon web sessions revoke USER`. The signed cookie holds a
random session id; the store keeps only its sha256 (a copy of the database opens no session), the user,
which password she logged in with (a digest of its hash), the address and the expiry."""

from __future__ import annotations

import hashlib
import secrets
import time
from typing import Any, Callable, MutableMapping

from heygem_daemon.config import Web
from heygem_daemon.state import Store, WebSession

SESSION_SECONDS = 12 * 3600
"""A session's life, in the store and as the cookie's max age."""
SID = "sid"


def password_tag(hashed: str) -> str:
    return hashlib.sha256(hashed.encode()).hexdigest()[:16]


def _digest(sid: str) -> str:
    return hashlib.sha256(sid.encode()).hexdigest()


class Sessions:
    def __init__(self, web: Web, store: Store, clock: Callable[[], float] = time.time) -> None:
        self.web, self.store, self.clock = web, store, clock
        self.tags = {user: password_tag(hashed) for user, hashed in web.password_hashes().items()}

    def tidy(self) -> int:
        """At start: end the sessions of users no longer configured, or whose password changed, and expired ones."""
        return self.store.web.end_sessions_except(self.tags if self.web.auth == "password" else {})

    def open(self, cookie: MutableMapping[str, Any], user: str, address: str | None) -> None:
        """A fresh session (and so a fresh CSRF token) in place of whatever the cookie held."""
        sid, now = secrets.token_urlsafe(32), self.clock()
        self.store.web.open_session(_digest(sid), WebSession(user, self.tags[user], address, now,
                                                             now + SESSION_SECONDS))
        cookie.clear()
        cookie[SID] = sid

    def user(self, cookie: MutableMapping[str, Any]) -> str | None:
        """The user of the cookie's session while the store still holds it, else None."""
        sid = cookie.get(SID)
        if not isinstance(sid, str):
            return None
        held = self.store.web.session(_digest(sid))
        if held is None or held.expires_at <= self.clock() or self.tags.get(held.user) != held.password_tag:
            return None
        return held.user

    def end(self, cookie: MutableMapping[str, Any]) -> None:
        sid = cookie.get(SID)
        if isinstance(sid, str):
            self.store.web.end_session(_digest(sid))
        cookie.clear()
