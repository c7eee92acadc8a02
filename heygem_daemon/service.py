"""Wiring: store, recovery, then the components (ordered list, component.Component) run until a signal
says stop. The main loop handles signals, the watchdog (every component counts), reload (every component
gets the new config), the disk guard, status and cancels; shutdown drains, then stops components in reverse."""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path
from typing import IO, TYPE_CHECKING, Callable

from heygem_daemon.component import Component
from heygem_daemon.failures import Kind
from heygem_daemon.ops import metrics, sdnotify
from heygem_daemon.ops.metrics import MetricsServer, StateCollector
from heygem_daemon.ops.signals import Requests
from heygem_daemon.ops.cleanup import Cleanup
from heygem_daemon.config import Config, ConfigError, load_config
from heygem_daemon.ops.daemon_state import HEARTBEAT_SECONDS, LOCK_FILE, write_state
from heygem_daemon.notify.announce import Announcer
from heygem_daemon.notify.outbox import Notifier, Outbox, alert_now
from heygem_daemon.notify.webhooks import KIND as WEBHOOK, Webhooks, deliver as deliver_webhook
from heygem_daemon.views import job_resource
from heygem_daemon.delivery.service import DeliveryService
from heygem_daemon.ops.diskguard import DiskGuard, wake_folder_waiters
from heygem_daemon.ops.orphans import rescue_unknown_inputs
from heygem_daemon.ops.statedisk import StateDisk, wait_for_room
from heygem_daemon.engines.registry import available, check_engines, needs_face
from heygem_daemon.intake.claim import Claimer, recover_detected
from heygem_daemon.intake.inspect import Inspector
from heygem_daemon.intake.intake import Intake
from heygem_daemon.intake.service import IntakeService
from heygem_daemon.generation.lifecycle import Events, JobFinished, JobQueued, LifeCycle, TaskFailed, TaskFinished
from heygem_daemon.generation.outages import OutageWatch
from heygem_daemon.log import get_logger, set_level, setup_logging
from heygem_daemon.ops.reload import plan_reload
from heygem_daemon.state import Store, db_path
from heygem_daemon.state.db import DatabaseDamaged
from heygem_daemon.generation.speech_ahead import SpeechAhead
from heygem_daemon.generation.workers import WorkerPool

if TYPE_CHECKING:
    from heygem_daemon.generation.remote import RemoteDispatcher

log = get_logger("heygem.daemon")
SIGNAL_POLL_SECONDS = 0.2
STATUS_INTERVAL = 1.0
# Asked of systemd on top of the drain time, for checkpointing and shutting down after it.
STOP_MARGIN_SECONDS = 30.0


class AlreadyRunning(Exception):
    pass


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
    def __init__(self, cfg: Config, config_path: Path | None = None, requests: Requests | None = None) -> None:
        self.cfg = cfg
        self.config_path = config_path
        # Stop and reload requests, set by the signal handlers (installed by cli before anything heavy).
        self.requests = requests or Requests()
        # One store for every component: its connections are per thread.
        self.store = Store(db_path(cfg.folder("state")))
        self.inspector = Inspector(cfg.watcher.probe_workers)
        self.events = Events()
        self.life = LifeCycle(cfg, self.store, self.events)
        self.pool = WorkerPool(cfg, self.life)
        self.speech = SpeechAhead(cfg, self.life) if cfg.speech.ahead_slots else None
        # Remote hosts (Celery queues) take tasks from the same queue, beside or instead of local devices.
        self.remote = _remote(cfg, self.life)
        self.outbox = Outbox(cfg, self.store)
        # Webhooks ride the chat outbox (one row per event and token); their body is the API's job resource.
        self.chat = Notifier(self.outbox, {WEBHOOK: lambda row: deliver_webhook(self.store, row,
                                                                                cfg.web.webhook_allow)})
        webhooks = Webhooks(self.outbox, self.store, lambda job: job_resource(cfg, self.store, job))
        self.announcer = Announcer(self.outbox, self.store, webhooks)
        self.outages = OutageWatch(cfg, self.store, self.outbox.enqueue_alert,
                                   others=lambda: self.remote.outages() if self.remote else [],
                                   wake=self._wake_generation,
                                   on_back=lambda key, text: self.outbox.enqueue_alert(key, text, resolved=True))
        self.intake = Intake(cfg, Claimer(cfg, self.life), self.inspector,
                             set(available()), lambda name: needs_face(name, cfg.engines.get(name)),
                             self._wake_generation,
                             on_alert=self.outbox.enqueue_alert)
        self.inbox = IntakeService(cfg, self.intake)
        self.delivery = DeliveryService(cfg, self.store, self.announcer.reported, self.outbox.enqueue_alert)
        self._subscribe()
        self.systemd = sdnotify.Notifier()
        self.disk = DiskGuard(cfg)
        self.state_disk = StateDisk(cfg.folder("state"), self.store.db, lambda k, t: alert_now(cfg.notify, k, t))
        self.cleanup = Cleanup(cfg, self.store)
        self.metrics = MetricsServer(cfg.metrics.port, StateCollector(
            self.store, self.pool.describe, self._flags, self._remote_workers))
        # Started in this order, stopped in reverse: intake last in, so nothing is claimed before the
        # workers, delivery and chat that carry a job on are running.
        self.components: list[Component] = [self.chat, self.outages, self.pool,
                                            *([self.remote] if self.remote else []),
                                            *([self.speech] if self.speech else []),
                                            self.delivery, self.cleanup, self.metrics, self.inbox]
        self._started: list[Component] = []
        self.draining = False
        self.ready = False
        # Whether a task may wait for work/ or outputs/ (set at start and by each outage): only then does the
        # main loop look, so an idle daemon with a long queue does not scan it every second.
        self._folder_waiters = True

    def _subscribe(self) -> None:
        """Who hears of what the life cycle does: slots wake for queued work, delivery for finished videos,
        and the announcer decides who is told when a job ends."""
        self.events.subscribe(JobQueued, lambda _e: self._wake_generation())
        self.events.subscribe(TaskFinished, lambda _e: self.delivery.wake.set())
        self.events.subscribe(JobFinished, lambda _e: self.delivery.wake.set())
        self.events.subscribe(TaskFailed, lambda e: metrics.ATTEMPTS_FAILED.labels(e.problem.kind.value,
                                                                                 e.state.value).inc())
        self.events.subscribe(TaskFailed, self._note_outage)
        self.announcer.subscribe(self.events)

    def _flags(self) -> dict[str, bool]:
        """What the daemon holds for, as metrics (heygem_<flag>)."""
        return {"draining": self.draining, "disk_low": bool(self.disk.low),
                "state_disk_full": bool(self.state_disk.full)}

    def _wake_generation(self) -> None:
        self.pool.notify()
        if self.speech:
            self.speech.notify()
        if self.remote:
            self.remote.notify()

    def _generating(self) -> bool:
        """What a drain waits for: local renders. Remote ones outlive the daemon and are adopted at its next
        start, so a restart of a busy farm does not wait out `shutdown.drain_seconds`."""
        return self.pool.busy()

    def _running(self) -> list[dict[str, object]]:
        local = [d for d in self.pool.describe() if d["task"]]
        return local + [{"remote": w["host"], "tasks": w["tasks"]} for w in self._remote_workers() if w["tasks"]]

    def _remote_workers(self) -> list[dict[str, object]]:
        return self.remote.describe() if self.remote else []

    def run(self) -> int:
        try:
            return self._serve()
        except DatabaseDamaged:
            # Nothing more goes into a damaged file: no drain; what runs is stopped as a crash would stop it
            # (every step is crash-safe), and the operator restores the backup.
            self.stop_components()
            self.inspector.close()
            self.systemd.close()
            raise

    def _serve(self) -> int:
        recover_detected(self.cfg, self.store)
        self.life.recover(self.remote.adoptable() if self.remote else frozenset())
        rescue_unknown_inputs(self.cfg, self.store)
        self.disk.check()
        self._apply_hold()
        self.start_components()
        ready = self.ready = not self._stopping()
        if ready:
            self.systemd.ready(self._status())
            log.info("daemon ready", inbox=str(self.cfg.folder("inbox")), outputs=str(self.cfg.folder("outputs")),
                     engine=self.cfg.engine.name, devices=self.cfg.workers.devices, watch_mode=self.inbox.mode,
                     watchdog_seconds=self.systemd.watchdog_interval, metrics_port=self.cfg.metrics.port)
        self._loop(self._stopping)
        if ready:  # a stop during start-up: nothing began that a drain would wait for (delivery may not even run)
            self._drain()
        log.info("stopping")
        self.stop_components()
        self.inspector.close()
        log.info("stopped")
        self.systemd.close()
        return 0

    def _stopping(self) -> bool:
        return self.requests.stops > 0

    def start_components(self) -> None:
        for component in self.components:
            if self._stopping():
                break  # stopped while starting: only what started is stopped again
            component.start()
            self._started.append(component)

    def stop_components(self) -> None:
        while self._started:
            component = self._started.pop()
            try:
                component.stop()
            except Exception:  # the others must stop all the same
                log.exception("a component did not stop cleanly", component=component.name)

    def dead_components(self) -> list[str]:
        return [c.name for c in self._started if not c.alive()]

    # --- the main loop: signals, watchdog, status, disk guard, cancels -----------------------------

    def _loop(self, done: Callable[[], bool]) -> None:
        next_beat = next_disk = next_status = next_heartbeat = 0.0
        unhealthy_logged = False
        while not done():
            if self.store.db.damage is not None:  # met by any thread: the daemon stops (exit 2)
                raise self.store.db.damage
            now = time.monotonic()
            try:
                if self.state_disk.check():
                    self._state_disk_changed()
                if self.requests.reload and not self.draining:
                    self.requests.reload = False
                    self._reload()
                if now >= next_disk:
                    next_disk = now + self.cfg.disk_guard.check_seconds
                    was_low = self.disk.low
                    if bool(self.disk.check()) != bool(was_low):
                        self._apply_hold()
                if now >= next_status:
                    next_status = now + STATUS_INTERVAL
                    self._wake_on_folders_back()
                    self.life.settle_requests()
                    self.outages.check()
                    self.systemd.status(self._status())
                    if self.remote or now >= next_heartbeat:  # the remote roster changes every second
                        next_heartbeat = now + HEARTBEAT_SECONDS
                        self._write_state()
            except Exception:
                log.exception("main loop step failed; trying again")
            interval = self.systemd.watchdog_interval
            if interval is not None and now >= next_beat:
                # A thread that died means the daemon no longer does its job: stay silent, get restarted.
                dead = self.dead_components()
                if not dead:
                    self.systemd.watchdog()
                    next_beat = now + interval
                elif not unhealthy_logged:
                    unhealthy_logged = True
                    log.error("a daemon thread died; withholding the watchdog ping so systemd restarts us",
                              components=dead)
            time.sleep(SIGNAL_POLL_SECONDS)

    def _note_outage(self, event: TaskFailed) -> None:
        if event.problem.kind is Kind.OUTAGE:
            self._folder_waiters = True

    def _wake_on_folders_back(self) -> None:
        """Tasks waiting for work/ or outputs/ go at once when it can be written again, not at their backoff."""
        if not self._folder_waiters:
            return
        woken = wake_folder_waiters(self.cfg, self.store, time.time())
        self._folder_waiters = woken is not None
        if woken:
            log.info("writable again; the tasks waiting for it go on", folders=woken)
            self._wake_generation()

    def _drain(self) -> None:
        """Stop taking work; let running tasks finish and finished videos be delivered within
        shutdown.drain_seconds (a second signal cuts it short). Whatever still runs afterwards is
        checkpointed back to the queue by pool.stop()."""
        self.draining = True
        self.pool.drain()
        if self.remote:
            self.remote.drain()
        self._apply_hold()
        budget = self.cfg.shutdown.drain_seconds
        deadline = time.monotonic() + budget
        # Stretches systemd's stop timeout when drain_seconds outgrew TimeoutStopSec in the unit.
        self.systemd.stopping(budget + STOP_MARGIN_SECONDS)
        if self._generating():
            log.info("draining: taking no new work, letting running tasks finish", drain_seconds=budget,
                     running=self._running())
            self._loop(lambda: not self._generating() or time.monotonic() >= deadline or self.requests.stops > 1)
        if self._generating():
            why = "second stop signal" if self.requests.stops > 1 else "drain time over"
            log.warning(f"{why}: running tasks go back to the queue", running=self._running())
        self._drain_delivery(deadline)

    def _drain_delivery(self, deadline: float) -> None:
        """Finished videos reach people before we exit, not at the next start: upload, links, zip, report and
        chat message of every batch that can be sent now, within what is left of the drain time."""
        if self.state_disk.full:
            log.warning("stopping while the state disk is full; videos still to deliver go out at the next start")
            return
        since = time.monotonic()

        def delivered() -> bool:
            handed_on = self.delivery.quiet_after(since)
            return handed_on is not None and self.chat.quiet_after(handed_on)

        self._loop(lambda: delivered() or time.monotonic() >= deadline or self.requests.stops > 1)
        if not delivered():
            log.warning("stopping before delivery caught up; videos still to deliver go out at the next start")

    def _state_disk_changed(self) -> None:
        self._apply_hold()
        if self.state_disk.full is None:
            self.intake.undo_cut_claims()
            self.outbox.enqueue_alert("state-disk-back", f"The state disk has room again ({self.state_disk.folder}):"
                                      " the daemon goes on by itself.")

    def _apply_hold(self) -> None:
        if self.draining or self.disk.low or self.state_disk.full:
            self.intake.hold.set()
        else:
            self.intake.hold.clear()
            self.intake.wake.set()
        # Slots: held for the drain, or while nothing they do could be recorded.
        if self.draining or self.state_disk.full:
            self.pool.hold.set()
        else:
            self.pool.hold.clear()
            self._wake_generation()
        self._write_state()

    def _write_state(self) -> None:
        remote = {"remote": {**self.remote.broker(), "workers": self.remote.describe()}} if self.remote else {}
        write_state(self.cfg.folder("state"), draining=self.draining, disk_low=self.disk.low,
                    state_full=self.state_disk.full, devices=self.cfg.workers.devices, **remote)

    def _status(self) -> str:
        counts = self.store.tasks.counts()
        parts = [f"{counts.get('queued', 0)} queued, {counts.get('running', 0)} running"]
        parts += [f"{d['device']}: {d['task'] or 'idle'}" for d in self.pool.describe()]
        if self.remote:
            parts += [f"{q} (remote): {n} in flight" for q, n in self.remote.broker()["in_flight"].items()]
            if self.remote.broker_down_since is not None:
                parts.append(f"{self.remote.broker()['broker']} unreachable")
            parts += [f"{o['tasks']} remote video(s) wait for {o['dependency']}"
                      for o in self.remote.broker()["downloads_waiting"]]
        if self.disk.low:
            parts.append(self.disk.low)
        if self.state_disk.full:
            parts.append(self.state_disk.full)
        if self.draining:
            parts.append("draining for shutdown")
        return " | ".join(parts)

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
        self.life.cfg = cfg
        for component in self.components:
            component.apply(cfg)
        self.disk.cfg = cfg
        set_level(cfg.logging.level)
        self._apply_hold()
        log.info("config reloaded", applied=plan.live, need_restart=plan.restart)
        if plan.restart:
            log.warning("changed keys that take effect only after a restart (systemctl restart heygem-daemon)",
                        keys=plan.restart)
        self.systemd.reloaded()


def _remote(cfg: Config, life: LifeCycle) -> "RemoteDispatcher | None":
    if cfg.workers.remote is None:
        return None
    # Celery comes with the `remote` extra: a daemon with local devices only does not need it.
    from heygem_daemon.generation.remote import RemoteDispatcher

    return RemoteDispatcher(cfg, life)


def run_daemon(cfg: Config, config_path: Path | None = None, requests: Requests | None = None) -> int:
    """Run until stopped. `requests` carries the signals recorded since the handlers were installed."""
    setup_logging(cfg.folder("logs"), cfg.logging.level, cfg.logging.console, cfg.logging.console_stream)
    check_engines(cfg)
    lock = acquire_lock(cfg.folder("state"))
    daemon: Daemon | None = None
    requests = requests or Requests()
    try:
        if not wait_for_room(cfg.folder("state"), lambda: requests.stops > 0,
                             lambda k, t: alert_now(cfg.notify, k, t), sdnotify.Notifier()):
            return 0  # stopped while waiting for room: nothing had started
        daemon = Daemon(cfg, config_path, requests)
        return daemon.run()
    except DatabaseDamaged as exc:  # at start or found later by any thread: one line, exit 2 (cli)
        when = "stopping" if daemon is not None and daemon.ready else "cannot start"
        log.error(f"{when}: the state database is damaged", error=str(exc))
        raise
    finally:
        lock.close()
