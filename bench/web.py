"""Benchmark the web console: a big file through tus against a plain HTTP PUT to the same server, and the
jobs page with 10,000 jobs against the same page with 100.

The console runs as its own process (uvicorn, the real app, on 127.0.0.1) with one extra route for the
baseline: PUT /bench/put streams the body to a file, the way the tus PATCH does minus the protocol. Rounds
alternate tus and PUT, so a noisy neighbour hits both. Prints MB/s of each, the ratio tus/PUT (goal
>= 0.8x), the server's RSS growth over the run (goal < 100 MB), and the server time per jobs page at
100 and at 10,000 jobs (goal < 100 ms; ratio near 1x: a page costs the same at any size).

    .venv/bin/python bench/web.py [--mb 1024] [--rounds 2] [--jobs 10000]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # the test client (web_rig) logs in and speaks tus

import psutil  # noqa: E402
import yaml  # noqa: E402

from heygem_daemon.state import Store  # noqa: E402
from heygem_daemon.state.tasks import NewTask  # noqa: E402
from web_rig import Client, free_port, web_settings  # noqa: E402

MiB = 2**20


def serve(config: str, port: int) -> None:
    """The child process: the console plus the baseline route."""
    import uvicorn
    from starlette.requests import Request
    from starlette.responses import Response

    from heygem_daemon.config import load_config
    from heygem_daemon.web.app import create_app

    cfg = load_config(Path(config))
    app = create_app(cfg, Path(config), "bench-session-key")

    async def put(request: Request) -> Response:
        # The floor tus is measured against: the plainest handler, blocking writes and all.
        with open(cfg.folder("work") / "put.bin", "wb", buffering=0) as out:  # noqa: ASYNC230
            async for chunk in request.stream():
                out.write(chunk)
        return Response(status_code=204)

    app.router.add_route("/bench/put", put, methods=["PUT"])
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


class Peak(threading.Thread):
    """The server's largest RSS while a run goes on."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.proc = psutil.Process(pid)
        self.peak = self.proc.memory_info().rss
        self.running = True

    def run(self) -> None:
        while self.running:
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.05)


def write_file(path: Path, mb: int) -> Path:
    with open(path, "wb") as f:
        for _ in range(mb):
            f.write(os.urandom(MiB))
    return path


def tus_seconds(client: Client, path: Path) -> float:
    size = path.stat().st_size
    start = time.perf_counter()
    location = client.create("big.mp4", size).headers["Location"]
    with open(path, "rb") as body:
        answer = client.http.patch(client.url + location, data=body, timeout=600, headers=client.headers(**{
            "Upload-Offset": "0", "Content-Type": "application/offset+octet-stream"}))
    assert answer.status_code == 204 and answer.headers["Upload-Offset"] == str(size), answer.text
    seconds = time.perf_counter() - start
    client.http.delete(client.url + location, headers=client.headers())
    return seconds


def put_seconds(client: Client, path: Path) -> float:
    start = time.perf_counter()
    with open(path, "rb") as body:
        answer = client.http.put(client.url + "/bench/put", data=body, timeout=600,
                                 headers={"X-CSRF-Token": client.csrf})
    assert answer.status_code == 204, answer.text
    return time.perf_counter() - start


def seed_jobs(store: Store, count: int, start: int) -> None:
    for i in range(start, start + count):
        job = store.jobs.create(f"bench-{i:05d}", {"priority": "normal"})
        store.jobs.queue(job.id, [NewTask("a", "/in/a.wav", "/in/a.jpg", f"/out/bench-{i:05d}/a.mp4")])
        if i % 3 == 0:
            store.jobs.set_state(job.id, "failed", error={"reason": "bench", "hint": "none"})


def page_ms(client: Client, queries: list[str], repeat: int = 5) -> float:
    times = []
    for _ in range(repeat):
        for query in queries:
            start = time.perf_counter()
            assert client.get("/jobs" + query).status_code == 200
            times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mb", type=int, default=1024)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--jobs", type=int, default=10_000)
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-web-") as tmp:
        base = Path(tmp)
        config = base / "config.yaml"
        config.write_text(yaml.safe_dump({"base_dir": str(base), "logging": {"console": False},
                                          **web_settings(max_upload_mb=args.mb + 1)}))
        (base / "state").mkdir()
        port = free_port()
        server = subprocess.Popen([sys.executable, __file__, "--serve", str(config), str(port)])
        try:
            client = Client(f"http://127.0.0.1:{port}")
            deadline = time.monotonic() + 30
            while True:
                try:
                    client.login("alice", "alice-pass-1")
                    break
                except OSError:
                    assert time.monotonic() < deadline, "console did not start"
                    time.sleep(0.2)
            client.get("/upload")
            big = write_file(base / "big.bin", args.mb)
            rss_before = psutil.Process(server.pid).memory_info().rss
            peak = Peak(server.pid)
            peak.start()
            tus, put = [], []
            for r in range(args.rounds):
                tus.append(tus_seconds(client, big))
                put.append(put_seconds(client, big))
                print(f"round {r + 1}: tus {args.mb / tus[-1]:.0f} MB/s, PUT {args.mb / put[-1]:.0f} MB/s, "
                      f"ratio {put[-1] / tus[-1]:.2f}x")
            peak.running = False
            peak.join()
            big.unlink()
            growth = (peak.peak - rss_before) / MiB
            print(f"{args.mb} MiB upload: tus {args.mb / min(tus):.0f} MB/s vs plain PUT {args.mb / min(put):.0f} MB/s"
                  f" (best of {args.rounds}): ratio {min(put) / min(tus):.2f}x (goal >= 0.8x); server RSS growth "
                  f"{growth:.1f} MB (goal < 100 MB)")

            store = Store(base / "state" / "heygem.db")
            queries = ["?page=1", "?page=2", "?state=failed", "?q=bench-0"]
            seed_jobs(store, 100, 0)
            small = page_ms(client, queries)
            seed_jobs(store, args.jobs - 100, 100)
            last = f"?page={-(-args.jobs // 50)}"
            large = page_ms(client, [*queries, last])
            print(f"jobs page, 50 rows: {small:.1f} ms with 100 jobs, {large:.1f} ms with {args.jobs} jobs "
                  f"(median of first/second/last page, state and name filters; goal < 100 ms): "
                  f"ratio {large / small:.2f}x")
        finally:
            server.terminate()
            server.wait(10)


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--serve":
        serve(sys.argv[2], int(sys.argv[3]))
    else:
        main()
