"""The web console's rows: its logged-in sessions and who handed each job over from the web."""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass

from heygem_daemon.state.db import Repository


@dataclass(frozen=True)
class WebSession:
    user: str
    password_tag: str
    """Which password the session was opened with (a digest of its hash): a changed password ends it."""
    address: str | None
    created_at: float
    expires_at: float


class WebRepository(Repository):
    def open_session(self, id_sha256: str, session: WebSession) -> None:
        with self.tx() as db:
            db.execute("DELETE FROM web_sessions WHERE expires_at <= ?", (time.time(),))  # keeps the table small
            db.execute("INSERT INTO web_sessions (id_sha256, user, password_tag, address, created_at, expires_at)"
                       " VALUES (?, ?, ?, ?, ?, ?)", (id_sha256, session.user, session.password_tag,
                                                      session.address, session.created_at, session.expires_at))

    def session(self, id_sha256: str) -> WebSession | None:
        row = self._conn().execute("SELECT user, password_tag, address, created_at, expires_at FROM web_sessions"
                                   " WHERE id_sha256 = ?", (id_sha256,)).fetchone()
        return WebSession(**dict(row)) if row else None

    def sessions(self) -> list[WebSession]:
        rows = self._conn().execute("SELECT user, password_tag, address, created_at, expires_at FROM web_sessions"
                                    " WHERE expires_at > ? ORDER BY user, created_at", (time.time(),))
        return [WebSession(**dict(r)) for r in rows]

    def end_session(self, id_sha256: str) -> None:
        with self.tx() as db:
            db.execute("DELETE FROM web_sessions WHERE id_sha256 = ?", (id_sha256,))

    def end_sessions_of(self, user: str) -> int:
        with self.tx() as db:
            return db.execute("DELETE FROM web_sessions WHERE user = ?", (user,)).rowcount

    def end_sessions_except(self, tags: dict[str, str]) -> int:
        """End every session but those of these users opened with these passwords (user: password tag)."""
        now = time.time()
        with self.tx() as db:
            rows = db.execute("SELECT id_sha256, user, password_tag, expires_at FROM web_sessions").fetchall()
            gone = [(r["id_sha256"],) for r in rows
                    if r["expires_at"] <= now or tags.get(r["user"]) != r["password_tag"]]
            db.executemany("DELETE FROM web_sessions WHERE id_sha256 = ?", gone)
        return len(gone)

    def record_owner(self, job_name: str, user: str, handed_at: float, token: str | None = None) -> None:
        """`token`: the API token that handed it over (its webhook is the job's), None from the console."""
        with self.tx() as db:
            db.execute("INSERT INTO web_owners (job_name, user, handed_at, token) VALUES (?, ?, ?, ?)"
                       " ON CONFLICT(job_name) DO UPDATE SET user = excluded.user, handed_at = excluded.handed_at,"
                       " token = excluded.token", (job_name, user, handed_at, token))

    def owner_token(self, job_name: str, created_at: float) -> str | None:
        """The API token that handed this job over, if one did."""
        row: sqlite3.Row | None = self._conn().execute(
            "SELECT token FROM web_owners WHERE job_name = ? AND handed_at <= ?", (job_name, created_at)).fetchone()
        return str(row["token"]) if row and row["token"] else None

    def owner(self, job_name: str, created_at: float) -> str | None:
        """Who handed the job over, if this job came from that hand-over (not an earlier job of that name)."""
        row: sqlite3.Row | None = self._conn().execute(
            "SELECT user FROM web_owners WHERE job_name = ? AND handed_at <= ?", (job_name, created_at)).fetchone()
        return str(row["user"]) if row else None
