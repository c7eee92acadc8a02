"""The HTTP API's rows: its bearer tokens (by the sha256 of the token) and the Idempotency-Keys they used."""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass, field

from heygem_daemon.state.db import Repository

IDEMPOTENCY_SECONDS = 24 * 3600
PENDING_SECONDS = 600.0
"""A key claimed this long ago that made no job yet was cut off (a crash mid-hand-over): free again."""


@dataclass(frozen=True)
class ApiToken:
    name: str
    user: str
    scopes: tuple[str, ...]
    created_at: float
    last_used_at: float | None
    revoked_at: float | None
    callback_url: str | None = None


@dataclass(frozen=True)
class Webhook:
    """Where a token's events go and the secrets that sign them: the current one, and the previous one until
    `previous_until` (a rotation's overlap). Kept apart from ApiToken so the secrets are read only to sign."""

    token: str
    url: str
    secrets: tuple[str, ...] = field(repr=False)


@dataclass(frozen=True)
class KeyUse:
    """An Idempotency-Key a token used: the digest of the body it came with and the job it made (None while
    the first request with it is still being answered)."""

    body_sha256: str
    job_name: str | None


def _token(row: sqlite3.Row) -> ApiToken:
    return ApiToken(row["name"], row["user"], tuple(row["scopes"].split(",")), row["created_at"],
                    row["last_used_at"], row["revoked_at"], row["callback_url"])


class ApiRepository(Repository):
    def add_token(self, name: str, user: str, scopes: tuple[str, ...], token_sha256: str,
                  callback_url: str | None = None, webhook_secret: str | None = None) -> bool:
        """False when a token of that name exists (revoked ones too: names stay unique in the audit log)."""
        with self.tx() as db:
            added = db.execute("INSERT OR IGNORE INTO api_tokens (name, user, scopes, token_sha256, created_at,"
                               " callback_url, webhook_secret) VALUES (?, ?, ?, ?, ?, ?, ?)",
                               (name, user, ",".join(scopes), token_sha256, time.time(), callback_url, webhook_secret))
            return added.rowcount == 1

    def webhook(self, name: str, now: float) -> Webhook | None:
        """The live token's callback and the secrets valid at `now`; None without a callback or once revoked."""
        row = self._conn().execute("SELECT callback_url, webhook_secret, previous_secret, previous_until FROM"
                                   " api_tokens WHERE name = ? AND revoked_at IS NULL", (name,)).fetchone()
        if row is None or not row["callback_url"] or not row["webhook_secret"]:
            return None
        previous = (row["previous_secret"],) if row["previous_secret"] and (row["previous_until"] or 0) > now else ()
        return Webhook(name, row["callback_url"], (row["webhook_secret"], *previous))

    def rotate_secret(self, name: str, secret: str, previous_until: float) -> bool:
        """`secret` signs from now on; the one it replaces signs too until `previous_until`."""
        with self.tx() as db:
            return db.execute("UPDATE api_tokens SET previous_secret = webhook_secret, previous_until = ?,"
                              " webhook_secret = ? WHERE name = ? AND revoked_at IS NULL AND callback_url IS NOT NULL",
                              (previous_until, secret, name)).rowcount == 1

    def token(self, token_sha256: str) -> ApiToken | None:
        row = self._conn().execute("SELECT * FROM api_tokens WHERE token_sha256 = ?", (token_sha256,)).fetchone()
        return _token(row) if row else None

    def tokens(self) -> list[ApiToken]:
        return [_token(r) for r in self._conn().execute("SELECT * FROM api_tokens ORDER BY name")]

    def revoke(self, name: str) -> bool:
        with self.tx() as db:
            return db.execute("UPDATE api_tokens SET revoked_at = ? WHERE name = ? AND revoked_at IS NULL",
                              (time.time(), name)).rowcount == 1

    def used(self, name: str, when: float) -> None:
        with self.tx() as db:
            db.execute("UPDATE api_tokens SET last_used_at = ? WHERE name = ?", (when, name))

    def claim_key(self, token_name: str, key: str, body_sha256: str) -> KeyUse | None:
        """Take the key for this body, or the earlier use of it within 24 h (the caller answers from that).
        One transaction: of two requests racing with one key, one claims it and the other sees the claim."""
        now = time.time()
        with self.tx() as db:
            db.execute("DELETE FROM api_idempotency WHERE created_at < ? OR (job_name IS NULL AND created_at < ?)",
                       (now - IDEMPOTENCY_SECONDS, now - PENDING_SECONDS))
            row = db.execute("SELECT body_sha256, job_name FROM api_idempotency WHERE token_name = ? AND key = ?",
                             (token_name, key)).fetchone()
            if row is not None:
                return KeyUse(row["body_sha256"], row["job_name"])
            db.execute("INSERT INTO api_idempotency (token_name, key, body_sha256, created_at) VALUES (?, ?, ?, ?)",
                       (token_name, key, body_sha256, now))
        return None

    def settle_key(self, token_name: str, key: str, job_name: str | None) -> None:
        """The claimed key made this job; None: it made none (refused), so the key is free again."""
        with self.tx() as db:
            if job_name is None:
                db.execute("DELETE FROM api_idempotency WHERE token_name = ? AND key = ?", (token_name, key))
            else:
                db.execute("UPDATE api_idempotency SET job_name = ? WHERE token_name = ? AND key = ?",
                           (job_name, token_name, key))
