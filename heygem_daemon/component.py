"""What the daemon runs beside its main loop: each part is a Component, so service.py starts them in order,
counts every one for the systemd watchdog, hands each a reloaded config and stops them in reverse order."""

from __future__ import annotations

from typing import Protocol

from heygem_daemon.config import Config


class Component(Protocol):
    name: str

    def start(self) -> None:
        """Start its threads; returns once it is working."""

    def stop(self) -> None:
        """Stop and join its threads (bounded: each has its own timeout)."""

    def alive(self) -> bool:
        """False once one of its threads died: the daemon then withholds the watchdog ping."""

    def apply(self, cfg: Config) -> None:
        """A reloaded config (SIGHUP) with restart-only keys kept at their running values (ops.reload)."""
