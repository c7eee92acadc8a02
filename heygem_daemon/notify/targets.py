"""Chat targets: apprise URLs, what each service accepts (length, markdown), and sending one message.

An apprise URL holds the service's token, so it never leaves memory: the store and the logs name a target
by `target_id` (a digest) and `label` (the service's name) only.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import apprise

from heygem_daemon.config import ConfigError, Notify
from heygem_daemon.notify.messages import Limits, Message
from heygem_daemon.log import redact_text

MAX_ERROR_CHARS = 500

# apprise logs URLs, hosts and payloads on its own; none of it may reach the daemon's log handlers.
_apprise_log = logging.getLogger("apprise")
_apprise_log.propagate = False
_apprise_log.addHandler(logging.NullHandler())


@dataclass(frozen=True)
class Target:
    url: str
    plugin: apprise.plugins.NotifyBase

    @property
    def id(self) -> str:
        return target_id(self.url)

    @property
    def label(self) -> str:
        return f"{self.plugin.service_name} #{self.id[:8]}"

    def limits(self) -> Limits:
        p = self.plugin
        markdown = p.resolve_format(apprise.NotifyFormat.MARKDOWN) is apprise.NotifyFormat.MARKDOWN
        # Services without a title field (or that count it against the body) get the title in the body.
        title_in_body = p.title_maxlen <= 0 or bool(getattr(p, "overflow_amalgamate_title", False))
        return Limits(p.body_maxlen, p.title_maxlen, markdown, title_in_body)


def target_id(url: str) -> str:
    return hashlib.sha256(url.encode()).hexdigest()[:16]


def parse_target(url: str) -> Target | None:
    """The apprise plugin for a URL, or None when apprise does not understand it."""
    plugin = apprise.Apprise.instantiate(url)
    return Target(url, plugin) if plugin is not None else None


def read_urls_file(path: Path) -> list[str]:
    """One URL per line; blank lines and # comments skipped. `${CREDENTIALS_DIRECTORY}` is expanded so a
    systemd credential (LoadCredential=) can hold the tokens."""
    resolved = Path(os.path.expandvars(str(path)))
    try:
        text = resolved.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"notify.urls_file: cannot read {resolved} ({exc.strerror}); "
                          "check the path and that the daemon's user may read it") from None
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def configured_urls(cfg: Notify) -> list[str]:
    """notify.urls plus the lines of notify.urls_file, in that order, without repeats."""
    urls = list(cfg.urls) + (read_urls_file(cfg.urls_file) if cfg.urls_file else [])
    return list(dict.fromkeys(urls))


def operator_urls(cfg: Notify) -> list[str]:
    return list(cfg.operator_urls) if cfg.operator_urls is not None else configured_urls(cfg)


def send(target: Target, message: Message) -> str | None:
    """Deliver one message; None when the service took it, else what went wrong (secrets masked)."""
    client = apprise.Apprise()
    client.add(target.plugin)
    with apprise.LogCapture(level=logging.WARNING) as captured:
        try:
            ok = client.notify(body=message.body, title=message.title,
                               notify_type=apprise.NotifyType(message.kind),
                               body_format=apprise.NotifyFormat(message.body_format))
        except Exception as exc:  # a plugin bug must not stop the sender thread
            ok = False
            logging.getLogger("apprise").warning("%s: %s", type(exc).__name__, exc)
    if ok:
        return None
    lines = [ln.split(" - ", 2)[-1] for ln in captured.getvalue().splitlines() if ln.strip()]
    detail = "; ".join(lines) or "the service refused the message"
    return redact_text(_mask(detail, target.url))[:MAX_ERROR_CHARS]


def _mask(text: str, url: str) -> str:
    """apprise messages may quote parts of the URL (host, user, token path): each one is masked. Short
    pieces (ports, `p`) are left alone, or ordinary words in the message would be masked too."""
    pieces = {p for p in re.split(r"[/:@?&=#.]+", url.split("://", 1)[-1]) if len(p) >= 6}
    pieces.add(url.split("://", 1)[-1].split("/", 1)[0].rsplit("@", 1)[-1].split(":", 1)[0])
    for piece in sorted(pieces, key=len, reverse=True):
        text = text.replace(piece, "***")
    return text
