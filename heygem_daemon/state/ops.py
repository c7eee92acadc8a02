"""Operations bookkeeping: when each cleanup sweep last ran."""

from __future__ import annotations

from heygem_daemon.state.db import Repository


class OpsRepository(Repository):
    def cleanup_runs(self) -> dict[str, float]:
        return {r["name"]: r["last_run"] for r in self._conn().execute("SELECT name, last_run FROM cleanup_runs")}

    def record_cleanup_run(self, name: str, at: float, removed: int, freed: int) -> None:
        with self.tx() as db:
            db.execute("INSERT INTO cleanup_runs (name, last_run, removed, bytes) VALUES (?, ?, ?, ?)"
                       " ON CONFLICT(name) DO UPDATE SET last_run = excluded.last_run,"
                       " removed = excluded.removed, bytes = excluded.bytes", (name, at, removed, freed))
