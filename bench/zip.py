"""Benchmark the batch zip: our streaming stored zip vs zipfile ZIP_DEFLATED vs a plain copy of the same MP4s.

Each variant runs in its own process writing into a stream that cannot seek (a pipe-like wrapper around
a file), so the peak RSS printed is that variant's alone. Goals: stored >= 5x faster than deflate,
within 1.3x of a plain copy, peak RSS under 100 MB whatever the batch size.

    .venv/bin/python bench/zip.py [--mb 1024] [--files 16]
"""

from __future__ import annotations

import argparse
import json
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


def measure(mode: str, files: list[Path], out: Path) -> dict[str, float]:
    proc = subprocess.run([sys.executable, __file__, "--variant", mode, str(out), *map(str, files)],
                          capture_output=True, text=True, check=True)
    out.unlink()
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    if sys.argv[1:2] == ["--variant"]:
        run_variant(sys.argv[2], [Path(p) for p in sys.argv[4:]], Path(sys.argv[3]))
        return
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=float, default=1024)
    ap.add_argument("--files", type=int, default=16)
    args = ap.parse_args()
    from media_factory import write_noise_video  # only here: the measured children stay free of numpy/av

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        one = write_noise_video(tmp / "v0.mp4", args.mb / args.files)
        files = [one] + [shutil.copyfile(one, tmp / f"v{i}.mp4") for i in range(1, args.files)]
        total = sum(f.stat().st_size for f in files) / 2**20
        measure("copy", files, tmp / "warm.bin")  # page cache warm for everyone
        results = {mode: measure(mode, files, tmp / f"{mode}.out") for mode in ("copy", "stored", "deflate")}
    print(f"{args.files} real MP4s, {total:.0f} MiB in all")
    for mode, r in results.items():
        print(f"{mode:<8} {total / r['seconds']:8.1f} MiB/s  peak RSS {r['rss_mb']:6.1f} MB")
    print(f"stored vs deflate: {results['deflate']['seconds'] / results['stored']['seconds']:.1f}x faster (goal >= 5x)")
    print(f"stored vs copy:    {results['stored']['seconds'] / results['copy']['seconds']:.2f}x the time (goal <= 1.3x)")


if __name__ == "__main__":
    main()
