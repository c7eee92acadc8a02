#!/usr/bin/env python3
"""Chat delivery: how long after a robot has answered "taken" the outbox records the message as sent — the
window in which a SIGKILL makes the next start send it again (README: at-least-once).

The same WeCom stand-in (tests/robot_receiver.py, behind its HTTPS proxy), the same outbox and sender thread
code; the message goes out through our robot sender (`robots.py`, this tree) or through apprise's WeCom plugin
(what the daemon used before), in alternating rounds. The window is the row's `sent_at` minus the moment the
stand-in gave its verdict (its answer is written right after). Each round uses a new robot key, 15 messages,
under the robot's 20 a minute.
Usage: .venv/bin/python bench/notify_window.py [--rounds 6]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path
from unittest import mock

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))
from robot_receiver import RobotServers  # noqa: E402

from heygem_daemon.config import Config  # noqa: E402
from heygem_daemon.log import setup_logging  # noqa: E402
from heygem_daemon.notify import outbox as outbox_module  # noqa: E402
from heygem_daemon.notify.outbox import Notifier, Outbox  # noqa: E402
from heygem_daemon.notify.targets import Target, parse_target  # noqa: E402
from heygem_daemon.state import Store  # noqa: E402

PER_ROUND = 15


def through_apprise(url: str) -> Target | None:
    target = parse_target(url)
    return Target(target.url, target.plugin, None) if target else None


def round_windows(folder: Path, servers: RobotServers, key: str, apprise_path: bool) -> list[float]:
    servers.add("wecom", key)
    store = Store(folder / f"{key}.db")
    outbox = Outbox(Config.model_validate({"notify": {"urls": [f"wecombot://{key}"]}}), store)
    for i in range(PER_ROUND):
        outbox.enqueue_alert(f"bench-{i}", f"message {i}")
    with mock.patch.object(outbox_module, "parse_target", through_apprise if apprise_path else parse_target):
        Notifier(outbox).send_due()
    answered = {r.text.split("\n", 1)[1]: r.at for r in servers.taken("wecom") if r.robot == key}
    rows = [n for n in store.outbox.select() if n.state == "sent"]
    store.close()
    assert len(rows) == PER_ROUND == len(answered), (len(rows), len(answered))
    return [(n.sent_at - answered[n.body]) * 1000 for n in rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args()
    setup_logging(None, "warning")  # not a line per message
    with tempfile.TemporaryDirectory() as tmp:
        servers = RobotServers(Path(tmp) / "tls").start()
        os.environ.update(servers.env())
        windows: dict[str, list[float]] = {"ours": [], "apprise": []}
        for r in range(args.rounds):
            for name in ("apprise", "ours") if r % 2 else ("ours", "apprise"):
                windows[name] += round_windows(Path(tmp), servers, f"bench{name}{r}", name == "apprise")
        servers.stop()
    for name, w in windows.items():
        print(f"{name:8} n={len(w):3}  median {statistics.median(w):6.2f} ms  p95 "
              f"{statistics.quantiles(w, n=20)[-1]:6.2f} ms  max {max(w):6.2f} ms")
    ratio = statistics.median(windows["ours"]) / statistics.median(windows["apprise"])
    print(f"median window, ours / apprise: {ratio:.2f}x")


if __name__ == "__main__":
    main()
