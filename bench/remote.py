"""Benchmark remote generation: 200 tasks of a fixed-length fake tool over 4 `heygem-daemon worker`
processes (one device each) on a real redis-server, dispatched by the daemon's RemoteDispatcher through
the real store and life cycle.

Prints, for each number of tasks kept in flight per queue: total time against the ideal
(tasks × tool seconds / workers), the ratio, send-to-start p95 (taken by the daemon → the tool started on
a worker) and the device idle gap p95 (a worker's tool ended → its next one started), and the daemon's
own cost per task (its dispatch thread's CPU time / tasks), which bounds how many hosts one daemon feeds.

Then the cost of following many tasks in flight (what limits one daemon driving many hosts): N tasks
sent to a queue no worker serves, each with a PROGRESS state in the backend, and the time of one
dispatcher poll (one read of every state, a stat of every part) against the baseline of reading the
states one request per task (what the dispatcher did before), in the same run.

    .venv/bin/python bench/remote.py                  # 200 tasks of 1 s, 4 workers
    .venv/bin/python bench/remote.py --seconds 0.25   # the same shape, 4x shorter
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # the rig and media_factory live with the tests

from media_factory import PORTRAIT_JPG, write_speech_wav  # noqa: E402
from remote_rig import RedisServer, RemoteWorker  # noqa: E402
from test_job_lifecycle import claimed  # noqa: E402

from heygem_daemon.config import load_config  # noqa: E402
from heygem_daemon.generation.lifecycle import LifeCycle  # noqa: E402
from heygem_daemon.generation.remote import RemoteDispatcher  # noqa: E402
from heygem_daemon.log import setup_logging  # noqa: E402
from heygem_daemon.state import Store  # noqa: E402

# The tool: note when it starts, sleep, hand back a ready MP4, note when it ends.
# (work/ is cleared when a job ends, so the notes go to $FAKE_LOG/task-<id>.t0 and .t1.)
TOOL = ["/bin/sh", "-c", 'n="$FAKE_LOG/$(basename "$1")"; echo "$FAKE_HOST $(date +%s.%N)" > "$n.t0"; '
        'sleep "$2"; cp "$3" "$4"; date +%s.%N > "$n.t1"', "tool", "{workdir}"]


def p95(values: list[float]) -> float:
    return statistics.quantiles(values, n=20)[-1] if len(values) > 1 else (values[0] if values else 0.0)


def run(root: Path, redis: RedisServer, workers: int, tasks: int, seconds: float, in_flight: int,
        sample: Path) -> dict[str, float]:
    notes = root / "notes"
    shutil.rmtree(notes, ignore_errors=True)
    notes.mkdir()
    base = root / f"daemon-{in_flight}"
    base.mkdir()
    (base / "config.yaml").write_text(json.dumps({
        "base_dir": str(base), "engine": {"name": "command"},
        "engines": {"command": {"args": [*TOOL, str(seconds), str(sample), "{output}"], "timeout": 60}},
        "workers": {"devices": [], "remote": {"broker_url": redis.url, "queues": {"gpu": in_flight}}}}))
    cfg = load_config(base / "config.yaml", environ={})
    life = LifeCycle(cfg, Store(cfg.folder("state") / "heygem.db"))
    job = claimed(life, "bench", pairs=tasks)
    dispatcher = RemoteDispatcher(cfg, life)
    cpu = [0.0]

    def dispatch() -> None:
        started_cpu = time.thread_time()
        dispatcher._run()
        cpu[0] = time.thread_time() - started_cpu

    thread = threading.Thread(target=dispatch, daemon=True)
    began = time.time()
    thread.start()
    while life.store.jobs.get(job.id).state not in ("done", "failed"):
        time.sleep(0.05)
    total = time.time() - began
    dispatcher.stop_event.set()
    dispatcher.wake.set()
    thread.join(30)
    done = life.store.tasks.select(job.id)
    failed = [t.last_error for t in done if t.state != "done"]
    assert not failed, f"{len(failed)} task(s) failed, e.g. {failed[0]}"
    send_to_start, by_host = [], {}
    for t in done:
        host, t0 = (notes / f"task-{t.id}.t0").read_text().split()
        t1 = float((notes / f"task-{t.id}.t1").read_text())
        send_to_start.append(float(t0) - (t.started_at or 0.0))
        by_host.setdefault(host, []).append((float(t0), t1))
    gaps = [b[0] - a[1] for runs in by_host.values() for a, b in zip(sorted(runs), sorted(runs)[1:])]
    ideal = tasks * seconds / workers
    return {"in_flight": in_flight, "total": total, "ideal": ideal, "ratio": total / ideal,
            "send_to_start_p95": p95(send_to_start), "idle_gap_p95": p95(gaps),
            "daemon_ms_per_task": 1000 * cpu[0] / tasks}


def follow_cost(root: Path, redis: RedisServer, in_flight: int, polls: int = 20) -> dict[str, float]:
    base = root / f"follow-{in_flight}"
    base.mkdir()
    (base / "config.yaml").write_text(json.dumps({
        "base_dir": str(base), "workers": {"devices": [], "remote": {
            "broker_url": redis.url, "queues": {"unserved": in_flight}}}}))
    cfg = load_config(base / "config.yaml", environ={})
    life = LifeCycle(cfg, Store(cfg.folder("state") / "heygem.db"))
    claimed(life, "follow", pairs=in_flight)
    dispatcher = RemoteDispatcher(cfg, life)
    dispatcher.step()  # sends them all
    flights = dispatcher.flights["unserved"]
    assert len(flights) == in_flight, len(flights)
    backend = dispatcher.app.backend
    for f in flights:
        backend.store_result(f.celery_id, {"host": "w@bench", "progress": 0.5, "beat": 1.0}, "PROGRESS")
    began = time.perf_counter()
    for _ in range(polls):
        dispatcher.step()
    poll = (time.perf_counter() - began) / polls
    began = time.perf_counter()
    for _ in range(polls):
        for f in flights:
            backend.get_task_meta(f.celery_id)
            f.part.is_file()
    baseline = (time.perf_counter() - began) / polls
    return {"in_flight": in_flight, "poll_ms": 1000 * poll, "baseline_ms": 1000 * baseline}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=200)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=1.0, help="how long the fake tool takes per task")
    parser.add_argument("--follow", type=int, nargs="*", default=[100, 400, 1600],
                        help="tasks in flight for the follow-cost part")
    args = parser.parse_args()
    setup_logging(None, "warning")
    with tempfile.TemporaryDirectory(prefix="heygem-bench-remote-") as tmp:
        root = Path(tmp)
        sample = root / "sample.mp4"  # what a lip-sync tool makes: picture and sound
        subprocess.run([sys.executable, str(ROOT / "tests" / "tools" / "fake_lipsync.py"), "--audio",
                        str(write_speech_wav(root / "voice.wav", 0.3)), "--portrait", str(PORTRAIT_JPG),
                        "--output", str(sample)], check=True, capture_output=True)
        redis = RedisServer(root / "redis").start()
        hosts = [RemoteWorker(root / f"host{i}", f"w{i}@bench", {
            "engine": {"name": "command"},
            "engines": {"command": {"args": [*TOOL, str(args.seconds), str(sample), "{output}"], "timeout": 60}},
            "workers": {"devices": ["cpu"], "remote": {"broker_url": redis.url, "queues": {"gpu": 1}}}},
            {"FAKE_HOST": f"w{i}", "FAKE_LOG": str(root / "notes")}) for i in range(args.workers)]
        try:
            for h in hosts:
                h.start()
            print(f"{args.tasks} tasks of {args.seconds:g} s over {args.workers} worker processes "
                  f"(ideal {args.tasks * args.seconds / args.workers:.1f} s)")
            print(f"{'in flight':>9} {'total s':>8} {'x ideal':>8} {'send->start p95':>16} {'idle gap p95':>13}"
                  f" {'daemon ms/task':>15}")
            for in_flight in (args.workers, 2 * args.workers):
                r = run(root, redis, args.workers, args.tasks, args.seconds, in_flight, sample)
                print(f"{r['in_flight']:>9} {r['total']:>8.1f} {r['ratio']:>8.3f} {r['send_to_start_p95']:>15.3f}s"
                      f" {r['idle_gap_p95']:>12.3f}s {r['daemon_ms_per_task']:>15.2f}")
            print("\none poll of N tasks in flight (one read of all states) vs one read per task (baseline)")
            print(f"{'in flight':>9} {'poll ms':>9} {'baseline ms':>12} {'x faster':>9} "
                  f"{'max in flight at 0.25 s':>24}")
            for in_flight in args.follow:
                f = follow_cost(root, redis, in_flight)
                print(f"{f['in_flight']:>9} {f['poll_ms']:>9.1f} {f['baseline_ms']:>12.1f}"
                      f" {f['baseline_ms'] / f['poll_ms']:>9.2f} {int(250 / f['poll_ms'] * in_flight):>24}")
        finally:
            for h in hosts:
                h.stop()
            redis.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
