"""Stop and reload requests from signals, recorded from the first moment of `run` (cli installs the
handlers before anything heavy is imported), so a SIGTERM during start-up is an early, clean stop (exit 0)
instead of Python's default death by signal (143). The daemon reads the requests from its main loop."""

from __future__ import annotations

import signal
from dataclasses import dataclass
from typing import Any


@dataclass
class Requests:
    # Plain assignments only: a handler must never take a lock.
    stops: int = 0
    reload: bool = False

    def stop(self, *_: Any) -> None:
        self.stops += 1

    def request_reload(self, *_: Any) -> None:
        self.reload = True


REQUESTS = Requests()


def install() -> Requests:
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, REQUESTS.stop)
    signal.signal(signal.SIGHUP, REQUESTS.request_reload)
    return REQUESTS
