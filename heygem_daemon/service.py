"""Wiring: store, recovery, workers, intake and the watcher, run until a signal says stop."""

from __future__ import annotations

import fcntl
import os
import signal
import threading
from pathlib import Path
from typing import IO, Any

from heygem_daemon.config import Config
from heygem_daemon.delivery.service import DeliveryService
from heygem_daemon.engines.registry import ENGINES, check_engines, needs_face
from heygem_daemon.intake.claim import Claimer, recover_detected
from heygem_daemon.intake.inspect import Inspector
from heygem_daemon.intake.intake import Intake
from heygem_daemon.intake.watcher import start_watcher
from heygem_daemon.jobs import finalize_job, recover
from heygem_daemon.log import get_logger, setup_logging
from heygem_daemon.store import Store
from heygem_daemon.workers import WorkerPool

log = get_logger("heygem.daemon")
DB_FILE = "heygem.db"
LOCK_FILE = "heygem.pid"
SIGNAL_POLL_SECONDS = 0.2


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
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.stop = threading.Event()
        self.store = store_for(cfg)
        self.inspector = Inspector(cfg.watcher.probe_workers)
        self.pool = WorkerPool(cfg, store_for(cfg), self._task_ended)
        self.intake = Intake(cfg, Claimer(cfg, store_for(cfg)), self.inspector, set(ENGINES), needs_face,
                             self.pool.notify)
        # on_report / on_alert default to log lines; the notifications outbox plugs in here.
        self.delivery = DeliveryService(cfg, store_for(cfg))
        self._finalize_store = store_for(cfg)
        self._finalize_lock = threading.Lock()
        self._stop_requested = False

    def _task_ended(self, job_id: str) -> None:
        with self._finalize_lock:
            finalize_job(self.cfg, self._finalize_store, job_id)

    def run(self) -> int:
        recover_detected(self.cfg, self.store)
        recover(self.cfg, self.store)
        self.pool.start()
        self.delivery.start()
        observer, mode = start_watcher(self.cfg.folder("inbox"), self.cfg.watcher.mode,
                                       self.cfg.watcher.poll_interval, self.intake.touch)
        intake_thread = threading.Thread(target=self.intake.run, args=(self.stop,), name="intake", daemon=True)
        intake_thread.start()
        log.info("daemon ready", inbox=str(self.cfg.folder("inbox")), outputs=str(self.cfg.folder("outputs")),
                 engine=self.cfg.engine.name, devices=self.cfg.workers.devices, watch_mode=mode)
        while not self._stop_requested:
            self.stop.wait(SIGNAL_POLL_SECONDS)
        self.stop.set()
        log.info("stopping")
        observer.stop()
        self.intake.wake.set()
        intake_thread.join(10)
        self.pool.stop()
        self.delivery.stop()
        self.inspector.close()
        observer.join(5)
        log.info("stopped")
        return 0

    def request_stop(self, *_: Any) -> None:
        # Only a plain flag: the handler runs on the main thread, possibly inside stop.wait() while it
        # holds the Event's lock, so calling stop.set() here could deadlock.
        self._stop_requested = True


def run_daemon(cfg: Config) -> int:
    setup_logging(cfg.folder("logs"), cfg.logging.level, cfg.logging.console)
    check_engines(cfg)
    lock = acquire_lock(cfg.folder("state"))
    try:
        daemon = Daemon(cfg)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, daemon.request_stop)
        return daemon.run()
    finally:
        lock.close()
