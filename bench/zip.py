"""Benchmark the batch zip: our streaming stored zip vs zipfile ZIP_DEFLATED vs a plain copy of the same MP4s.

Each variant runs in its own process writing into a stream that cannot seek (a pipe-like wrapper around
a file), so the peak RSS printed is that variant's alone. Goals: stored >= 5x faster than deflate,
within 1.3x of a plain copy, peak RSS under 100 MB whatever the batch size.

With --s3, the zip streamed into a local nanio server as the daemon sends it (StreamUpload: parts of
s3.part_size_mb, s3.part_concurrency in flight) against `zip -0 - FILES | aws s3 cp - s3://...`, the AWS
CLI once with its defaults (8 MiB parts, 10 in flight) and once with our part size and parts in flight,
in alternating rounds, each in its own process; prints each round's times and the median ratios
ours/CLI (goal <= 1.1x). Needs `zip` and `aws` on PATH.

    .venv/bin/python bench/zip.py [--mb 1024] [--files 16] [--s3 [--rounds 3]]
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import BinaryIO

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from heygem_daemon.delivery.zipper import COPY_BUFFER, write_zip  # noqa: E402


class Unseekable:
    """Write-only, no tell/seek: what an S3 multipart stream looks like to zipfile."""

    def __init__(self, fh: BinaryIO) -> None:
        self._fh = fh

    def write(self, data: bytes) -> int:
        return self._fh.write(data)

    def flush(self) -> None:
        self._fh.flush()


def run_variant(mode: str, files: list[Path], out: Path) -> None:
    start = time.perf_counter()
    with open(out, "wb") as raw:
        sink = Unseekable(raw)
        if mode == "stored":
            write_zip([(f, f.name) for f in files], sink)  # type: ignore[arg-type]
        elif mode == "deflate":
            with zipfile.ZipFile(sink, "w", compression=zipfile.ZIP_DEFLATED) as zf:  # type: ignore[arg-type]
                for f in files:
                    with open(f, "rb") as src, zf.open(f.name, "w") as dst:
                        shutil.copyfileobj(src, dst, COPY_BUFFER)
        else:
            for f in files:
                with open(f, "rb") as src:
                    shutil.copyfileobj(src, sink, COPY_BUFFER)  # type: ignore[misc]
    seconds = time.perf_counter() - start
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over exec from the (bigger) parent.
    hwm_kb = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
    rss_mb = hwm_kb / 1024
    print(json.dumps({"seconds": seconds, "rss_mb": rss_mb, "bytes": out.stat().st_size}))


def run_s3_variant(endpoint: str, bucket: str, key: str, part_mb: int, concurrency: int, files: list[Path]) -> None:
    import threading

    from heygem_daemon.delivery.s3 import MiB, StreamUpload, Throttle, make_client
    from heygem_daemon.config import S3

    start = time.perf_counter()
    client = make_client(S3(bucket=bucket, endpoint_url=endpoint, region="us-east-1", addressing_style="path"))
    stream = StreamUpload(client, bucket, key, part_mb * MiB, Throttle(0), threading.Event(), lambda _: None,
                          key, concurrency)
    write_zip([(f, f.name) for f in files], stream)  # type: ignore[arg-type]
    stream.finish()
    print(json.dumps({"seconds": time.perf_counter() - start}))


def s3_rounds(files: list[Path], tmp: Path, rounds: int) -> None:
    import os
    import statistics

    from heygem_daemon.config import S3
    from s3_server import NanioServer, credentials_env

    part_mb, concurrency = S3().part_size_mb, S3().part_concurrency
    same = tmp / "aws-same"  # the CLI with our part size and parts in flight
    same.write_text(f"[default]\nregion = us-east-1\ns3 =\n  multipart_chunksize = {part_mb}MB\n"
                    f"  max_concurrent_requests = {concurrency}\n  addressing_style = path\n")
    defaults = tmp / "aws-defaults"  # the CLI as installed: 8 MiB parts, 10 in flight
    defaults.write_text("[default]\nregion = us-east-1\ns3 =\n  addressing_style = path\n")
    env = {**os.environ, **credentials_env()}
    server = NanioServer(tmp / "nanio.log").start()
    try:
        bucket = server.new_bucket()
        names = " ".join(shlex.quote(str(f)) for f in files)
        cli = f"zip -q -0 -j - {names} | aws s3 cp --endpoint-url {server.endpoint} - s3://{bucket}/cli.zip"
        ratios: dict[str, list[float]] = {"defaults": [], "same settings": []}
        for i in range(rounds):
            took = {}
            for label, config in (("defaults", defaults), ("same settings", same)):
                start = time.perf_counter()
                subprocess.run(cli, shell=True, check=True, env={**env, "AWS_CONFIG_FILE": str(config)})
                took[label] = time.perf_counter() - start
            proc = subprocess.run([sys.executable, __file__, "--s3-variant", server.endpoint, bucket, f"ours{i}.zip",
                                   str(part_mb), str(concurrency), *map(str, files)],
                                  capture_output=True, text=True, check=True, env=env)
            ours = json.loads(proc.stdout.strip().splitlines()[-1])["seconds"]
            for label, theirs in took.items():
                ratios[label].append(ours / theirs)
            print(f"round {i + 1}: zip -0 | aws s3 cp - {took['defaults']:6.2f} s (CLI defaults), "
                  f"{took['same settings']:6.2f} s (our part size and parts in flight); ours {ours:6.2f} s")
    finally:
        server.stop()
    for label, values in ratios.items():
        print(f"streamed zip to S3, ours / CLI with {label}: median {statistics.median(values):.2f}x "
              f"(rounds {min(values):.2f}-{max(values):.2f}; goal <= 1.1x)")
    print(f"ours: parts of {part_mb} MiB, {concurrency} in flight")


def measure(mode: str, files: list[Path], out: Path) -> dict[str, float]:
    proc = subprocess.run([sys.executable, __file__, "--variant", mode, str(out), *map(str, files)],
                          capture_output=True, text=True, check=True)
    out.unlink()
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    if sys.argv[1:2] == ["--variant"]:
        run_variant(sys.argv[2], [Path(p) for p in sys.argv[4:]], Path(sys.argv[3]))
        return
    if sys.argv[1:2] == ["--s3-variant"]:
        endpoint, bucket, key, part_mb, concurrency, *paths = sys.argv[2:]
        run_s3_variant(endpoint, bucket, key, int(part_mb), int(concurrency), [Path(p) for p in paths])
        return
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=float, default=1024)
    ap.add_argument("--files", type=int, default=16)
    ap.add_argument("--s3", action="store_true", help="the zip streamed into S3 against zip -0 | aws s3 cp -")
    ap.add_argument("--rounds", type=int, default=3, help="with --s3: CLI/ours pairs")
    args = ap.parse_args()
    from media_factory import write_noise_video  # only here: the measured children stay free of numpy/av

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        one = write_noise_video(tmp / "v0.mp4", args.mb / args.files)
        files = [one] + [shutil.copyfile(one, tmp / f"v{i}.mp4") for i in range(1, args.files)]
        total = sum(f.stat().st_size for f in files) / 2**20
        if args.s3:
            print(f"{args.files} real MP4s, {total:.0f} MiB in all")
            s3_rounds(files, tmp, args.rounds)
            return
        measure("copy", files, tmp / "warm.bin")  # page cache warm for everyone
        results = {mode: measure(mode, files, tmp / f"{mode}.out") for mode in ("copy", "stored", "deflate")}
    print(f"{args.files} real MP4s, {total:.0f} MiB in all")
    for mode, r in results.items():
        print(f"{mode:<8} {total / r['seconds']:8.1f} MiB/s  peak RSS {r['rss_mb']:6.1f} MB")
    print(f"stored vs deflate: {results['deflate']['seconds'] / results['stored']['seconds']:.1f}x faster (goal >= 5x)")
    ratio = results['stored']['seconds'] / results['copy']['seconds']
    print(f"stored vs copy:    {ratio:.2f}x the time (goal <= 1.3x)")


if __name__ == "__main__":
    main()
