#!/usr/bin/env python3
"""Daemon memory: resident size of the real daemon process on its embedded defaults (preview engine, no S3,
no notifications), idle after start and after one job, for this working tree against a git ref; with
`--outputs N`, also its idle CPU per minute with N videos delivered earlier lying in outputs/.

Both daemons run in the same run, alternately: the ref's tree is exported with `git archive` to a temporary
folder and started from there. Figures are the main process's VmRSS (now) and VmHWM (its peak), read from
/proc; engine workers and intake's probe processes are children and not counted. Idle CPU is the main
process's user+system time over `--idle-seconds` after start-up has settled (the earlier videos are marked
delivered in the store beforehand, as the store keeps them, so nothing is delivered while measuring).
Usage: .venv/bin/python bench/idle.py [--against REF] [--runs 3] [--outputs 20000 --idle-seconds 120]
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from io import BytesIO
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
from media_factory import PORTRAIT_JPG, write_speech_wav  # noqa: E402

# After "daemon ready" the start-up sweeps run on the scheduler's threads (importing what they need): let them.
SETTLE_SECONDS = 5.0


def export(ref: str, dest: Path) -> Path:
    data = subprocess.run(["git", "-C", str(REPO), "archive", ref], capture_output=True, check=True).stdout
    with tarfile.open(fileobj=BytesIO(data)) as tar:
        tar.extractall(dest, filter="data")
    return dest


def memory(pid: int) -> dict[str, float]:
    """VmRSS and VmHWM of the process, in MB."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    return {k: int(fields[k].split()[0]) / 1024 for k in ("VmRSS", "VmHWM")}


def wait(cond, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.1)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of the process so far (/proc/<pid>/stat fields 14 and 15)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def delivered_earlier(tree: Path, base: Path, count: int, env: dict[str, str]) -> None:
    """`count` videos in outputs/ (50 a folder), each marked delivered in a store made by `tree`'s code."""
    db = base / "state" / "heygem.db"
    db.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-c", f"from heygem_daemon.state import Store; Store({str(db)!r}).close()"],
                   env=env, check=True)
    paths = []
    for i in range(count):
        folder = base / "outputs" / f"old-{i // 50:05d}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"v{i:06d}.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"\x00" * 4000)
        paths.append(str(folder / f"v{i:06d}.mp4"))
    with sqlite3.connect(db) as conn:
        conn.executemany("INSERT INTO delivered (path, size, marked_at) VALUES (?, 4012, 0)", [(p,) for p in paths])


def measure(tree: Path, work: Path, voice: Path, earlier: int, idle_seconds: float) -> dict[str, float]:
    """Start the daemon of `tree` on defaults, read its memory (and CPU) idle and after one delivered job,
    stop it."""
    base = work / "base"
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir(parents=True)
    config = base / "config.yaml"
    config.write_text(f"base_dir: {base}\n")
    log = base / "logs" / "heygem.log"
    env = {**os.environ, "PYTHONPATH": str(tree)}
    if earlier:
        delivered_earlier(tree, base, earlier, env)
    proc = subprocess.Popen([sys.executable, str(tree / "daemon.py"), "-c", str(config)], cwd=base, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait(lambda: log.exists() and "daemon ready" in log.read_text(), 60, "daemon ready")
        time.sleep(SETTLE_SECONDS)
        idle: dict[str, float] = memory(proc.pid)
        if idle_seconds:
            cpu0 = cpu_seconds(proc.pid)
            time.sleep(idle_seconds)
            idle["cpu"] = (cpu_seconds(proc.pid) - cpu0) * 60 / idle_seconds
        for src, name in ((voice, "bench.wav"), (PORTRAIT_JPG, "bench.jpg")):
            shutil.copyfile(src, base / "inbox" / f".{name}.tmp")
            os.rename(base / "inbox" / f".{name}.tmp", base / "inbox" / name)

        def done() -> bool:
            # Read-only and without the store: this tree's Store would migrate the other tree's database.
            with sqlite3.connect(f"file:{base / 'state' / 'heygem.db'}?mode=ro", uri=True) as db:
                return db.execute("SELECT state FROM jobs WHERE name = 'bench'").fetchone() == ("done",)

        wait(done, 120, "the job to be done")
        time.sleep(2.0)  # its delivery (links, report) follows on the delivery thread
        after = memory(proc.pid)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    return {"idle_rss": idle["VmRSS"], "idle_hwm": idle["VmHWM"], "job_rss": after["VmRSS"],
            "job_hwm": after["VmHWM"], **({"idle_cpu": idle["cpu"]} if idle_seconds else {})}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--against", default="HEAD", help="git ref to compare this working tree with (default HEAD)")
    ap.add_argument("--runs", type=int, default=3, help="daemon starts per tree; medians are shown")
    ap.add_argument("--outputs", type=int, default=0, help="videos delivered earlier lying in outputs/")
    ap.add_argument("--idle-seconds", type=float, default=0.0,
                    help="measure idle CPU over this long (cover rescan_seconds, 60 by default)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        voice = write_speech_wav(work / "voice.wav", 2.0)
        trees = {args.against: export(args.against, work / "ref"), "working tree": REPO}
        runs: dict[str, list[dict[str, float]]] = {name: [] for name in trees}
        for _ in range(args.runs):
            for name, tree in trees.items():
                runs[name].append(measure(tree, work / "run", voice, args.outputs, args.idle_seconds))
    med = {name: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for name, rs in runs.items()}
    labels = {"idle_rss": "idle VmRSS", "idle_hwm": "idle VmHWM", "job_rss": "after one job VmRSS",
              "job_hwm": "after one job VmHWM"}
    ref, new = med[args.against], med["working tree"]
    if args.idle_seconds:
        labels["idle_cpu"] = f"idle CPU s/min, {args.outputs} in outputs/"
    print(f"daemon main process on embedded defaults, median of {args.runs} starts each (MB; CPU in s/min)")
    print(f"{'':36} {args.against[:14]:>14} {'working tree':>14} {'ratio':>7}")
    for key, label in labels.items():
        print(f"{label:36} {ref[key]:14.2f} {new[key]:14.2f} {new[key] / max(ref[key], 1e-3):7.2f}")


if __name__ == "__main__":
    main()
