"""Benchmark how soon a task waiting out a heygem outage goes once the service answers again: the real
daemon, one stand-in service (tests/heygem_standin.py) on 127.0.0.1, the default `poll_interval` (2 s) and
a backoff that grows to 600 s, as in the field.

Each round takes the service down, drops a pair, lets its task wait out a few outage attempts (so its
backoff has grown), brings the service back and measures the seconds from "up" to the job's submit. The
baseline, in the same round, is what the task still had to wait by its backoff (its `not_before`): what
it waited before the daemon probed down services. The goal is poll_interval + 1 s.

    .venv/bin/python bench/outage_wake.py              # 3 rounds
    .venv/bin/python bench/outage_wake.py --rounds 5
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # the rigs and media_factory live with the tests

from daemon_harness import DaemonHarness  # noqa: E402
from heygem_standin import Group, HeygemStandin  # noqa: E402
from media_factory import PORTRAIT_JPG, write_speech_wav  # noqa: E402

POLL_INTERVAL = 2.0


def one_round(daemon: DaemonHarness, service: HeygemStandin, voice: Path, n: int) -> tuple[float, float]:
    """(seconds from the service's return to the submit, seconds the backoff still had to run then)."""
    service.down()
    name = f"round{n}"
    daemon.drop_pair(voice, PORTRAIT_JPG, name)

    def waited_twice() -> bool:
        job = daemon.job(name)
        tasks = daemon.store().tasks.select(job.id) if job else []
        return bool(tasks) and tasks[0].state == "queued" and sum(
            a["outcome"] == "outage" for a in daemon.store().tasks.attempts(tasks[0].id)) >= 3

    daemon.wait_for(waited_twice, 120, "the task to wait out three outage attempts")
    (task,) = daemon.store().tasks.select(daemon.job(name).id)
    submits = len(service.group.events("submit"))
    service.up()
    back = time.time()
    left = task.not_before - back
    daemon.wait_for(lambda: len(service.group.events("submit")) > submits, 600, "the submit")
    sent = time.time()
    daemon.wait_job(name)
    return sent - back, left


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="bench-outage-"))
    service = HeygemStandin("a", scratch / "face2face", Group())
    voice = write_speech_wav(scratch / "voice.wav", 1.0)
    daemon = DaemonHarness(scratch / "daemon", {
        "engine": {"name": "heygem"},
        "engines": {"heygem": {"services": [service.url], "data_dir": str(service.data_dir),
                               "poll_interval": POLL_INTERVAL, "busy_retry_interval": 1}},
        "workers": {"backoff_seconds": 4, "backoff_max_seconds": 600, "outage_alert_seconds": 600},
        "dedupe": {"window_hours": 0},
    }).start()
    try:
        rounds = [one_round(daemon, service, voice, n) for n in range(args.rounds)]
    finally:
        daemon.stop()
        service.stop()
        shutil.rmtree(scratch, ignore_errors=True)
    goal = POLL_INTERVAL + 1
    for n, (latency, left) in enumerate(rounds):
        print(f"round {n}: submitted {latency:5.2f} s after the service returned; its backoff had {left:6.1f} s "
              f"left; {latency / goal:.2f}x the goal ({goal:g} s)")
    worst = max(latency for latency, _ in rounds)
    median = statistics.median(latency for latency, _ in rounds)
    print(f"median {median:.2f} s, worst {worst:.2f} s = {worst / goal:.2f}x "
          f"poll_interval + 1 s; backoff left (the wait before) median "
          f"{statistics.median(b for _, b in rounds):.1f} s")


if __name__ == "__main__":
    main()
