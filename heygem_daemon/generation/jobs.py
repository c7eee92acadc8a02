"""Job life cycle beyond intake: finishing a job, recovering after a crash, retrying a failed job."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from heygem_daemon.config import Config
from heygem_daemon.failures import ERROR_FILE, error_record, warnings_of, write_error_json
from heygem_daemon.fs.ops import move, remove_tree
from heygem_daemon.intake.claim import OnFailed, archive_dir
from heygem_daemon.intake.pairing import READY_MARKER
from heygem_daemon.log import get_logger
from heygem_daemon.state import CANCELLING, Job, Store
from heygem_daemon.generation.workers import CANCELLED_HINT, CANCELLED_REASON

log = get_logger("heygem.jobs")


class JobError(Exception):
    """An operator command that cannot be carried out; the message says why."""


def _relocate_inputs(job: Job, dest: Path) -> None:
    staging = Path(job.spec["staging"])
    if staging.exists() and not dest.exists():
        dest.parent.mkdir(parents=True, exist_ok=True)
        move(staging, dest)


def finalize_job(cfg: Config, store: Store, job_id: str, on_failed: OnFailed | None = None) -> None:
    """Once every task has ended: inputs to archive/ (all done) or failed/ with error.json; work/ removed."""
    tasks = store.tasks.select(job_id)
    if not tasks or any(t.state not in ("done", "failed") for t in tasks):
        return
    job = store.jobs.get(job_id)
    if job.state in ("done", "failed", "retried"):
        return
    failed = [t for t in tasks if t.state == "failed"]
    if not failed:
        store.jobs.set_state(job_id, "generated")
        dest = archive_dir(cfg, job.name)
        _relocate_inputs(job, dest)
        remove_tree(cfg.folder("work") / job.id)
        store.jobs.set_state(job_id, "done", spec={**job.spec, "inputs_at": str(dest)})
        log.info("job done", job_id=job.id, job=job.name, videos=len(tasks),
                 outputs=str(cfg.folder("outputs") / job.name))
        return
    dest = cfg.folder("failed") / job.name
    _relocate_inputs(job, dest)
    made = [t for t in tasks if t.state == "done"]
    problems = [{"file": f"{t.name} ({t.portrait} + {t.audio})", "reason": (t.last_error or {}).get("reason", ""),
                 "hint": (t.last_error or {}).get("hint", ""), "detail": (t.last_error or {}).get("detail", "")}
                for t in failed]
    record = error_record(job.name, "generate", problems, job_id=job.id, videos_made=[t.name for t in made],
                          outputs=str(cfg.folder("outputs") / job.name) if made else None, **warnings_of(job.spec))
    write_error_json(dest, record)
    remove_tree(cfg.folder("work") / job.id)
    if not made:
        _drop_empty(cfg.folder("outputs") / job.name)
    # The inputs (job.yaml with its chat targets among them) are in failed/ now, before the store says so.
    job = replace(job, spec={**job.spec, "inputs_at": str(dest)})
    if on_failed is not None:
        on_failed(job, record)
    store.jobs.set_state(job_id, "failed", error=record, spec=job.spec)
    log.warning("job failed", job_id=job.id, job=job.name, failed=len(failed), made=len(made),
                reason=record["reason"], hint=record["hint"])


def _drop_empty(folder: Path) -> None:
    """Workers make outputs/<job>/ before the first attempt; a job without a video must not leave it behind
    (people would look there for a video, and the name stays free for a retry)."""
    try:
        folder.rmdir()
    except OSError:
        pass  # not there, or something is in it (another tool's file): leave it


def recover(cfg: Config, store: Store, on_failed: OnFailed | None = None) -> dict[str, int]:
    """After a crash: tasks left running are queued again (or done, if their output made it), and jobs
    whose tasks all ended are finished. Completed work is never redone."""
    counts = {"requeued": 0, "completed": 0}
    for task in store.tasks.select(states=("running",)):
        final = Path(task.output)
        Path(task.output + ".part").unlink(missing_ok=True)
        if final.is_file() and final.stat().st_size > 0:
            store.tasks.finish(task.id)
            counts["completed"] += 1
        else:
            store.tasks.requeue([task.id], reset_attempts=False)
            counts["requeued"] += 1
    for job in store.jobs.select(("queued", "running", "generated", CANCELLING)):
        finalize_job(cfg, store, job.id, on_failed)
    if any(counts.values()):
        log.warning("recovered tasks interrupted by a crash", **counts)
    return counts


def retry_job(cfg: Config, store: Store, ref: str) -> str:
    """Give a failed job another go. Returns a sentence saying what happened."""
    job = store.jobs.find(ref)
    if job is None:
        raise JobError(f"no job called {ref!r}; `heygem-daemon jobs --failed` lists them")
    if job.state != "failed":
        raise JobError(f"job {job.name} is {job.state}, not failed; only failed jobs can be retried")
    inputs = Path(job.spec.get("inputs_at") or job.spec["staging"])
    if not inputs.exists():
        raise JobError(f"the inputs of {job.name} are no longer at {inputs}; drop the files again instead")
    (inputs / ERROR_FILE).unlink(missing_ok=True)
    tasks = store.tasks.select(job.id)
    if not tasks:
        return _redrop(cfg, store, job, inputs)
    staging = cfg.folder("work") / job.id / "in"
    staging.parent.mkdir(parents=True, exist_ok=True)
    move(inputs, staging)
    failed = [t.id for t in tasks if t.state == "failed"]
    spec: dict[str, Any] = {**job.spec, "staging": str(staging)}
    spec.pop("inputs_at", None)
    store.jobs.set_state(job.id, "queued", spec=spec)
    store.tasks.requeue(failed, reset_attempts=True)
    log.info("job retried", job_id=job.id, job=job.name, tasks=len(failed))
    return f"{job.name}: {len(failed)} task(s) queued again"


def _redrop(cfg: Config, store: Store, job: Job, inputs: Path) -> str:
    """A job refused at intake goes back through intake as a folder, marked ready, after the fix."""
    target = cfg.folder("inbox") / job.name
    if target.exists():
        target = target.with_name(f"{job.name}-retry-{time.strftime('%H%M%S')}")
    if inputs.is_dir():
        move(inputs, target)
        (target / READY_MARKER).touch()
    store.jobs.set_state(job.id, "retried")
    log.info("job sent back through intake", job_id=job.id, job=job.name, folder=str(target))
    return f"{job.name}: inputs moved back to {target} for intake"


def cancel_error() -> dict[str, Any]:
    return {"stage": "generate", "reason": CANCELLED_REASON, "hint": CANCELLED_HINT}


def cancel_job(store: Store, ref: str) -> str:
    """Ask the daemon (through the store) to stop a queued or running job. Returns what will happen."""
    job = store.jobs.find(ref)
    if job is None:
        raise JobError(f"no job called {ref!r}; `heygem-daemon status` lists them")
    before, running = store.jobs.cancel(job.id, cancel_error())
    if before not in ("queued", "running", CANCELLING):
        raise JobError(f"job {job.name} is {before}; only queued or running jobs can be cancelled")
    stopping = f"its {running} running task(s) are stopped and " if running else ""
    return (f"{job.name}: cancelling; {stopping}its inputs go to failed/{job.name}/ with error.json "
            f"(`heygem-daemon retry {job.name}` runs it again). The daemon does this within seconds.")


def settle_cancelled(cfg: Config, store: Store, on_failed: OnFailed | None = None) -> list[str]:
    """Daemon side of `cancel`: queued tasks of cancelling jobs fail, and a job with nothing left
    running is finished (inputs to failed/). Running tasks are stopped by their worker slot."""
    ids = []
    for job in store.jobs.select((CANCELLING,)):
        store.jobs.cancel(job.id, cancel_error())
        finalize_job(cfg, store, job.id, on_failed)
        ids.append(job.id)
    return ids
