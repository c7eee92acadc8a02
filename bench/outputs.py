#!/usr/bin/env python3
"""Outputs watcher benchmark: CPU spent noticing new videos, and CPU spent idle, with an empty outputs/ and
with many earlier ones.

Runs the real watcher (watchdog inotify + OutputsWatcher, driven like the delivery thread drives it) in this
process, writes new videos the way an engine does (.part, then rename), and reports the process CPU time
until every new video was reported. Then it leaves the watcher idle for a while with a short rescan period
(many minutes of the daemon's idle time, compressed) and reports the CPU per rescan period, as the delivery
service runs it with inotify and as it ran before (a periodic ctime walk). Work should follow the new
videos, not the size of outputs/.
Usage: .venv/bin/python bench/outputs.py [--earlier 20000] [--videos 100] [--idle 5]
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from heygem_daemon.config import Watcher
from heygem_daemon.delivery.outputs import OutputsWatcher
from heygem_daemon.fs.watcher import start_watcher

SETTLE = 0.2
PER_FOLDER = 50
VIDEO = b"\x00\x00\x00\x18ftypmp42" + b"\x00" * 4000


def earlier_videos(root: Path, count: int) -> set[str]:
    """Videos delivered before: on disk and known to the store (as delivery's `known` says)."""
    known = set()
    for i in range(count):
        folder = root / f"old-{i // PER_FOLDER:05d}"
        folder.mkdir(exist_ok=True)
        path = folder / f"v{i:06d}.mp4"
        path.write_bytes(VIDEO)
        known.add(str(path))
    return known


@contextmanager
def delivery_loop(root: Path, known: set[str], rescan: float, periodic: bool) -> Iterator[list[str]]:
    """The watcher and a loop stepping it like the delivery thread; yields the videos reported so far."""
    watcher = OutputsWatcher(root, Watcher(settle_seconds=SETTLE, rescan_seconds=rescan))
    watcher.periodic = periodic
    reported: list[str] = []
    stop, first_step, wake = threading.Event(), threading.Event(), threading.Event()

    def touch(path: str | None) -> None:  # as DeliveryService._touch
        watcher.touch(path)
        wake.set()

    def loop() -> None:
        while not stop.is_set():
            for rel, _size in watcher.step(time.monotonic(), lambda r: str(root / r) in known):
                known.add(str(root / rel))
                reported.append(rel)
            first_step.set()
            wake.wait(min(0.1, rescan))
            wake.clear()

    observer, _mode = start_watcher(root, "inotify", 1.0, touch, what="outputs")
    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    first_step.wait()  # the first (full) walk at start is not what is measured
    try:
        yield reported
    finally:
        stop.set()
        observer.stop()
        observer.join(5)
        thread.join(5)


def run(earlier: int, videos: int, interval: float) -> tuple[float, float]:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "outputs"
        root.mkdir()
        known = earlier_videos(root, earlier)
        with delivery_loop(root, known, 60.0, False) as reported:
            cpu0, wall0 = time.process_time(), time.monotonic()
            for i in range(videos):
                folder = root / f"new-{i:04d}"
                folder.mkdir()
                part = folder / f"new-{i:04d}.mp4.part"
                part.write_bytes(VIDEO)
                part.rename(folder / f"new-{i:04d}.mp4")
                time.sleep(interval)
            while len([r for r in reported if r.startswith("new-")]) < videos:
                if time.monotonic() - wall0 > 600:
                    raise SystemExit("new videos were not all reported within 600 s")
                time.sleep(0.05)
            return time.process_time() - cpu0, time.monotonic() - wall0


def idle(earlier: int, seconds: float, rescan: float, periodic: bool) -> float:
    """Process CPU seconds per rescan period while nothing happens in outputs/."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "outputs"
        root.mkdir()
        known = earlier_videos(root, earlier)
        with delivery_loop(root, known, rescan, periodic):
            time.sleep(rescan)  # past the first periodic walk's start
            cpu0 = time.process_time()
            time.sleep(seconds)
            return (time.process_time() - cpu0) / (seconds / rescan)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--earlier", type=int, default=20000)
    ap.add_argument("--videos", type=int, default=100)
    ap.add_argument("--interval", type=float, default=0.05, help="seconds between new videos")
    ap.add_argument("--idle", type=float, default=5.0, help="seconds of idle measured (rescan every 0.5 s)")
    args = ap.parse_args()
    empty_cpu, empty_wall = run(0, args.videos, args.interval)
    full_cpu, full_wall = run(args.earlier, args.videos, args.interval)
    print(f"{args.videos} new videos, empty outputs/: CPU {empty_cpu:.2f} s (wall {empty_wall:.1f} s)")
    print(f"{args.videos} new videos, {args.earlier} earlier ones: CPU {full_cpu:.2f} s (wall {full_wall:.1f} s)")
    print(f"ratio CPU with {args.earlier} earlier / empty: {full_cpu / max(empty_cpu, 1e-3):.1f}x")
    rescan = 0.5
    for label, periodic in (("inotify, no periodic walk (now)", False), ("periodic ctime walk (before)", True)):
        empty = idle(0, args.idle, rescan, periodic)
        full = idle(args.earlier, args.idle, rescan, periodic)
        print(f"idle, {label}: CPU per rescan period {empty * 1000:.1f} ms empty, {full * 1000:.1f} ms with "
              f"{args.earlier} earlier; ratio {full / max(empty, 1e-4):.1f}x")


if __name__ == "__main__":
    main()
