"""Benchmark the HTTP API (/api/v1): create-job and list p95 with 100,000 jobs in the store against the same
with 100, and many concurrent clients.

The console runs as its own process (uvicorn, the real app, on 127.0.0.1). Prints, for 100 and for --jobs
jobs: the p95 of creating a job from a small multipart request (two files: the hand-over probes them, as
intake would) and of listing 50 jobs (the first page and a page deep in the list, by cursor); the ratios
big/small (goal within 1.5x: keyset pages cost the same at any depth); then --clients concurrent clients
reading for --seconds: errors (goal 0) and the server's RSS growth (goal < 50 MB).

    .venv/bin/python bench/api.py [--jobs 100000] [--clients 50] [--seconds 60]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import psutil  # noqa: E402
import requests  # noqa: E402
import yaml  # noqa: E402

from heygem_daemon.config import load_config  # noqa: E402
from heygem_daemon.state import Store, db_path  # noqa: E402
from heygem_daemon.web.api import _cursor  # noqa: E402
from heygem_daemon.web.tokens import SCOPES, create_token  # noqa: E402
from media_factory import PORTRAIT_JPG as PORTRAIT, write_speech_wav  # noqa: E402
from web_rig import free_port, web_settings  # noqa: E402


def serve(config: str, port: int) -> None:
    import uvicorn

    from heygem_daemon.config import load_config
    from heygem_daemon.web.app import create_app

    uvicorn.run(create_app(load_config(Path(config)), Path(config), "bench-session-key"), host="127.0.0.1",
                port=port, log_level="warning")


def seed(store: Store, count: int, start: int) -> None:
    for i in range(start, start + count):
        store.jobs.create(f"seeded-{i:06d}", {"priority": "normal"})


def p95(samples: list[float]) -> float:
    return statistics.quantiles(samples, n=20)[-1]


class Console:
    """A console process over its own store, seeded with `jobs` jobs, and the calls measured against it."""

    def __init__(self, base: Path, jobs: int) -> None:
        base.mkdir()
        settings = {"base_dir": str(base), "logging": {"console": False}, **web_settings(api_requests_per_minute=10**9)}
        (base / "config.yaml").write_text(yaml.safe_dump(settings))
        self.store = Store(db_path(load_config(base / "config.yaml").folder("state")))
        seed(self.store, jobs, 0)
        self.token = create_token(self.store, "bench", "carol", SCOPES)
        self.wav = write_speech_wav(base / "hello.wav", 1.0)
        port = free_port()
        self.server = subprocess.Popen([sys.executable, __file__, "--serve", str(base / "config.yaml"), str(port)])
        self.url = f"http://127.0.0.1:{port}/api/v1"
        self.http = requests.Session()
        self.http.headers["Authorization"] = f"Bearer {self.token}"
        for _ in range(300):
            try:
                self.http.get(f"{self.url}/health", timeout=2)
                break
            except requests.ConnectionError:
                time.sleep(0.1)
        deep = self.store.jobs.after(None, None, max(1, jobs // 2))
        self.cursor = _cursor(*deep[-1][1])
        self.samples: dict[str, list[float]] = {"create": [], "list first page": [], "list deep page": []}

    def round(self) -> None:
        files = [("files", ("hello.wav", self.wav.read_bytes())), ("files", ("anna.jpg", PORTRAIT.read_bytes()))]
        calls = {"create": lambda: self.http.post(f"{self.url}/jobs/multipart", files=files, timeout=60),
                 "list first page": lambda: self.http.get(f"{self.url}/jobs", params={"limit": 50}, timeout=60),
                 "list deep page": lambda: self.http.get(f"{self.url}/jobs", timeout=60,
                                                         params={"limit": 50, "cursor": self.cursor})}
        for what, call in calls.items():
            start = time.perf_counter()
            answer = call()
            self.samples[what].append((time.perf_counter() - start) * 1000)
            assert answer.status_code in (200, 201), answer.text

    def stop(self) -> None:
        self.server.terminate()
        self.server.wait(10)


def crowd(url: str, token: str, clients: int, seconds: float, pid: int) -> tuple[int, int, float]:
    """Requests made, errors, RSS growth in MB over the run."""
    proc = psutil.Process(pid)
    before = proc.memory_info().rss
    made, errors, lock = [0], [0], threading.Lock()
    end = time.monotonic() + seconds

    def client() -> None:
        http = requests.Session()
        http.headers["Authorization"] = f"Bearer {token}"
        cursor = None
        while time.monotonic() < end:
            try:
                page = http.get(f"{url}/jobs", params={"limit": 20, **({"cursor": cursor} if cursor else {})},
                                timeout=60)
                ok = page.status_code == 200
                cursor = page.json()["next_cursor"] if ok else None
            except requests.RequestException:
                ok = False
            with lock:
                made[0] += 1
                errors[0] += not ok

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return made[0], errors[0], (proc.memory_info().rss - before) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=60.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        small = Console(Path(tmp) / "small", 100)
        big = Console(Path(tmp) / "big", args.jobs)
        try:
            for _ in range(args.rounds):  # alternating: a noisy neighbour slows both alike
                small.round()
                big.round()
            for what in small.samples:
                a, b = p95(small.samples[what]), p95(big.samples[what])
                ma, mb = statistics.median(small.samples[what]), statistics.median(big.samples[what])
                print(f"{what:16s} p95 {a:7.1f} ms at 100 jobs, {b:7.1f} ms at {args.jobs:,} jobs: {b / a:.2f}x"
                      f" (median {ma:.1f} / {mb:.1f} ms: {mb / ma:.2f}x)")
            made, errors, grew = crowd(big.url, big.token, args.clients, args.seconds, big.server.pid)
            print(f"{args.clients} clients for {args.seconds:g} s: {made} requests, {errors} errors, "
                  f"server RSS grew {grew:.1f} MB")
        finally:
            small.stop()
            big.stop()


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--serve":
        serve(sys.argv[2], int(sys.argv[3]))
    else:
        main()
