"""The intake component: the inbox observer (watchdog) and the intake thread that owns all intake state."""

from __future__ import annotations

import threading
from typing import Any

from heygem_daemon.config import Config
from heygem_daemon.fs.watcher import start_watcher
from heygem_daemon.intake.intake import Intake


class IntakeService:
    name = "intake"

    def __init__(self, cfg: Config, intake: Intake) -> None:
        self.cfg = cfg
        self.intake = intake
        self.mode = ""
        self._stop = threading.Event()
        self._observer: Any = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._observer, self.mode = start_watcher(self.cfg.folder("inbox"), self.cfg.watcher.mode,
                                                  self.cfg.watcher.poll_interval, self.intake.touch,
                                                  writes=self.intake.writes)
        self._thread = threading.Thread(target=self.intake.run, args=(self._stop,), name="intake", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self.intake.wake.set()
        if self._observer is not None:
            self._observer.stop()
        if self._thread is not None:
            self._thread.join(10)
        if self._observer is not None:
            self._observer.join(5)

    def alive(self) -> bool:
        return all(t is not None and t.is_alive() for t in (self._thread, self._observer))

    def apply(self, cfg: Config) -> None:
        self.cfg = cfg
        self.intake.set_config(cfg)
