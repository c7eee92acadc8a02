"""The read model: jobs, ad-hoc batches and the daemon's condition as plain dicts, for `status --json`
and the web console alike (one place decides what a job looks like from outside)."""

from __future__ import annotations

import json
import time
from collections import Counter
from datetime import datetime
from pathlib import Path
from typing import Any

from heygem_daemon.config import Config
from heygem_daemon.delivery.links import LINKS_JSON
from heygem_daemon.notify.webhooks import KIND as WEBHOOK, TARGET_PREFIX as WEBHOOK_TARGET
from heygem_daemon.state import Batch, Job, Notification, Store, Task

CHAT_UNDELIVERED_SHOWN = 5


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
    waits = _waits(tasks)
    if waits:
        view["waiting_for"] = waits
    if job.duplicate_of:
        original = store.jobs.get(job.duplicate_of)
        view["duplicate_of"] = original.name
        view["outputs"] = str(cfg.folder("outputs") / original.name)
    if job.error:
        view["error"] = {"reason": job.error.get("reason"), "hint": job.error.get("hint")}
    if job.spec.get("warnings"):
        view["warnings"] = job.spec["warnings"]
    rows = store.outbox.select(job.id)
    if chat := [r for r in rows if r.kind != WEBHOOK]:
        view["chat"] = chat_view(chat)
    if hooks := [r for r in rows if r.kind == WEBHOOK]:
        view["webhooks"] = webhooks_view(hooks)
    return view


def webhooks_view(rows: list[Notification]) -> list[dict[str, Any]]:
    """A job's webhook deliveries: event, receiver (the token), state, tries and what the receiver said last."""
    return [{"event": r.title, "token": r.target.removeprefix(WEBHOOK_TARGET), "state": r.state,
             "attempts": r.attempts, "error": r.last_error, "sent": _local(r.sent_at) if r.sent_at else None}
            for r in rows]


def job_resource(cfg: Config, store: Store, job: Job) -> dict[str, Any]:
    """The job as the API shows it (GET /api/v1/jobs/{ref}, web/api.py's JobOut) and webhooks send it: one
    serialiser for both, so a webhook's body is what the receiver would GET."""
    view = job_view(cfg, store, job)
    links = links_doc(cfg, job.name) or {}
    error = job.error
    return {"ref": job.name, "id": job.id, "state": job.state, "progress": view["progress"],
            "priority": view["priority"], "engine": view["engine"], "preset": view["preset"],
            "owner": store.web.owner(job.name, job.created_at), "created": job.created_at,
            "videos": [{k: t[k] for k in ("name", "state", "progress", "attempts", "error", "file")}
                       for t in view["tasks"]],
            "links": [_link(f) for f in links.get("files", [])],
            "zip": _link(links["zip"]) if links.get("zip") else None,
            "problem": {k: error.get(k) for k in ("kind", "reason", "hint")} if error else None,
            "duplicate_of": view.get("duplicate_of")}


def _link(entry: dict[str, Any]) -> dict[str, Any]:
    return {"file": entry["file"], "size": entry["size"], "sha256": entry.get("sha256"), "link": entry.get("link"),
            "expires_at": entry.get("expires_at")}


def links_doc(cfg: Config, job_name: str) -> dict[str, Any] | None:
    """The job's links.json (its videos, presigned links and their expiry), None before delivery wrote it."""
    path = cfg.folder("outputs") / job_name / LINKS_JSON
    try:
        doc: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, ValueError):
        return None
    return doc


def chat_view(rows: list[Notification]) -> dict[str, Any]:
    """A job's chat messages: how many went out, how many wait for a retry (with what the service said last),
    and the ones that will not go out — refused by the service or given up — with the reason."""
    states = Counter(r.state for r in rows)
    return {"sent": states["sent"], "waiting": states["pending"] + states["retrying"],
            "last_error": next((r.last_error for r in reversed(rows) if r.state == "retrying"), None),
            "not_delivered": _undelivered(rows)}


def _undelivered(rows: list[Notification]) -> list[dict[str, Any]]:
    return [{"title": r.title, "reason": r.last_error} for r in rows if r.state == "gave_up"]


def _waits(tasks: list[Task]) -> list[dict[str, Any]]:
    """What a job's queued tasks wait for (an outage: a service down, the disk full), by dependency: since
    the earliest, how many. Empty while one of its tasks runs: the job is then running, not waiting."""
    if any(t.state == "running" for t in tasks):
        return []
    found: dict[str, dict[str, Any]] = {}
    for t in tasks:
        err = t.last_error or {}
        if t.state != "queued" or err.get("kind") != "outage" or err.get("since") is None:
            continue
        seen = found.setdefault(err.get("dependency") or "", {"dependency": err.get("dependency") or "",
                                                            "since": err["since"], "tasks": 0})
        seen["since"], seen["tasks"] = min(seen["since"], err["since"]), seen["tasks"] + 1
    return [{**w, "since_text": _local(w["since"])} for w in sorted(found.values(), key=lambda w: w["since"])]


def adhoc_view(cfg: Config, store: Store, batch: Batch) -> dict[str, Any]:
    """Videos another tool put into outputs/: no job of ours, but a delivery all the same."""
    delivery = store.deliveries.summary(batch.id)
    problem = delivery["problem"] if delivery else None
    return {"name": batch.name, "outputs": str(cfg.folder("outputs") / batch.folder),
            "created": _local(batch.created_at), "delivery": delivery,
            "error": {"reason": problem["reason"], "hint": problem["hint"]} if problem else None}


def condition(cfg: Config, store: Store) -> dict[str, Any]:
    """The daemon's state file, task counts, what queued tasks wait for, the engines' services, and the last
    chat messages of no job (operator alerts, ad-hoc batches) that were not delivered."""
    from heygem_daemon.generation.dependencies import engine_dependencies
    from heygem_daemon.generation.outages import waiting
    from heygem_daemon.ops.daemon_state import read_state

    unowned = [r for r in store.outbox.select(states=("gave_up",)) if r.job_id is None]
    return {"daemon": read_state(cfg.folder("state")), "tasks": store.tasks.counts(), "waiting_for": waiting(store),
            "dependencies": [d.to_dict() for d in engine_dependencies(cfg)],
            "chat_not_delivered": _undelivered(unowned[-CHAT_UNDELIVERED_SHOWN:])}


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
