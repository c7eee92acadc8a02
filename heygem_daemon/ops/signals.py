"""Stop and reload requests from signals, recorded from the first moment of `run` (cli installs the
handlers before anything heavy is imported), so a SIGTERM during start-up is an early, clean stop (exit 0)
instead of Python's default death by signal (143). The daemon reads the requests from its main loop."""

from __future__ import annotations

import signal
from typing import Any


class Requests:
    """Plain assignments only: a handler must never take a lock. (No dataclass: importing `dataclasses`
    costs milliseconds of start-up during which a SIGTERM would still kill the process the default way.)"""

    def __init__(self, stops: int = 0, reload: bool = False) -> None:
        self.stops, self.reload = stops, reload

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
