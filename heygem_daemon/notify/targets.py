"""Chat targets: apprise URLs, what each service accepts (length, markdown), and sending one message —
through our own sender (`robots`) for the services that answer in the body, through apprise otherwise.

An apprise URL holds the service's token, so it never leaves memory: the store and the logs name a target
by `target_id` (a digest) and `label` (the service's name) only.

Targets named in a job.yaml come from whoever can write to the inbox, so they pass `notify.job_targets`
first: otherwise a dropped folder could make the daemon send requests to any host it reaches.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

import apprise

from heygem_daemon.config import ConfigError, Notify
from heygem_daemon.notify.messages import Limits, Message
from heygem_daemon.notify.robots import Answer, Robot, post, robot_for
from heygem_daemon.intake.pairing import manifest_notify
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
    robot: Robot | None = None

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
        if self.robot is not None:  # the limit as the service itself counts it
            return Limits(self.robot.body_max, p.title_maxlen, markdown, title_in_body, self.robot.unit)
        return Limits(p.body_maxlen, p.title_maxlen, markdown, title_in_body)


def target_id(url: str) -> str:
    return hashlib.sha256(url.encode()).hexdigest()[:16]


def parse_target(url: str) -> Target | None:
    """The apprise plugin for a URL, or None when apprise does not understand it."""
    plugin = apprise.Apprise.instantiate(url)
    return Target(url, plugin, robot_for(plugin)) if plugin is not None else None


JobTargetPolicy = Literal["off"] | list[str]
_REFUSED_HINT = "ask the operator to allow it in notify.job_targets, or remove it from job.yaml"


@dataclass(frozen=True)
class Screened:
    """A job's own chat targets after `notify.job_targets`."""

    ids: list[str] | None
    """Digests of the targets the job may use ([] = send nothing); None = the configured targets."""
    refused: list[dict[str, str]] = field(default_factory=list)
    """One problem (file, reason, hint) per refused target, naming it by scheme and digest only."""


def _host_port(url: str) -> tuple[str, int | None] | None:
    """Where apprise would connect for this URL (its own parser, so no parsing differential), or None."""
    target = parse_target(url)
    if target is None:
        return None
    host = str(getattr(target.plugin, "host", "") or "").lower().strip("[]")
    return host, getattr(target.plugin, "port", None)


def refusal(url: str, policy: JobTargetPolicy) -> str | None:
    """None when `policy` lets a job.yaml send to `url`, else why not (without the URL's secrets)."""
    if policy == "off":
        return "per-job chat targets are turned off (notify.job_targets: off)"
    scheme = url.split("://", 1)[0].lower()
    entries = [urlsplit(e) for e in policy if e.split("://", 1)[0] == scheme]
    if not entries:
        return f"{scheme}:// is not allowed in notify.job_targets"
    if any(not e.netloc for e in entries):
        return None  # the scheme alone is listed: a service whose host is fixed (slack, discord ...)
    where = _host_port(url)
    if where is None:
        return f"{scheme}:// URL is not one apprise understands"
    if any(e.hostname == where[0] and e.port in (None, where[1]) for e in entries):
        return None
    return f"host {where[0]} is not allowed for {scheme}:// in notify.job_targets"


def target_label(url: str) -> str:
    """How a per-job target is named in records and messages: its scheme and digest, never its token."""
    return f"{url.split('://', 1)[0].lower()}:// #{target_id(url)[:8]}"


def screen_job_targets(urls: list[str] | None, policy: JobTargetPolicy) -> Screened:
    """Keep the job.yaml targets `policy` allows. Sending nothing (`notify: false`) is always allowed; when
    every listed target is refused, the configured targets carry the job's messages (and the refusal)."""
    if urls is None:
        return Screened(None)
    allowed, refused = [], []
    for i, url in enumerate(urls, 1):
        why = refusal(url, policy)
        if why is None:
            allowed.append(target_id(url))
        else:
            refused.append({"file": "job.yaml", "reason": f"notify entry {i} ({target_label(url)}) not used: {why}",
                            "hint": _REFUSED_HINT})
    return Screened(allowed if allowed or not urls else None, refused)


def job_target_urls(job_folder: Path, ids: list[str], policy: JobTargetPolicy) -> list[str]:
    """The URLs behind a job's target digests, read again from the job.yaml kept with its inputs (the store
    holds digests only). Checked against the policy again: it may have been narrowed since."""
    wanted = set(ids)
    return [u for u in dict.fromkeys(manifest_notify(job_folder))
            if target_id(u) in wanted and refusal(u, policy) is None]


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


def send(target: Target, message: Message) -> Answer:
    """Deliver one message: delivered only when the service's own answer says so; otherwise whether to try
    again later or not at all, and what the service said (secrets masked)."""
    answer = post(target.robot, target.plugin, message) if target.robot else _send_apprise(target, message)
    if answer.outcome == "delivered":
        return answer
    detail = redact_text(_mask(answer.detail or "the service refused the message", target.url))
    return Answer(answer.outcome, detail[:MAX_ERROR_CHARS])


_HTTP_ERROR = re.compile(r"error=(\d{3})\b")
_TRY_AGAIN = {408, 425, 429}


def _send_apprise(target: Target, message: Message) -> Answer:
    """Services whose answer apprise reads itself (Slack's "ok", Telegram's "ok": true, a webhook's 2xx).
    apprise says only yes or no; the HTTP status in its warning tells a refusal (4xx) from a failure."""
    client = apprise.Apprise()
    client.add(target.plugin)
    with apprise.LogCapture(level=logging.WARNING) as captured:
        try:
            ok = bool(client.notify(body=message.body, title=message.title,
                               notify_type=apprise.NotifyType(message.kind),
                               body_format=apprise.NotifyFormat(message.body_format)))
        except Exception as exc:  # a plugin bug must not stop the sender thread
            ok = False
            logging.getLogger("apprise").warning("%s: %s", type(exc).__name__, exc)
    if ok:
        return Answer("delivered")
    lines = [ln.split(" - ", 2)[-1] for ln in captured.getvalue().splitlines() if ln.strip()]
    detail = "; ".join(lines)
    codes = [int(c) for c in _HTTP_ERROR.findall(detail)]
    refused = bool(codes) and all(400 <= c < 500 and c not in _TRY_AGAIN for c in codes)
    return Answer("refused" if refused else "retry", detail)


def _mask(text: str, url: str) -> str:
    """apprise messages may quote parts of the URL (host, user, token path): each one is masked. Short
    pieces (ports, `p`) are left alone, or ordinary words in the message would be masked too."""
    pieces = {p for p in re.split(r"[/:@?&=#.]+", url.split("://", 1)[-1]) if len(p) >= 6}
    pieces.add(url.split("://", 1)[-1].split("/", 1)[0].rsplit("@", 1)[-1].split(":", 1)[0])
    for piece in sorted(pieces, key=len, reverse=True):
        text = text.replace(piece, "***")
    return text
