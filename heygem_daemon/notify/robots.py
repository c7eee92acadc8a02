"""Our own sender for the chat robots that give their verdict in the body of an HTTP 200 answer (DingTalk,
WeCom, Feishu, Lark).

apprise checks only the HTTP status for these (and sends DingTalk's `sign` URL-encoded twice), so a
message the service refused was recorded as sent. apprise still parses the URL (the same parser decides
the host for `notify.job_targets`); this module builds the request as the service documents it, reads the
answer, and says: delivered, retry later (busy, rate limit, no answer), or refused for good.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from dataclasses import dataclass
from typing import Any, Callable, Literal

import apprise
import requests
from apprise.plugins.dingtalk import NotifyDingTalk
from apprise.plugins.feishu import NotifyFeishu
from apprise.plugins.lark import NotifyLark
from apprise.plugins.wecombot import NotifyWeComBot

from heygem_daemon.notify.messages import Message

Outcome = Literal["delivered", "retry", "refused"]
TIMEOUT = (4.0, 10.0)  # connect, read: as apprise's defaults
FEISHU_BODY_BYTES = 20_000
"""Feishu and Lark refuse a request body over 20 KB; we count 20,000 bytes, the stricter reading."""
FEISHU_ENVELOPE_BYTES = 600
"""The card or text JSON around the message text, with room to spare."""


@dataclass(frozen=True)
class Answer:
    outcome: Outcome
    detail: str = ""
    """What the service said (code and message), for the log, `status` and the operator alert."""


@dataclass(frozen=True)
class Request:
    url: str
    params: dict[str, str]
    payload: dict[str, Any]


@dataclass(frozen=True)
class Robot:
    """One service: what it accepts, how fast, how to ask, and which of its codes mean "later"."""

    plugin: type[apprise.plugins.NotifyBase]
    body_max: int
    unit: str
    """How body_max is counted (messages.Limits.unit)."""
    pace: tuple[tuple[int, float], ...]
    """At most N messages per S seconds, per robot."""
    request: Callable[[Any, Message], Request]
    code_fields: tuple[str, ...]
    """The answer's result code: 0 = taken. The first one present counts."""
    retry_codes: frozenset[int]


def dingtalk_sign(secret: str, timestamp_ms: str) -> str:
    """DingTalk's signature for a robot with "sign" security: base64(HMAC-SHA256(secret, "{ts}\\n{secret}")).
    Returned raw: the HTTP client URL-encodes it once, as DingTalk decodes it once."""
    digest = hmac.new(secret.encode(), f"{timestamp_ms}\n{secret}".encode(), hashlib.sha256).digest()
    return base64.b64encode(digest).decode()


def _titled(message: Message) -> str:
    return f"{message.title}\n{message.body}" if message.title else message.body


def _dingtalk(plugin: NotifyDingTalk, message: Message) -> Request:
    params = {"access_token": plugin.token}
    if plugin.secret:
        timestamp = str(int(time.time() * 1000))
        params |= {"timestamp": timestamp, "sign": dingtalk_sign(plugin.secret, timestamp)}
    payload: dict[str, Any] = {"at": {"atMobiles": plugin.targets, "isAtAll": False}}
    if message.body_format == "markdown":
        # markdown.title is only the preview line: the title is repeated as a heading in the text.
        text = f"# {message.title}\n{message.body}" if message.title else message.body
        payload |= {"msgtype": "markdown", "markdown": {"title": message.title or plugin.app_desc, "text": text}}
    else:
        payload |= {"msgtype": "text", "text": {"content": _titled(message)}}
    return Request("https://oapi.dingtalk.com/robot/send", params, payload)


def _wecom(plugin: NotifyWeComBot, message: Message) -> Request:
    return Request("https://qyapi.weixin.qq.com/cgi-bin/webhook/send", {"key": plugin.key},
                   {"msgtype": "text", "text": {"content": _titled(message)}})


def _card(plugin: NotifyFeishu | NotifyLark, message: Message) -> dict[str, Any]:
    if message.body_format != "markdown":
        return {"msg_type": "text", "content": {"text": _titled(message)}}
    colors = plugin.card_colors
    return {"msg_type": "interactive", "card": {
        "config": {"wide_screen_mode": True},
        "header": {"title": {"tag": "plain_text", "content": message.title or plugin.app_desc},
                   "template": colors.get(apprise.NotifyType(message.kind), colors[apprise.NotifyType.INFO])},
        "elements": [{"tag": "div", "text": {"tag": "lark_md", "content": message.body}}]}}


def _feishu(plugin: NotifyFeishu, message: Message) -> Request:
    return Request(f"https://open.feishu.cn/open-apis/bot/v2/hook/{plugin.token}", {}, _card(plugin, message))


def _lark(plugin: NotifyLark, message: Message) -> Request:
    return Request(f"https://open.larksuite.com/open-apis/bot/v2/hook/{plugin.token}", {}, _card(plugin, message))


# Codes from the services' robot documentation. Everything else non-zero is a refusal (bad sign 310000,
# too long 40058 / 460101, bad token 300001 / 93000, bad request 9499 ...): sending it again changes nothing.
_ROBOTS = (
    # DingTalk: 20 messages a minute per robot (130101 "send too fast"), -1 "system busy".
    Robot(NotifyDingTalk, 20_000, "utf8", ((20, 60.0),), _dingtalk, ("errcode",), frozenset({-1, 130101})),
    # WeCom: text up to 2,048 UTF-8 bytes, 20 messages a minute (45009), -1 "system busy".
    Robot(NotifyWeComBot, 2_048, "utf8", ((20, 60.0),), _wecom, ("errcode",), frozenset({-1, 45009, 45033})),
    # Feishu / Lark: request body up to 20 KB, 100 a minute and 5 a second (11232), per chat (230020);
    # older answers carry StatusCode instead of code.
    Robot(NotifyFeishu, FEISHU_BODY_BYTES - FEISHU_ENVELOPE_BYTES, "json", ((100, 60.0), (5, 1.0)), _feishu,
          ("code", "StatusCode"), frozenset({11232, 230020})),
    Robot(NotifyLark, FEISHU_BODY_BYTES - FEISHU_ENVELOPE_BYTES, "json", ((100, 60.0), (5, 1.0)), _lark,
          ("code", "StatusCode"), frozenset({11232, 230020})),
)


def robot_for(plugin: apprise.plugins.NotifyBase) -> Robot | None:
    """Our sender for this apprise plugin's service, or None: apprise sends it (it reads that answer itself)."""
    return next((r for r in _ROBOTS if isinstance(plugin, r.plugin)), None)


def read_answer(robot: Robot, status: int, body: bytes) -> Answer:
    """The service's verdict: HTTP status first, then the result code in the JSON body."""
    if status == 429 or status >= 500:
        return Answer("retry", f"HTTP {status}")
    if status != 200:
        return Answer("refused", f"HTTP {status}")
    try:
        doc = json.loads(body)
    except ValueError:
        doc = None
    if not isinstance(doc, dict):
        return Answer("retry", "HTTP 200 without the service's JSON answer")
    field = next((f for f in robot.code_fields if f in doc), None)
    if field is None:
        return Answer("retry", f"HTTP 200 without {' or '.join(robot.code_fields)} in the answer")
    code = doc[field]
    if code == 0:
        return Answer("delivered")
    said = next((str(doc[k]) for k in ("errmsg", "msg", "StatusMessage") if doc.get(k)), "")
    detail = f"{field} {code}" + (f": {said}" if said else "")
    return Answer("retry" if code in robot.retry_codes else "refused", detail)


def post(robot: Robot, plugin: apprise.plugins.NotifyBase, message: Message) -> Answer:
    req = robot.request(plugin, message)
    try:
        r = requests.post(req.url, params=req.params, timeout=TIMEOUT, allow_redirects=False,
                          data=json.dumps(req.payload, ensure_ascii=False).encode(),
                          headers={"Content-Type": "application/json; charset=utf-8", "User-Agent": plugin.app_id})
    except requests.RequestException as exc:  # its text holds the URL, and so the token: the class only
        return Answer("retry", f"no answer ({type(exc).__name__})")
    return read_answer(robot, r.status_code, r.content)
