"""The sd_notify protocol, spoken directly: one datagram per message to the socket in $NOTIFY_SOCKET.

Without NOTIFY_SOCKET (a plain run, tests) every call is a no-op, so callers never need to check.
"""

from __future__ import annotations

import os
import socket
import time

from heygem_daemon.log import get_logger

log = get_logger("heygem.sdnotify")
# systemd stops reading a STATUS= line at some length; keep it short enough to show in `systemctl status`.
MAX_STATUS = 400


class Notifier:
    def __init__(self, environ: dict[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        addr = env.get("NOTIFY_SOCKET", "")
        # An abstract socket is written with a leading "@" and addressed with a leading NUL byte.
        self._addr = "\0" + addr[1:] if addr.startswith("@") else addr
        self._sock: socket.socket | None = None
        if self._addr:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self.watchdog_interval = _watchdog_interval(env)
        self._last_status = ""

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def send(self, *fields: str) -> None:
        if self._sock is None:
            return
        try:
            self._sock.sendto("\n".join(fields).encode(), self._addr)
        except OSError as exc:
            # systemd going away must not take the daemon with it.
            log.warning("cannot reach systemd's notify socket", error=exc.strerror)

    def ready(self, status: str) -> None:
        self._last_status = status
        self.send("READY=1", f"STATUS={status[:MAX_STATUS]}", f"MAINPID={os.getpid()}")

    def status(self, status: str) -> None:
        if status != self._last_status:
            self._last_status = status
            self.send(f"STATUS={status[:MAX_STATUS]}")

    def watchdog(self) -> None:
        self.send("WATCHDOG=1")

    def stopping(self, extend_seconds: float) -> None:
        self.send("STOPPING=1", _extend(extend_seconds))

    def reloading(self) -> None:
        self.send("RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")

    def reloaded(self) -> None:
        self.send("READY=1")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _extend(seconds: float) -> str:
    return f"EXTEND_TIMEOUT_USEC={int(max(seconds, 1.0) * 1_000_000)}"


def _watchdog_interval(env: dict[str, str] | os._Environ[str]) -> float | None:
    """Seconds between WATCHDOG=1 pings (half the timeout systemd gave us), or None when not watched."""
    usec = env.get("WATCHDOG_USEC", "")
    pid = env.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    if pid and pid != str(os.getpid()):
        return None  # the watchdog is meant for another process (we were started by a wrapper)
    return int(usec) / 2_000_000
