"""Wiring: store, recovery, workers, intake and the watcher, run until a signal says stop."""

from __future__ import annotations

import fcntl
import os
import signal
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import IO, Any, Callable

from heygem_daemon.ops import metrics, sdnotify
from heygem_daemon.ops.cleanup import Cleanup
from heygem_daemon.config import Config, ConfigError, load_config
from heygem_daemon.ops.daemon_state import LOCK_FILE, write_state
from heygem_daemon.notify.outbox import Notifier, Outbox
from heygem_daemon.delivery.report import BatchReport
from heygem_daemon.delivery.service import DeliveryService
from heygem_daemon.ops.diskguard import DiskGuard
from heygem_daemon.ops.orphans import rescue_unknown_inputs
from heygem_daemon.engines.registry import ENGINES, check_engines, needs_face
from heygem_daemon.intake.claim import Claimer, recover_detected
from heygem_daemon.intake.inspect import Inspector
from heygem_daemon.intake.intake import Intake
from heygem_daemon.fs.watcher import start_watcher
from heygem_daemon.generation.jobs import finalize_job, recover, settle_cancelled
from heygem_daemon.log import get_logger, set_level, setup_logging
from heygem_daemon.ops.reload import plan_reload
from heygem_daemon.state import Job, Store
from heygem_daemon.generation.workers import WorkerPool

log = get_logger("heygem.daemon")
DB_FILE = "heygem.db"
SIGNAL_POLL_SECONDS = 0.2
STATUS_INTERVAL = 1.0
# Asked of systemd on top of the drain time, for checkpointing and shutting down after it.
STOP_MARGIN_SECONDS = 30.0


class AlreadyRunning(Exception):
    pass


def store_for(cfg: Config) -> Store:
    return Store(cfg.folder("state") / DB_FILE)


def acquire_lock(state_dir: Path) -> IO[str]:
    """One daemon per state folder: a second one would claim the same files twice."""
    fh = open(state_dir / LOCK_FILE, "a+", encoding="utf-8")
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.seek(0)
        other = fh.read().strip() or "?"
        fh.close()
        raise AlreadyRunning(f"another heygem-daemon (pid {other}) is already serving {state_dir}") from None
    fh.seek(0)
    fh.truncate()
    fh.write(f"{os.getpid()}\n")
    fh.flush()
    return fh


class Daemon:
    def __init__(self, cfg: Config, config_path: Path | None = None) -> None:
        self.cfg = cfg
        self.config_path = config_path
        self.stop = threading.Event()
        self.store = store_for(cfg)
        self.inspector = Inspector(cfg.watcher.probe_workers)
        self.pool = WorkerPool(cfg, store_for(cfg), self._task_ended)
        self.outbox = Outbox(cfg, store_for(cfg))
        self.chat = Notifier(self.outbox)
        self.intake = Intake(cfg, Claimer(cfg, store_for(cfg), self._job_failed), self.inspector,
                             set(ENGINES), lambda name: needs_face(name, cfg.engines.get(name)), self.pool.notify,
                             on_alert=self.outbox.enqueue_alert)
        self.delivery = DeliveryService(cfg, store_for(cfg), self._report, self.outbox.enqueue_alert)
        self._finalize_store = store_for(cfg)
        self._finalize_lock = threading.Lock()
        self.systemd = sdnotify.Notifier()
        self.disk = DiskGuard(cfg)
        self.cleanup = Cleanup(cfg, store_for(cfg))
        self.draining = False
        # Set only by signal handlers (plain assignments: a handler must never take a lock).
        self._stop_signals = 0
        self._reload_requested = False

    def _job_failed(self, job: Job, record: dict[str, Any]) -> None:
        # A job that made some videos is announced once, by its delivery report, which lists what failed.
        if not record.get("videos_made"):
            self.outbox.enqueue_failure(job, record)

    def _report(self, report: BatchReport) -> None:
        if not report.videos:
            return  # nothing was made: the failure message (intake or generation) already said why
        job = self.store.jobs.find(report.job_id) if report.job_id else None
        self.outbox.enqueue_report(replace(report, notify_urls=job.spec.get("notify") if job else None))

    def _task_ended(self, job_id: str) -> None:
        with self._finalize_lock:
            finalize_job(self.cfg, self._finalize_store, job_id, self._job_failed)

    def run(self) -> int:
        recover_detected(self.cfg, self.store)
        recover(self.cfg, self.store, self._job_failed)
        rescue_unknown_inputs(self.cfg, self.store)
        settle_cancelled(self.cfg, self.store, self._job_failed)
        self.chat.start()
        self.disk.check()
        self.pool.start()
        self.delivery.start()
        observer, mode = start_watcher(self.cfg.folder("inbox"), self.cfg.watcher.mode,
                                       self.cfg.watcher.poll_interval, self.intake.touch)
        intake_thread = threading.Thread(target=self.intake.run, args=(self.stop,), name="intake", daemon=True)
        self._threads: list[threading.Thread] = [intake_thread, observer]
        self._apply_hold()
        intake_thread.start()
        self.cleanup.start()
        server, collector = self._start_metrics()
        self.systemd.ready(self._status())
        log.info("daemon ready", inbox=str(self.cfg.folder("inbox")), outputs=str(self.cfg.folder("outputs")),
                 engine=self.cfg.engine.name, devices=self.cfg.workers.devices, watch_mode=mode,
                 watchdog_seconds=self.systemd.watchdog_interval, metrics_port=self.cfg.metrics.port)
        self._loop(lambda: self._stop_signals > 0)
        self._drain()
        self.stop.set()
        log.info("stopping")
        observer.stop()
        self.intake.wake.set()
        intake_thread.join(10)
        self.pool.stop()
        self.chat.stop()
        self.cleanup.stop()
        if server is not None:
            metrics.stop(server, collector)
        self.delivery.stop()
        self.inspector.close()
        observer.join(5)
        log.info("stopped")
        self.systemd.close()
        return 0

    # --- the main loop: signals, watchdog, status, disk guard, cancels -----------------------------

    def _loop(self, done: Callable[[], bool]) -> None:
        next_beat = next_disk = next_status = 0.0
        unhealthy_logged = False
        while not done():
            now = time.monotonic()
            try:
                if self._reload_requested and not self.draining:
                    self._reload_requested = False
                    self._reload()
                if now >= next_disk:
                    next_disk = now + self.cfg.disk_guard.check_seconds
                    was_low = self.disk.low
                    if bool(self.disk.check()) != bool(was_low):
                        self._apply_hold()
                if now >= next_status:
                    next_status = now + STATUS_INTERVAL
                    with self._finalize_lock:
                        settle_cancelled(self.cfg, self._finalize_store, self._job_failed)
                    self.systemd.status(self._status())
            except Exception:
                log.exception("main loop step failed; trying again")
            interval = self.systemd.watchdog_interval
            if interval is not None and now >= next_beat:
                # A thread that died means the daemon no longer does its job: stay silent, get restarted.
                dead = [t.name for t in self._threads if not t.is_alive()]
                dead += [] if self.pool.alive() else ["workers"]
                if not dead:
                    self.systemd.watchdog()
                    next_beat = now + interval
                elif not unhealthy_logged:
                    unhealthy_logged = True
                    log.error("a daemon thread died; withholding the watchdog ping so systemd restarts us",
                              threads=dead)
            time.sleep(SIGNAL_POLL_SECONDS)

    def _drain(self) -> None:
        """Stop taking work; let running tasks finish within shutdown.drain_seconds (a second signal
        cuts it short). Whatever still runs afterwards is checkpointed back to the queue by pool.stop()."""
        self.draining = True
        self.pool.drain()
        self._apply_hold()
        budget = self.cfg.shutdown.drain_seconds
        deadline = time.monotonic() + budget
        # Stretches systemd's stop timeout when drain_seconds outgrew TimeoutStopSec in the unit.
        self.systemd.stopping(budget + STOP_MARGIN_SECONDS)
        if not self.pool.busy():
            return
        log.info("draining: taking no new work, letting running tasks finish", drain_seconds=budget,
                 running=[d for d in self.pool.describe() if d["task"]])
        self._loop(lambda: not self.pool.busy() or time.monotonic() >= deadline or self._stop_signals > 1)
        if self.pool.busy():
            why = "second stop signal" if self._stop_signals > 1 else "drain time over"
            log.warning(f"{why}: running tasks go back to the queue", running=[d for d in self.pool.describe()
                                                                              if d["task"]])

    def _apply_hold(self) -> None:
        if self.draining or self.disk.low:
            self.intake.hold.set()
        else:
            self.intake.hold.clear()
            self.intake.wake.set()
        write_state(self.cfg.folder("state"), draining=self.draining, disk_low=self.disk.low,
                    devices=self.cfg.workers.devices)

    def _status(self) -> str:
        counts = self.store.tasks.counts()
        parts = [f"{counts.get('queued', 0)} queued, {counts.get('running', 0)} running"]
        parts += [f"{d['device']}: {d['task'] or 'idle'}" for d in self.pool.describe()]
        if self.disk.low:
            parts.append(self.disk.low)
        if self.draining:
            parts.append("draining for shutdown")
        return " | ".join(parts)

    def _start_metrics(self) -> tuple[Any, Any]:
        if self.cfg.metrics.port is None:
            return None, None
        collector = metrics.StateCollector(
            store_for(self.cfg), self.pool.describe,
            lambda: {"draining": self.draining, "disk_low": bool(self.disk.low)})
        try:
            return metrics.serve(self.cfg.metrics.port, collector), collector
        except OSError as exc:
            # Metrics are a side show: a taken port must not stop video production.
            log.error("cannot serve metrics; running without them", port=self.cfg.metrics.port,
                      error=exc.strerror, hint="pick a free metrics.port and restart")
            return None, None

    # --- SIGHUP --------------------------------------------------------------------------------

    def _reload(self) -> None:
        self.systemd.reloading()
        try:
            new = load_config(self.config_path, prepare=False)
            check_engines(new)
        except ConfigError as exc:
            log.error("new config refused; the daemon keeps running with the old one", error=str(exc),
                      config=str(self.config_path or "defaults"))
            self.systemd.reloaded()
            return
        plan = plan_reload(self.cfg, new)
        cfg = plan.applied
        self.cfg = cfg
        self.intake.set_config(cfg)
        self.pool.set_config(cfg)
        self.disk.cfg = cfg
        self.cleanup.apply(cfg)
        set_level(cfg.logging.level)
        self._apply_hold()
        log.info("config reloaded", applied=plan.live, need_restart=plan.restart)
        if plan.restart:
            log.warning("changed keys that take effect only after a restart (systemctl restart heygem-daemon)",
                        keys=plan.restart)
        self.systemd.reloaded()

    def request_stop(self, *_: Any) -> None:
        self._stop_signals += 1

    def request_reload(self, *_: Any) -> None:
        self._reload_requested = True


def run_daemon(cfg: Config, config_path: Path | None = None) -> int:
    setup_logging(cfg.folder("logs"), cfg.logging.level, cfg.logging.console)
    check_engines(cfg)
    lock = acquire_lock(cfg.folder("state"))
    try:
        daemon = Daemon(cfg, config_path)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, daemon.request_stop)
        signal.signal(signal.SIGHUP, daemon.request_reload)
        return daemon.run()
    finally:
        lock.close()
