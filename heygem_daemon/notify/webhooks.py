"""Webhooks: the events of a job handed over by an API token, POSTed to that token's callback URL, signed.

Each event is one outbox row (kind `webhook`, target `webhook:<token>`) holding the body as it will be sent,
so a retry sends the same bytes under the same event id, and the outbox's retries, backoff and give-up
apply. The destination is checked where the connection is made: the host is resolved, every address that
is private, loopback, link-local, multicast or reserved is refused unless `web.webhook_allow` lists it, and
the connection goes to the address that was checked (no second lookup a rebinding DNS could answer).
Redirects are not followed.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import socket
import time
from typing import Any, Callable
from urllib.parse import urlsplit

import urllib3

from heygem_daemon.log import get_logger
from heygem_daemon.notify.outbox import Outbox
from heygem_daemon.notify.robots import Answer
from heygem_daemon.state import Job, NewNotification, Notification, Store, Webhook

log = get_logger("heygem.notify")
KIND = "webhook"
TARGET_PREFIX = "webhook:"
EVENTS = ("job.done", "job.failed", "video.done")
TIMEOUT = urllib3.Timeout(connect=4.0, read=10.0)
MAX_DETAIL = 300
_TRY_AGAIN = {408, 429}
Address = ipaddress.IPv4Address | ipaddress.IPv6Address


class Unreachable(Exception):
    """A callback this daemon will not connect to (the reason names the host, never the URL's path)."""


# --- signing --------------------------------------------------------------------------------------------

def signature(secrets: tuple[str, ...], timestamp: int, body: bytes) -> str:
    """`t=<unix>,v1=<hex>[,v1=<hex>]`: HMAC-SHA256 of `<t>.<body>` with each valid secret (two during a rotation)."""
    signed = str(timestamp).encode() + b"." + body
    macs = [hmac.new(s.encode(), signed, hashlib.sha256).hexdigest() for s in secrets]
    return ",".join([f"t={timestamp}", *(f"v1={m}" for m in macs)])


def event_id(row: Notification) -> str:
    """Stable across retries and restarts: the receiver's key for dropping a repeat."""
    return "evt_" + hashlib.sha256(f"{row.event_key}\n{row.target}".encode()).hexdigest()[:32]


def where(url: str) -> str:
    """How a callback is named in logs and listings: scheme and host, no path or query (they may hold a token)."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname}"


# --- the destination ------------------------------------------------------------------------------------

def _allowed(ip: Address, allow: list[str]) -> bool:
    for entry in allow:
        try:
            if ip in ipaddress.ip_network(entry, strict=False):
                return True
        except ValueError:
            continue  # a host name: matched by name in `destination`
    return False


def _public(ip: Address) -> bool:
    mapped = getattr(ip, "ipv4_mapped", None)
    ip = mapped or ip
    return ip.is_global and not ip.is_multicast


def destination(url: str, allow: list[str],
                resolve: Callable[[str, int], list[str]] | None = None) -> tuple[str, int, str]:
    """(host, port, address to connect to) for a callback URL, or Unreachable. A host named in `allow` may be any
    address; otherwise the first address that is public or inside an allowed network."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise Unreachable(f"callback {where(url)} is not an http(s) URL")
    host = parts.hostname.lower()
    port = parts.port or (443 if parts.scheme == "https" else 80)
    addresses = (resolve or _resolve)(host, port)
    if not addresses:
        raise Unreachable(f"callback host {host} has no address")
    by_name = host in {a.lower() for a in allow}
    for text in addresses:
        ip = ipaddress.ip_address(text.split("%", 1)[0])
        if by_name or _public(ip) or _allowed(ip, allow):
            return host, port, text
    raise Unreachable(f"callback host {host} resolves to {', '.join(addresses)}: a private, loopback, link-local, "
                      "multicast or reserved address (allow it in web.webhook_allow if it is meant)")


def _resolve(host: str, port: int) -> list[str]:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise ConnectionError(f"cannot resolve {host}: {exc.strerror}") from None
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


# --- sending --------------------------------------------------------------------------------------------

def post(hook: Webhook, row: Notification, allow: list[str], now: float | None = None) -> Answer:
    """One delivery: delivered on a 2xx; refused for good on another 4xx (but 408, 429), a redirect, or a
    destination that is not allowed; retry otherwise (5xx, 408, 429, no answer)."""
    body = row.body.encode()
    headers = {"Content-Type": "application/json", "User-Agent": "heygem-daemon-webhook/1",
               "X-Heygem-Event": row.title, "X-Heygem-Event-Id": event_id(row),
               "X-Heygem-Signature": signature(hook.secrets, int(now if now is not None else time.time()), body)}
    try:
        host, port, address = destination(hook.url, allow)
    except Unreachable as exc:
        return Answer("refused", str(exc))
    except ConnectionError as exc:
        return Answer("retry", str(exc))
    parts = urlsplit(hook.url)
    headers["Host"] = parts.netloc.rsplit("@", 1)[-1]
    pool: urllib3.HTTPConnectionPool
    if parts.scheme == "https":  # the certificate is checked against the URL's host, not the address
        pool = urllib3.HTTPSConnectionPool(address, port, timeout=TIMEOUT, retries=False, cert_reqs="CERT_REQUIRED",
                                           server_hostname=host, assert_hostname=host)
    else:
        pool = urllib3.HTTPConnectionPool(address, port, timeout=TIMEOUT, retries=False)
    path = parts.path or "/"
    try:
        with pool:
            answer = pool.urlopen("POST", path + (f"?{parts.query}" if parts.query else ""), body=body,
                                  headers=headers, redirect=False, retries=False)
    except urllib3.exceptions.HTTPError as exc:
        return Answer("retry", f"{where(hook.url)}: {type(exc).__name__}")
    status = answer.status
    if 200 <= status < 300:
        return Answer("delivered")
    said = answer.data[:MAX_DETAIL].decode("utf-8", "replace")
    detail = f"{where(hook.url)} answered HTTP {status}: {said}".strip()
    if 300 <= status < 400:
        return Answer("refused", f"{detail} (redirects are not followed; set the final URL as the callback)")
    refused = 400 <= status < 500 and status not in _TRY_AGAIN
    return Answer("refused" if refused else "retry", detail)


# --- enqueueing -----------------------------------------------------------------------------------------

class Webhooks:
    """Records a job's events for the token that handed it over, with the job resource as the body (`render`:
    the API's own serialiser, injected so this layer needs nothing of the web console)."""

    def __init__(self, outbox: Outbox, store: Store, render: Callable[[Job], dict[str, Any]]) -> None:
        self.outbox, self.store, self.render = outbox, store, render

    def job_ended(self, job: Job) -> int:
        """job.done or job.failed by the job's state; a later end after `retry` is a new event (more attempts)."""
        event = "job.failed" if job.state == "failed" else "job.done"
        return self.enqueue(event, job, str(self.store.tasks.attempt_count(job.id)))

    def enqueue(self, event: str, job: Job, key: str) -> int:
        """`key` tells repeats of one event apart from a new one (the attempt, the video's task id)."""
        # Called from the life cycle's events and delivery's hand-over: a problem here is logged, never raised.
        try:
            token = self.store.web.owner_token(job.name, job.created_at)
            if token is None or self.store.api.webhook(token, time.time()) is None:
                return 0
            body = json.dumps(self.render(job), separators=(",", ":"), sort_keys=True)
        except Exception:
            log.exception("could not record a webhook", webhook=event, job_id=job.id, job=job.name)
            return 0
        row = NewNotification(f"{KIND}:{event}:{job.id}:{key}", TARGET_PREFIX + token, KIND, job.id, event, body,
                              "json", "info")
        return self.outbox.record_rows([row])


def deliver(store: Store, row: Notification, allow: list[str]) -> Answer:
    """The outbox sender's call for a webhook row: the token's current callback and secrets, then `post`."""
    hook = store.api.webhook(row.target.removeprefix(TARGET_PREFIX), time.time())
    if hook is None:
        return Answer("refused", "the token is revoked or has no callback URL any more")
    return post(hook, row, allow)
