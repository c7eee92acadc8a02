"""heygem-daemon: turn a shared inbox folder into an unattended lip-sync video production line."""

__version__ = "0.1.0"
