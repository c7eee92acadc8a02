"""Benchmark `workers.remote.transfer: s3`: how long other tasks wait to be sent while the daemon downloads a
big finished video, with the transfers on their own threads (this tree) against the same run with the code of
`--baseline` (default: the commit before they left the dispatch loop), checked out into a temp folder.

Each run, on one real moto S3 server (behind a real HTTP proxy that answers at `--link-mb-s`, the daemon's
link; localhost would be unrealistically fast) and one real redis-server: a task is sent and reported finished
with a `--mb` video at its key, then a job of `--others` tasks is queued and the dispatcher's loop starts; the
time from that start to each other task's message reaching Redis is its dispatch latency. Also printed: the bytes
the daemon itself sends per video with transfer s3 (task message, staged inputs) against transfer shared
(task message, then the video uploaded by delivery).

    .venv/bin/python bench/remote_transfer.py                  # 200 MB video over 100 MB/s, 4 other tasks
    .venv/bin/python bench/remote_transfer.py --mb 50 --link-mb-s 0   # no link limit
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BASELINE = "6a3f984"
"""The last commit whose dispatcher staged inputs and downloaded videos inside its loop."""
BIG_KEY = "bench/big.mp4"


def measure(args: argparse.Namespace) -> dict[str, object]:
    """One run with whatever `heygem_daemon` is on sys.path (this tree's or the baseline's)."""
    import redis as redis_client
    from test_job_lifecycle import claimed

    from heygem_daemon.config import load_config
    from heygem_daemon.generation.lifecycle import LifeCycle
    from heygem_daemon.generation.remote import RemoteDispatcher
    from heygem_daemon.log import setup_logging
    from heygem_daemon.ops import metrics
    from heygem_daemon.state import Store

    setup_logging(None, "warning")
    base = Path(args.base)
    s3 = {"bucket": args.bucket, "endpoint_url": args.endpoint, "region": "us-east-1", "addressing_style": "path"}

    def dispatcher(folder: str, transfer: str, queue: str, in_flight: int) -> RemoteDispatcher:
        (base / folder).mkdir()
        (base / folder / "config.yaml").write_text(json.dumps({
            "base_dir": str(base / folder), "s3": s3, "workers": {"devices": [], "remote": {
                "broker_url": args.redis, "queues": {queue: in_flight}, "transfer": transfer, "poll_seconds": 0.05}}}))
        cfg = load_config(base / folder / "config.yaml", environ={})
        return RemoteDispatcher(cfg, LifeCycle(cfg, Store(cfg.folder("state") / "heygem.db")))

    def sent(remote: RemoteDispatcher, queue: str) -> None:
        while not remote.flights[queue] or not all(f.celery_id for f in remote.flights[queue]):
            remote.step()
            time.sleep(0.01)

    broker = redis_client.Redis.from_url(args.redis)
    remote = dispatcher("s3", "s3", args.queue, args.others + 1)
    claimed(remote.life, "big", media=True)
    sent(remote, args.queue)
    (big,) = remote.flights[args.queue]
    key = remote.store.tasks.get(big.task.id).object_key
    assert remote.transfer is not None
    remote.transfer.client.copy_object(Bucket=args.bucket, Key=key, CopySource={"Bucket": args.bucket, "Key": BIG_KEY})
    remote.app.backend.store_result(big.celery_id, {"ok": True, "key": key, "sha256": args.sha256}, "SUCCESS")
    uploaded = metrics.BYTES_UPLOADED._value.get()
    job = claimed(remote.life, "others", pairs=args.others, media=True)
    messages = broker.llen(args.queue)
    sends: list[float] = []
    loop = threading.Thread(target=remote._run, daemon=True)
    began = time.perf_counter()
    loop.start()
    downloaded = None
    while len(sends) < args.others or downloaded is None:
        now = broker.llen(args.queue)
        sends += [time.perf_counter() - began] * (now - messages)
        messages = now
        if downloaded is None and remote.store.tasks.get(big.task.id).state == "done":
            downloaded = time.perf_counter() - began
        assert time.perf_counter() - began < 600, "the run took over 10 minutes"
        time.sleep(0.002)
    remote.stop_event.set()
    remote.wake.set()
    loop.join(60)
    sizes = [len(m) for m in broker.lrange(args.queue, 1, -1)]  # the other tasks' messages (LPUSH: newest first)
    shared = dispatcher("shared", "shared", "shared-" + args.queue, 1)
    claimed(shared.life, "shared", media=True)
    sent(shared, "shared-" + args.queue)
    return {"sends": sends, "download_s": downloaded, "message_s3": statistics.mean(sizes),
            "staged_per_video": (metrics.BYTES_UPLOADED._value.get() - uploaded) / args.others,
            "message_shared": len(broker.lrange("shared-" + args.queue, 0, 0)[0]),
            "tasks": len(remote.store.tasks.select(job.id))}


def checkout(ref: str, into: Path) -> Path:
    """`heygem_daemon` as it was at `ref`, read from git (no work tree touched)."""
    archive = into / "baseline.tar"
    with open(archive, "wb") as out:
        subprocess.run(["git", "-C", str(ROOT), "archive", ref, "heygem_daemon"], stdout=out, check=True)
    with tarfile.open(archive) as tar:
        tar.extractall(into / "baseline", filter="data")
    return into / "baseline"


def run(code: Path, args: argparse.Namespace, base: Path, queue: str) -> dict[str, object]:
    argv = [sys.executable, __file__, "--measure", "--base", str(base), "--queue", queue, "--others", str(args.others),
            "--bucket", args.bucket, "--endpoint", args.endpoint, "--redis", args.redis, "--sha256", args.sha256]
    env = {**os.environ, "PYTHONPATH": f"{code}:{ROOT / 'tests'}"}
    base.mkdir()
    done = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
    if done.returncode:
        raise SystemExit(f"run with {code} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=int, default=200, help="size of the finished video downloaded meanwhile")
    parser.add_argument("--others", type=int, default=4, help="tasks waiting to be sent meanwhile")
    parser.add_argument("--link-mb-s", type=float, default=100.0, help="the daemon's link to S3 (0: unlimited)")
    parser.add_argument("--baseline", default=BASELINE, help="git ref of the code to compare with")
    for internal in ("--base", "--queue", "--bucket", "--endpoint", "--redis", "--sha256"):
        parser.add_argument(internal, help=argparse.SUPPRESS)
    parser.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args)))
        return 0
    sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
    from remote_rig import RedisServer
    from s3_server import LimitedProxy, MotoServer, credentials_env

    os.environ.update(credentials_env())
    with tempfile.TemporaryDirectory(prefix="heygem-bench-transfer-") as tmp:
        root = Path(tmp)
        moto = MotoServer(root / "moto.log").start()
        redis = RedisServer(root / "redis").start()
        link = LimitedProxy(moto, lacking=(), answer_mb_s=args.link_mb_s).start()
        try:
            args.bucket, args.endpoint, args.redis = moto.new_bucket(), link.endpoint, redis.url
            big = root / "big.mp4"
            with open(big, "wb") as out:
                for _ in range(args.mb):
                    out.write(os.urandom(1024 * 1024))
            args.sha256 = hashlib.sha256(big.read_bytes()).hexdigest()
            moto.client().upload_file(str(big), args.bucket, BIG_KEY)
            big.unlink()
            before = run(checkout(args.baseline, root), args, root / "before", "before")
            after = run(ROOT, args, root / "after", "after")
        finally:
            link.stop()
            redis.stop()
            moto.stop()
    print(f"dispatch latency of {args.others} other tasks while a {args.mb} MB video is downloaded at "
          f"{args.link_mb_s:g} MB/s (from the loop's start to each task's message in Redis)")
    print(f"{'code':>24} {'median s':>9} {'max s':>7} {'download s':>11}")
    for name, r in ((f"before ({args.baseline})", before), ("after (transfer threads)", after)):
        print(f"{name:>24} {statistics.median(r['sends']):>9.3f} {max(r['sends']):>7.3f} {r['download_s']:>11.2f}")
    ratio = statistics.median(before["sends"]) / statistics.median(after["sends"])
    print(f"median latency before / after: {ratio:.1f}x")
    video = args.mb * 1024 * 1024
    s3_bytes = after["message_s3"] + after["staged_per_video"]
    shared_bytes = after["message_shared"] + video
    print(f"\nbytes the daemon sends per video ({args.mb} MB video, inputs shared by the job's {args.others} tasks):")
    print(f"  transfer s3:     {s3_bytes / 1024:>10.1f} KiB  (task message {after['message_s3']:.0f} B + inputs staged "
          f"{after['staged_per_video']:.0f} B; the worker uploads the video)")
    print(f"  transfer shared: {shared_bytes / 1024:>10.1f} KiB  (task message {after['message_shared']:.0f} B + the "
          f"video uploaded by delivery; inputs and video cross the share besides)")
    print(f"  shared / s3: {shared_bytes / s3_bytes:.0f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
