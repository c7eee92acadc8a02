#!/usr/bin/env python3
"""A stand-in for an external lip-sync CLI (the `command` engine's tests run it for real).

    fake_lipsync.py --audio A --portrait P --output O [--fps N] [--height H]

It builds a real MP4 (H.264 + AAC) from the portrait and the audio with PyAV, printing `NN%` progress
separated by carriage returns, as such tools do. What it does wrong is chosen by a word in the audio's
file name, so one configured daemon can exercise every outcome: `crash` (traceback, exit 1), `diehost` (SIGKILLs
the process that started it, as a native crash of the engine's host process would end it),
`badinput` (message, exit 3), `hang` (starts a helper process, writes its pid beside the output, then
sleeps), `notmp4` (writes text), `slow` (waits $FAKE_SLOW_SECONDS, or until the file named by $FAKE_RELEASE_FILE
exists so a test decides when it goes on, reporting 5% each second meanwhile), `noaudio` (an MP4 without sound),
`env` (writes the names of its HEYGEM_* and FAKE_* environment variables beside the output).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from fractions import Fraction
from pathlib import Path


def die_with_host() -> None:
    """`diehost`: a native crash of the process that runs the engine (a CUDA fault, the OOM killer), at once,
    before the slow imports below (a remote worker beats only on the tool's output)."""
    audio = sys.argv[sys.argv.index("--audio") + 1] if "--audio" in sys.argv[:-1] else ""
    if "diehost" in Path(audio).stem.lower():
        os.kill(os.getppid(), signal.SIGKILL)
        sys.exit(9)


die_with_host()

import av  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

AUDIO_RATE = 48000
IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".webp"}


def portrait_frame(path: Path, height: int) -> np.ndarray:
    if path.suffix.lower() in IMAGE_EXTS:
        image = Image.open(path).convert("RGB")
    else:
        with av.open(str(path)) as c:
            image = next(c.decode(video=0)).to_image()
    width = max(2, round(image.width * height / image.height / 2) * 2)
    return np.asarray(image.resize((width, height)))


def audio_samples(path: Path) -> np.ndarray:
    resampler = av.AudioResampler(format="fltp", layout="mono", rate=AUDIO_RATE)
    with av.open(str(path)) as c:
        chunks = [f.to_ndarray() for frame in c.decode(audio=0) for f in resampler.resample(frame)]
    return np.concatenate(chunks, axis=1)


def hold(seconds: float, release: str | None) -> None:
    """Wait `seconds`, or less once the file `release` names exists; say 5% each second, as a working tool
    would (the daemon stores progress at most twice a second, so a single line could go unrecorded)."""
    deadline = time.monotonic() + seconds
    said = 0.0
    while time.monotonic() < deadline and not (release and os.path.exists(release)):
        if time.monotonic() - said >= 1.0:
            print("rendering 5%", flush=True)
            said = time.monotonic()
        time.sleep(0.05)


def make_mp4(args: argparse.Namespace, with_audio: bool) -> None:
    picture = portrait_frame(args.portrait, args.height)
    sound = audio_samples(args.audio)
    count = max(1, round(sound.shape[1] / AUDIO_RATE * args.fps))
    with av.open(str(args.output), "w", format="mp4") as out:
        video = out.add_stream("libx264", rate=args.fps, options={"preset": "ultrafast"})
        video.width, video.height, video.pix_fmt = picture.shape[1], picture.shape[0], "yuv420p"
        audio = out.add_stream("aac", rate=AUDIO_RATE, layout="mono") if with_audio else None
        for i in range(count):
            frame = av.VideoFrame.from_ndarray(picture, format="rgb24")
            frame.pts = i
            out.mux(video.encode(frame))
            if i % 5 == 0:
                print(f"\rrendering {100 * i // count}%", end="", flush=True)
        out.mux(video.encode(None))
        if audio is not None:
            frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(sound), format="fltp", layout="mono")
            frame.sample_rate, frame.time_base, frame.pts = AUDIO_RATE, Fraction(1, AUDIO_RATE), 0
            out.mux(audio.encode(frame))
            out.mux(audio.encode(None))
    print("\rrendering 100%\ndone", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--audio", type=Path, required=True)
    parser.add_argument("--portrait", type=Path, required=True)
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--fps", type=int, default=25)
    parser.add_argument("--height", type=int, default=240)
    args = parser.parse_args()
    mode = args.audio.stem.lower()
    print(f"loading models for {args.audio.name}", flush=True)
    if "crash" in mode:
        print("step 1 of 3 ok", flush=True)
        return int(1 / 0)
    if "badinput" in mode:
        print(f"error: no face detected in {args.portrait.name}", file=sys.stderr, flush=True)
        return 3
    if "hang" in mode:
        helper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        (args.output.parent / "helper.pid").write_text(str(helper.pid))
        print("working", flush=True)
        time.sleep(600)
    if "slow" in mode:
        hold(float(os.environ.get("FAKE_SLOW_SECONDS", "3")), os.environ.get("FAKE_RELEASE_FILE"))
    if "notmp4" in mode:
        args.output.write_text("this is not a video\n")
        return 0
    if "env" in mode:
        names = sorted(k for k in os.environ if k.startswith(("HEYGEM_", "FAKE_")))
        (args.output.parent / "env.json").write_text(json.dumps(names))
    make_mp4(args, with_audio="noaudio" not in mode)
    return 0


if __name__ == "__main__":
    sys.exit(main())
