#!/usr/bin/env python3
"""Delivery step benchmark: what one delivery step costs for a large finished job waiting for its report.

Every step, each finished job not yet reported gets its done tasks' outputs registered (the outputs watcher
may not have seen them yet). Here a job of --tasks done tasks whose videos are all registered already (the
state while its uploads run) is checked --steps times: SQL statements and time per step, by the service's
one query per job (DeliveryRepository.new_outputs) against the baseline of one `known` query per task (how
the step did it before), in the same run on the same store.
Usage: .venv/bin/python bench/delivery.py [--tasks 500] [--steps 50]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import yaml

from heygem_daemon.config import load_config
from heygem_daemon.delivery.service import DeliveryService
from heygem_daemon.log import setup_logging
from heygem_daemon.state import Batch, Job, NewTask, Store


class PerTaskLookups(DeliveryService):
    """The baseline: the step as it was, asking the store once per done task."""

    def _job_batch_ended(self, batch: Batch, job: Job, now: float) -> bool:
        if batch.not_before > now:
            return False
        for task in self.store.tasks.select(job.id, ("done",)):
            if not self.store.deliveries.known(task.output) and Path(task.output).is_file():
                self._register(Path(task.output), Path(task.output).stat().st_size)
        return all(d.state in ("linked", "missing") for d in self.store.deliveries.select(batch.id))


def finished_job(store: Store, outputs: Path, tasks: int) -> Job:
    job = store.jobs.create("big", {})
    folder = outputs / job.name
    folder.mkdir(parents=True)
    store.jobs.queue(job.id, [NewTask(f"v{i:04d}", "a.wav", "p.jpg", str(folder / f"v{i:04d}.mp4"))
                              for i in range(tasks)])
    for i in range(tasks):
        (folder / f"v{i:04d}.mp4").write_bytes(b"\0" * 1000)
        task = store.tasks.take_next("cpu")
        assert task is not None and store.tasks.finish(task.id)
    store.jobs.set_state(job.id, "done")
    return store.jobs.get(job.id)


def measure(service: DeliveryService, job: Job, steps: int) -> tuple[float, float]:
    """(SQL statements, seconds) per step, counted on this thread's connection (the delivery thread's)."""
    statements = 0

    def count(_sql: str) -> None:
        nonlocal statements
        statements += 1

    batch = service.store.deliveries.ensure_batch(job.id, job.name, job.name, job.id)
    conn = service.store.db.conn()
    conn.set_trace_callback(count)
    began = time.perf_counter()
    for _ in range(steps):
        service._job_batch_ended(batch, job, time.time())
    seconds = time.perf_counter() - began
    conn.set_trace_callback(None)
    return statements / steps, seconds / steps


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tasks", type=int, default=500)
    ap.add_argument("--steps", type=int, default=50)
    args = ap.parse_args()
    setup_logging(None, "warning")  # not a line per registered video
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "base").mkdir()
        (Path(tmp) / "config.yaml").write_text(yaml.safe_dump({"base_dir": "base"}))
        cfg = load_config(Path(tmp) / "config.yaml", environ={})
        store = Store(cfg.folder("state") / "heygem.db")
        job = finished_job(store, cfg.folder("outputs"), args.tasks)
        baseline, service = (cls(cfg, store, lambda report: None, lambda key, message: None)
                             for cls in (PerTaskLookups, DeliveryService))
        service._job_batch_ended(store.deliveries.ensure_batch(job.id, job.name, job.name, job.id), job, time.time())
        assert len(store.deliveries.select(job.id)) == args.tasks, "the first step registers every output"
        before_sql, before_s = measure(baseline, job, args.steps)
        after_sql, after_s = measure(service, job, args.steps)
        for s in (baseline, service):
            s.pool.shutdown()
    print(f"{args.tasks}-task job waiting for its report, {args.steps} steps:")
    print(f"  one query per task (before): {before_sql:.0f} SQL statements, {before_s * 1000:.2f} ms per step")
    print(f"  one query per job  (after):  {after_sql:.0f} SQL statements, {after_s * 1000:.2f} ms per step")
    print(f"ratio before / after: {before_sql / after_sql:.0f}x statements, {before_s / after_s:.1f}x time")


if __name__ == "__main__":
    main()
