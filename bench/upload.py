"""Benchmark the resumable uploader against boto3's upload_file, on one local moto server and one file.

Prints MB/s of boto3 `upload_file` with its defaults (8 MiB parts, 10 threads) and of our Uploader (parts
sent one after another, every part recorded in SQLite), the ratio ours/boto3, and the bytes sent twice
when an uploading process is SIGKILLed half way and the upload is resumed (goal: at most one part).

    .venv/bin/python bench/upload.py [--mb 128] [--part-mb 8]
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # media_factory and the moto server helper live with the tests

from boto3.s3.transfer import TransferConfig  # noqa: E402

from heygem_daemon.config import S3  # noqa: E402
from heygem_daemon.delivery.s3 import MiB, Throttle, Uploader, make_client  # noqa: E402
from heygem_daemon.state import Store  # noqa: E402
from media_factory import write_noise_video  # noqa: E402
from s3_server import MotoServer, credentials_env  # noqa: E402


def settings(server: MotoServer, bucket: str, part_mb: int, concurrency: int | None = None) -> S3:
    extra = {"part_concurrency": concurrency} if concurrency else {}
    return S3(**server.s3_settings(bucket, part_size_mb=part_mb, **extra))


def new_delivery(store: Store, video: Path, key: str) -> int:
    store.deliveries.ensure_batch("bench", "bench", "bench", None)
    d = store.deliveries.add("bench", str(video), key, video.stat().st_size, key, None)
    assert d is not None
    return d.id


def ours(server: MotoServer, bucket: str, video: Path, part_mb: int, db: Path, key: str,
         concurrency: int | None) -> float:
    store = Store(db)
    did = new_delivery(store, video, key)
    s3 = settings(server, bucket, part_mb, concurrency)
    uploader = Uploader(make_client(s3), s3, store, Throttle(0), threading.Event())
    start = time.perf_counter()
    uploader.upload(store.deliveries.get(did))
    return time.perf_counter() - start


def boto3_default(server: MotoServer, bucket: str, video: Path, key: str) -> float:
    client = server.client()
    start = time.perf_counter()
    client.upload_file(str(video), bucket, key, Config=TransferConfig())
    return time.perf_counter() - start


def child(endpoint: str, bucket: str, video: str, part_mb: int, db: str, key: str) -> None:
    """Run by the kill test: upload until the parent kills this process."""
    store = Store(Path(db))
    s3 = S3(bucket=bucket, endpoint_url=endpoint, region="us-east-1", addressing_style="path", part_size_mb=part_mb)
    Uploader(make_client(s3), s3, store, Throttle(0), threading.Event()).upload(store.deliveries.get(int(key)))


def resent_after_kill(server: MotoServer, bucket: str, video: Path, part_mb: int, db: Path) -> tuple[int, int]:
    store = Store(db)
    did = new_delivery(store, video, "bench/killed.mp4")
    total = -(-video.stat().st_size // (part_mb * MiB))
    proc = subprocess.Popen([sys.executable, __file__, "--child", server.endpoint, bucket, str(video), str(part_mb),
                             str(db), str(did)], env=os.environ)
    while len(store.deliveries.parts(did)) < total // 2:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    upload_id = store.deliveries.get(did).upload_id
    s3 = settings(server, bucket, part_mb)
    Uploader(make_client(s3), s3, store, Throttle(0), threading.Event()).upload(store.deliveries.get(did))
    puts = [n for u, n in server.part_puts(bucket) if u == upload_id]
    twice = [n for n in set(puts) if puts.count(n) > 1]
    return len(twice) * part_mb * MiB, len(twice)


def main() -> None:
    if sys.argv[1:2] == ["--child"]:
        child(*sys.argv[2:4], sys.argv[4], int(sys.argv[5]), sys.argv[6], sys.argv[7])
        return
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=float, default=128)
    ap.add_argument("--part-mb", type=int, default=8)
    ap.add_argument("--part-concurrency", type=int, default=None, help="default: s3.part_concurrency's default")
    args = ap.parse_args()
    os.environ.update(credentials_env())
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        server = MotoServer(tmp / "moto.log").start()
        try:
            video = write_noise_video(tmp / "big.mp4", args.mb)
            size_mb = video.stat().st_size / MiB
            bucket = server.new_bucket()
            boto3_default(server, bucket, video, "warmup.mp4")
            t_boto = min(boto3_default(server, bucket, video, f"boto{i}.mp4") for i in range(2))
            t_ours = min(ours(server, bucket, video, args.part_mb, tmp / f"s{i}.db", f"ours{i}.mp4",
                              args.part_concurrency) for i in range(2))
            resent, parts = resent_after_kill(server, bucket, video, args.part_mb, tmp / "kill.db")
        finally:
            server.stop()
    print(f"file: {size_mb:.0f} MiB real MP4, parts of {args.part_mb} MiB "
          f"({args.part_concurrency or S3().part_concurrency} in flight), local moto server")
    print(f"boto3 upload_file defaults : {size_mb / t_boto:7.1f} MiB/s")
    print(f"ours (resumable, recorded) : {size_mb / t_ours:7.1f} MiB/s   ratio ours/boto3 = {t_boto / t_ours:.2f}")
    print(f"SIGKILL half way + resume  : {resent / MiB:.0f} MiB sent twice ({parts} part(s); goal: at most one)")


if __name__ == "__main__":
    main()
