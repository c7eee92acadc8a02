"""structlog set-up: JSON lines under logs/, a readable console, and no secret ever written."""

from __future__ import annotations

import logging
import logging.handlers
import os
import re
import sys
import threading
from pathlib import Path
from collections.abc import MutableMapping
from typing import Any

import structlog

LOG_FILE = "heygem.log"
_SECRET_KEY = re.compile(r"(secret|password|passwd|token|credential|access_key|api_key|signature)", re.I)
# Credentials embedded in URLs (https://user:pass@host, ?token=...) are masked wherever they appear.
_URL_USERINFO = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)[^/@\s:]+:[^/@\s]+@", re.I)
_QUERY_SECRET = re.compile(
    r"(?P<k>[?&](?:access_?token|token|secret|key|sign|signature|X-Amz-Signature)=)[^&\s]+", re.I)
REDACTED = "***"
# syslog priorities by stdlib level, for the "<N>" prefix journald reads off each line of a stream.
_PRIORITIES = ((logging.CRITICAL, 2), (logging.ERROR, 3), (logging.WARNING, 4), (logging.INFO, 6))


class Reported(Exception):
    """An error the daemon reports once by itself, as a change of its state (a damaged database, a full state
    disk): the many threads that run into it while it lasts stay quiet instead of logging a traceback each."""


def drop_reported(_logger: Any, _name: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    exc = event.get("exc_info")
    if exc is True:
        exc = sys.exc_info()[1]
    elif isinstance(exc, tuple):
        exc = exc[1]
    if isinstance(exc, Reported):
        raise structlog.DropEvent
    return event


def redact_text(text: str) -> str:
    text = _URL_USERINFO.sub(lambda m: f"{m['scheme']}{REDACTED}@", text)
    return _QUERY_SECRET.sub(lambda m: f"{m['k']}{REDACTED}", text)


def _redact(value: Any) -> Any:
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, dict):
        return {k: REDACTED if _SECRET_KEY.search(str(k)) else _redact(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_redact(v) for v in value]
    return value


def redact_secrets(_logger: Any, _name: str, event: dict[str, Any]) -> dict[str, Any]:
    return _redact(event)


def setup_logging(logs_dir: Path | None, level: str = "info", console: bool = True,
                  console_stream: str = "stderr") -> None:
    """Route structlog and stdlib logging to a JSON file (when logs_dir) and a console renderer on
    console_stream ("stderr", or "stdout" as containers want it)."""
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        redact_secrets,
    ]
    structlog.configure(
        processors=[drop_reported, *shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
        h.close()
    if logs_dir is not None:
        # WatchedFileHandler reopens the file when logrotate moves it away.
        fh = logging.handlers.WatchedFileHandler(logs_dir / LOG_FILE, encoding="utf-8")
        fh.setFormatter(_formatter(shared, structlog.processors.JSONRenderer()))
        root.addHandler(fh)
    if console:
        stream = sys.stdout if console_stream == "stdout" else sys.stderr
        ch = logging.StreamHandler(stream)
        journal = is_journal(stream)
        ch.setFormatter(_formatter(shared, structlog.dev.ConsoleRenderer(colors=False), journal))
        root.addHandler(ch)
    set_level(level)
    threading.excepthook = _log_thread_death


def _log_thread_death(args: threading.ExceptHookArgs) -> None:
    """A thread that dies must say so in heygem.log, not only on stderr (which systemd may not keep)."""
    get_logger("heygem").error("a thread died", thread=args.thread.name if args.thread else None,
                               exc_info=(args.exc_type, args.exc_value, args.exc_traceback))


def set_level(level: str) -> None:
    """Also what SIGHUP calls when logging.level changes."""
    root = logging.getLogger()
    root.setLevel(level.upper())
    for noisy in ("watchdog", "PIL", "libav", "botocore", "urllib3", "apscheduler", "tzlocal"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))


def is_journal(stream: Any) -> bool:
    """systemd sets JOURNAL_STREAM=<dev>:<inode> of the stream it connected; it counts only while our stream
    is still that one (not when our output was redirected elsewhere by a child or a shell)."""
    try:
        dev, ino = (int(x) for x in os.environ.get("JOURNAL_STREAM", "").split(":"))
        st = os.fstat(stream.fileno())
    except (ValueError, OSError, AttributeError):
        return False
    return (st.st_dev, st.st_ino) == (dev, ino)


def syslog_priority(levelno: int) -> int:
    return next((prio for level, prio in _PRIORITIES if levelno >= level), 7)


class _JournalFormatter(structlog.stdlib.ProcessorFormatter):
    """Every line carries its priority, so `journalctl -p warning` shows warnings (a traceback included)."""

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{syslog_priority(record.levelno)}>"
        return "\n".join(prefix + line for line in super().format(record).splitlines())


def _formatter(shared: list[Any], renderer: Any, journal: bool = False) -> logging.Formatter:
    cls = _JournalFormatter if journal else structlog.stdlib.ProcessorFormatter
    return cls(
        foreign_pre_chain=shared,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            renderer,
        ],
    )


def get_logger(name: str = "heygem") -> Any:
    return structlog.get_logger(name)
