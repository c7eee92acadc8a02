"""The read model: jobs, ad-hoc batches and the daemon's condition as plain dicts, for `status --json`
and the web console alike (one place decides what a job looks like from outside)."""

from __future__ import annotations

import time
from datetime import datetime
from pathlib import Path
from typing import Any

from heygem_daemon.config import Config
from heygem_daemon.state import Batch, Job, Store


def _local(when: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(when))


def local_time(when: float | str) -> str:
    """Epoch seconds, or an ISO 8601 time with its zone (a link's expires_at), in the host's local time: every
    time a person reads is in one zone."""
    return _local(datetime.fromisoformat(when).timestamp() if isinstance(when, str) else when)


def job_view(cfg: Config, store: Store, job: Job) -> dict[str, Any]:
    tasks = store.tasks.select(job.id)
    done = sum(t.state == "done" for t in tasks)
    progress = sum(t.progress for t in tasks) / len(tasks) if tasks else (1.0 if job.state == "done" else 0.0)
    view: dict[str, Any] = {
        "id": job.id, "name": job.name, "state": job.state, "videos": len(tasks), "done": done,
        "progress": round(progress, 3), "owner": job.owner, "priority": job.spec.get("priority", "normal"),
        "engine": job.spec.get("engine") or cfg.engine.name, "preset": job.spec.get("preset") or cfg.engine.preset,
        "created": _local(job.created_at),
        "outputs": str(cfg.folder("outputs") / job.name) if done else None,
        "delivery": store.deliveries.summary(job.id),
        "tasks": [{"name": t.name, "state": t.state, "progress": round(t.progress, 3), "attempts": t.attempts,
                   "device": t.device, "error": (t.last_error or {}).get("reason"),
                   "file": Path(t.output).name} for t in tasks],
    }
    if job.duplicate_of:
        original = store.jobs.get(job.duplicate_of)
        view["duplicate_of"] = original.name
        view["outputs"] = str(cfg.folder("outputs") / original.name)
    if job.error:
        view["error"] = {"reason": job.error.get("reason"), "hint": job.error.get("hint")}
    if job.spec.get("warnings"):
        view["warnings"] = job.spec["warnings"]
    return view


def adhoc_view(cfg: Config, store: Store, batch: Batch) -> dict[str, Any]:
    """Videos another tool put into outputs/: no job of ours, but a delivery all the same."""
    stuck = [d.last_error for d in store.deliveries.select(batch.id) if d.state in ("pending", "uploading") and d.last_error]
    return {"name": batch.name, "outputs": str(cfg.folder("outputs") / batch.folder),
            "created": _local(batch.created_at),
            "delivery": store.deliveries.summary(batch.id),
            "error": {"reason": stuck[-1].get("reason"), "hint": stuck[-1].get("hint")} if stuck else None}


def condition(cfg: Config, store: Store) -> dict[str, Any]:
    """The daemon's state file, task counts, what queued tasks wait for, and the engines' services."""
    from heygem_daemon.generation.dependencies import engine_dependencies
    from heygem_daemon.generation.outages import waiting
    from heygem_daemon.ops.daemon_state import read_state

    return {"daemon": read_state(cfg.folder("state")), "tasks": store.tasks.counts(), "waiting_for": waiting(store),
            "dependencies": [d.to_dict() for d in engine_dependencies(cfg)]}


def status_doc(cfg: Config, store: Store, limit: int) -> dict[str, Any]:
    """What `status --json` prints."""
    return {**condition(cfg, store), "jobs": [job_view(cfg, store, j) for j in store.jobs.select(limit=limit)],
            "adhoc": [adhoc_view(cfg, store, b) for b in store.deliveries.adhoc_batches(limit)]}


def jobs_page(cfg: Config, store: Store, states: tuple[str, ...] | None, name_part: str, page: int,
              size: int) -> dict[str, Any]:
    """One page of the jobs list, newest first, with what the pager needs."""
    jobs, total = store.jobs.page(states, name_part, (page - 1) * size, size)
    return {"jobs": [job_view(cfg, store, j) for j in jobs], "total": total, "page": page,
            "pages": max(1, -(-total // size))}
