"""Benchmark the resumable uploader against boto3's upload_file, on local S3 servers (moto, nanio) and one file.

Prints MB/s of boto3 `upload_file` (its own checksum settings: CRC32 per part in an aws-chunked trailer,
unsigned body) and of our Uploader (CRC32 per part in a header, unsigned body, the file's sha256 hashed
beside the sends, parts recorded in SQLite), both with the same part size and parts in flight (default:
the daemon's, 16 MiB and 4) so memory is the same on both sides; the speed ratio boto3 time / our time and
the client CPU ratio ours/boto3 of each round (boto3 and ours alternate, so a noisy neighbour hits both;
goals: speed >= 1.0x, CPU <= 1.1x), and the bytes sent twice when an uploading process is SIGKILLed half
way and resumed (goal: at most one part).

    .venv/bin/python bench/upload.py [--mb 1024] [--part-mb 16] [--part-concurrency 4] [--rounds 3] [--server nanio]
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
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
from s3_server import MotoServer, NanioServer, S3Process, credentials_env  # noqa: E402

SERVERS: dict[str, type[S3Process]] = {"moto": MotoServer, "nanio": NanioServer}


def settings(server: S3Process, bucket: str, part_mb: int, concurrency: int | None = None) -> S3:
    extra = {"part_concurrency": concurrency} if concurrency else {}
    return S3(**server.s3_settings(bucket, part_size_mb=part_mb, **extra))


def new_delivery(store: Store, video: Path, key: str) -> int:
    store.deliveries.ensure_batch("bench", "bench", "bench", None)
    d = store.deliveries.add("bench", str(video), key, video.stat().st_size, key, None)
    assert d is not None
    return d.id


def ours(server: S3Process, bucket: str, video: Path, part_mb: int, db: Path, key: str,
         concurrency: int | None) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of one upload."""
    store = Store(db)
    did = new_delivery(store, video, key)
    s3 = settings(server, bucket, part_mb, concurrency)
    uploader = Uploader(make_client(s3), s3, store, Throttle(0), threading.Event())
    start, cpu = time.perf_counter(), time.process_time()
    uploader.upload(store.deliveries.get(did))
    return time.perf_counter() - start, time.process_time() - cpu


def boto3_upload(server: S3Process, bucket: str, video: Path, key: str, part_mb: int,
                 concurrency: int) -> tuple[float, float]:
    """boto3's upload_file with its default client (its checksums), our part size and parts in flight."""
    client = server.client()
    config = TransferConfig(multipart_threshold=part_mb * MiB, multipart_chunksize=part_mb * MiB,
                            max_concurrency=concurrency)
    start, cpu = time.perf_counter(), time.process_time()
    client.upload_file(str(video), bucket, key, Config=config)
    return time.perf_counter() - start, time.process_time() - cpu


def child(endpoint: str, bucket: str, video: str, part_mb: int, db: str, key: str) -> None:
    """Run by the kill test: upload until the parent kills this process."""
    store = Store(Path(db))
    s3 = S3(bucket=bucket, endpoint_url=endpoint, region="us-east-1", addressing_style="path", part_size_mb=part_mb)
    Uploader(make_client(s3), s3, store, Throttle(0), threading.Event()).upload(store.deliveries.get(int(key)))


def resent_after_kill(server: S3Process, bucket: str, video: Path, part_mb: int, db: Path) -> tuple[int, int]:
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


def one_server(name: str, video: Path, tmp: Path, args: argparse.Namespace) -> None:
    server = SERVERS[name](tmp / f"{name}.log").start()
    try:
        size_mb = video.stat().st_size / MiB
        bucket = server.new_bucket()
        boto3_upload(server, bucket, video, "warmup.mp4", args.part_mb, args.part_concurrency)
        rounds = []
        for i in range(args.rounds):
            t_boto = boto3_upload(server, bucket, video, f"boto{i}.mp4", args.part_mb, args.part_concurrency)
            t_ours = ours(server, bucket, video, args.part_mb, tmp / f"{name}{i}.db", f"ours{i}.mp4",
                          args.part_concurrency)
            rounds.append((t_boto, t_ours))
        resent, parts = resent_after_kill(server, bucket, video, args.part_mb, tmp / f"{name}-kill.db")
    finally:
        server.stop()
    ratios = sorted(b[0] / o[0] for b, o in rounds)
    cpu = sorted(o[1] / b[1] for b, o in rounds)
    print(f"{name}: boto3 upload_file {size_mb / min(b[0] for b, _ in rounds):6.1f} MiB/s, "
          f"ours {size_mb / min(o[0] for _, o in rounds):6.1f} MiB/s (best of {args.rounds}); client CPU per GiB: "
          f"boto3 {statistics.median(b[1] for b, _ in rounds) * 1024 / size_mb:.2f} s, "
          f"ours {statistics.median(o[1] for _, o in rounds) * 1024 / size_mb:.2f} s")
    print(f"{name}: speed ours/boto3 per round {' '.join(f'{r:.2f}' for r in ratios)} "
          f"(median {statistics.median(ratios):.2f}, spread {ratios[0]:.2f}-{ratios[-1]:.2f}; goal >= 1.0)")
    print(f"{name}: client CPU ours/boto3 per round {' '.join(f'{r:.2f}' for r in cpu)} "
          f"(median {statistics.median(cpu):.2f}; goal <= 1.1)")
    print(f"{name}: SIGKILL half way + resume: {resent / MiB:.0f} MiB sent twice ({parts} part(s); goal: at most one)")


def main() -> None:
    if sys.argv[1:2] == ["--child"]:
        child(*sys.argv[2:4], sys.argv[4], int(sys.argv[5]), sys.argv[6], sys.argv[7])
        return
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=float, default=1024)
    ap.add_argument("--part-mb", type=int, default=S3().part_size_mb)
    ap.add_argument("--part-concurrency", type=int, default=S3().part_concurrency,
                    help="parts of the file in flight on both sides (default: the daemon's s3.part_concurrency)")
    ap.add_argument("--rounds", type=int, default=3, help="boto3/ours pairs per server")
    ap.add_argument("--server", nargs="+", choices=sorted(SERVERS), default=["nanio"])
    args = ap.parse_args()
    os.environ.update(credentials_env())
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        video = write_noise_video(tmp / "big.mp4", args.mb)
        print(f"file: {video.stat().st_size / MiB:.0f} MiB real MP4, parts of {args.part_mb} MiB "
              f"({args.part_concurrency} in flight on both sides), {os.cpu_count()} CPUs, "
              f"load {os.getloadavg()[0]:.1f}")
        for name in args.server:
            one_server(name, video, tmp, args)


if __name__ == "__main__":
    main()
