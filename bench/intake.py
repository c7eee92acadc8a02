#!/usr/bin/env python3
"""Intake benchmark: claim latency beyond the settle window (inotify vs polling), a 5,000-file storm, and a
50,000-file burst past the kernel's inotify queue.

Runs the real daemon as a subprocess on temporary folders and reads claim times from its JSON log.
The burst lands while the daemon is stopped (SIGSTOP), so the kernel's queue (fs.inotify.max_queued_events,
16,384 by default) overflows for certain; the periodic rescan is set to an hour, so only the rescan the
overflow triggers can find the files whose events were dropped.
Usage: .venv/bin/python bench/intake.py [--pairs 100] [--storm-pairs 2500] [--burst-pairs 25000]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
import wave
from pathlib import Path

import numpy as np
import psutil

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
from daemon_harness import DaemonHarness  # noqa: E402

PORTRAIT = REPO / "tests" / "fixtures" / "portrait.jpg"
SETTLE = 0.5


def write_wav(path: Path, seed: int, seconds: float = 0.4, rate: int = 16000) -> None:
    """Distinct content per file, so the duplicate-drop check does not short-circuit the storm."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    x = 0.3 * np.sin(2 * np.pi * 180 * t) * (0.5 + 0.5 * np.sin(2 * np.pi * 4 * t)) + 0.01 * rng.standard_normal(t.size)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(rate)
        w.writeframes((x * 32767).astype("<i2").tobytes())


def claim_times(harness: DaemonHarness) -> dict[str, float]:
    out: dict[str, float] = {}
    for line in harness.log_text().splitlines():
        rec = json.loads(line)
        if rec.get("event") == "job claimed":
            ts = rec["timestamp"].replace("Z", "+00:00")
            out[rec["job"]] = time.mktime(time.strptime(ts[:19], "%Y-%m-%dT%H:%M:%S")) - time.timezone \
                + float("0." + ts[20:26])
    return out


def latency_run(mode: str, pairs: int, work: Path, interval: float) -> list[float]:
    harness = DaemonHarness(work / mode, {"watcher": {"mode": mode, "settle_seconds": SETTLE, "poll_interval": 0.25},
                                          "logging": {"level": "info"}})
    src = work / f"src-{mode}"
    src.mkdir()
    for i in range(pairs):
        write_wav(src / f"p{i:04d}.wav", i)
    harness.start()
    stable_at: dict[str, float] = {}
    try:
        for i in range(pairs):
            name = f"p{i:04d}"
            for s, ext in ((src / f"{name}.wav", ".wav"), (PORTRAIT, ".jpg")):
                tmp = harness.inbox / f".{name}{ext}.tmp"
                shutil.copyfile(s, tmp)
                os.rename(tmp, harness.inbox / f"{name}{ext}")
            stable_at[name] = time.time() + SETTLE
            time.sleep(interval)
        harness.wait_for(lambda: len(claim_times(harness)) >= pairs, 300, "all pairs claimed")
        claimed = claim_times(harness)
    finally:
        harness.stop()
    return [claimed[n] - stable_at[n] for n in stable_at]


def storm(pairs: int, work: Path, name: str = "storm", rescan_seconds: float = 30,
          paused: bool = False, drain_timeout: float = 3600) -> dict[str, float]:
    harness = DaemonHarness(work / name, {"watcher": {"settle_seconds": 1.0, "rescan_seconds": rescan_seconds},
                                          "logging": {"level": "info"}})
    src = work / f"src-{name}"
    src.mkdir()
    for i in range(pairs):
        write_wav(src / f"s{i:05d}.wav", 10_000 + i)
    harness.start()
    proc = psutil.Process(harness.proc.pid)
    peak = [proc.memory_info().rss]
    idle_rss = peak[0]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            try:
                peak.append(proc.memory_info().rss)
            except psutil.NoSuchProcess:
                return
            time.sleep(0.2)

    threading.Thread(target=sample, daemon=True).start()
    t0 = time.monotonic()
    if paused:
        os.kill(harness.proc.pid, signal.SIGSTOP)
    for i in range(pairs):
        shutil.copyfile(src / f"s{i:05d}.wav", harness.inbox / f"s{i:05d}.wav")
        shutil.copyfile(PORTRAIT, harness.inbox / f"s{i:05d}.jpg")
    copied = time.monotonic() - t0
    if paused:
        os.kill(harness.proc.pid, signal.SIGCONT)

    def drained() -> bool:
        return not os.listdir(harness.inbox) and len(harness.store().jobs.select(limit=pairs * 2)) >= pairs

    try:
        harness.wait_for(drained, drain_timeout, f"the {name} to drain")
        drain = time.monotonic() - t0
        jobs = harness.store().jobs.select(limit=pairs * 2)
        overflows = harness.log_text().count("inotify queue overflow")
    finally:
        done.set()
        harness.stop()
    names = [j.name for j in jobs]
    claimed = {j.spec["sources"][0].rsplit(".", 1)[0] for j in jobs if j.state != "failed"}
    return {"pairs": pairs, "jobs": len(jobs), "distinct_names": len(set(names)),
            "claimed_pairs": len(claimed), "failed": sum(j.state == "failed" for j in jobs),
            "copy_seconds": copied, "drain_seconds": drain,
            "idle_rss_mb": idle_rss / 2**20, "peak_rss_mb": max(peak) / 2**20, "overflows": overflows}


def pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[q - 1] if len(values) > 1 else values[0]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=100)
    ap.add_argument("--storm-pairs", type=int, default=2500)
    ap.add_argument("--burst-pairs", type=int, default=25000, help="0 skips the burst")
    ap.add_argument("--skip-latency", action="store_true")
    ap.add_argument("--drain-timeout", type=float, default=3600)
    ap.add_argument("--interval", type=float, default=0.5,
                    help="seconds between pairs in the latency runs (below the engine's pace, so this measures "
                         "intake, not a saturated CPU)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        results = {}
        for mode in () if args.skip_latency else ("inotify", "polling"):
            lat = [x * 1000 for x in latency_run(mode, args.pairs, work, args.interval)]
            results[mode] = (pct(lat, 50), pct(lat, 95))
            print(f"claim latency beyond settle [{mode:7}] over {args.pairs} pairs: "
                  f"p50 {results[mode][0]:7.1f} ms  p95 {results[mode][1]:7.1f} ms")
        if results:
            print(f"ratio polling/inotify p95: {results['polling'][1] / max(results['inotify'][1], 1e-3):.1f}x")
        if args.storm_pairs:
            report("storm", storm(args.storm_pairs, work))
        if args.burst_pairs:
            report("burst", storm(args.burst_pairs, work, "burst", rescan_seconds=3600, paused=True,
                                  drain_timeout=args.drain_timeout))


def report(name: str, s: dict[str, float]) -> None:
    print(f"{name}: {s['pairs']} pairs ({2 * s['pairs']} files) copied in {s['copy_seconds']:.1f} s; "
          f"drained in {s['drain_seconds']:.1f} s; jobs {s['jobs']} (claimed pairs {s['claimed_pairs']}, "
          f"failed {s['failed']}, distinct names {s['distinct_names']}); inotify overflows {s['overflows']}")
    lost = s["pairs"] - s["claimed_pairs"]
    dup = s["jobs"] - s["distinct_names"] + (s["jobs"] - s["pairs"])
    print(f"{name}: lost {lost}, duplicated {dup}; daemon RSS idle {s['idle_rss_mb']:.0f} MB, "
          f"peak {s['peak_rss_mb']:.0f} MB")


if __name__ == "__main__":
    main()
