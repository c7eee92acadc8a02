"""Benchmark speech ahead of the renders: N script tasks, each needing T_tts seconds of a TTS service (the
stand-in, one request at a time) and T_render seconds of a render slot (the `command` engine running a
tool that sleeps, then hands over a ready MP4), through the real store, life cycle, a real render slot
with its worker process and the speech slot (`SpeechAhead`).

Prints the total time with speech ahead (`speech.ahead_slots: 1`) and without (`0`: each render slot speaks
its task's script before rendering it, the baseline), each against the render-bound ideal
(T_tts + N x T_render: only the first script's speech cannot overlap a render), and the render slot's
idle share (time it spent speaking or waiting for speech / total).

    .venv/bin/python bench/speech.py                         # 8 tasks, TTS 1 s, render 1.5 s
    .venv/bin/python bench/speech.py --tasks 20 --tts 2 --render 3   # the issue's shape (about 2.5 min)
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # the stand-in and rigs live with the tests

from media_factory import PORTRAIT_JPG, write_speech_wav  # noqa: E402
from test_speech_ahead import queued_scripts  # noqa: E402
from tts_standin import TtsStandin  # noqa: E402

from heygem_daemon.config import load_config  # noqa: E402
from heygem_daemon.generation.lifecycle import LifeCycle  # noqa: E402
from heygem_daemon.generation.speech_ahead import SpeechAhead  # noqa: E402
from heygem_daemon.generation.workers import Slot  # noqa: E402
from heygem_daemon.state import Store  # noqa: E402


def ready_mp4(folder: Path) -> Path:
    """One real MP4 (H.264 + AAC) that every render hands over after its sleep."""
    wav = write_speech_wav(folder / "v.wav", 1.0)
    out = folder / "ready.mp4"
    subprocess.run([sys.executable, str(ROOT / "tests" / "tools" / "fake_lipsync.py"), "--audio", str(wav),
                    "--portrait", str(PORTRAIT_JPG), "--output", str(out), "--fps", "10", "--height", "128"],
                   check=True, capture_output=True)
    return out


def run(tasks: int, tts: float, render: float, ahead: int, mp4: Path) -> tuple[float, float]:
    """Total seconds for `tasks` script tasks, and the render slot's busy-rendering seconds."""
    standin = TtsStandin().start()
    standin.seconds_per_request = tts
    base = Path(tempfile.mkdtemp(prefix="bench-speech-"))
    try:
        (base / "config.yaml").write_text(f"""
base_dir: {base}
engine: {{name: command}}
engines: {{command: {{args: [sh, -c, 'sleep "$0"; cp "$1" "$2"', "{render}", "{mp4}", "{{output}}"]}}}}
speech: {{engine: heygem-tts, ahead_slots: {ahead}, engines: {{heygem-tts: {{services: [{standin.url}]}}}}}}
workers: {{devices: [cpu], per_device: 1}}
""")
        cfg = load_config(base / "config.yaml", environ={})
        for name in ("work", "outputs", "state", "archive", "failed"):
            cfg.folder(name).mkdir(exist_ok=True)
        store = Store(cfg.folder("state") / "heygem.db")
        life = LifeCycle(cfg, store)
        # Each script a different sentence of the same length: every one must be spoken.
        queued_scripts(life, [f"Welcome aboard, colleague number {i:03d}." for i in range(tasks)])
        stop, wake, hold = threading.Event(), threading.Event(), threading.Event()
        slot = Slot(cfg, life, "cpu", 0, wake, stop, {"command": dict(cfg.engines["command"])}, hold)
        speech = SpeechAhead(cfg, life) if ahead else None
        started = time.monotonic()
        if speech:
            speech.start()
        slot.start()
        while store.tasks.counts().get("done", 0) < tasks:
            if store.tasks.counts().get("failed", 0):
                raise SystemExit(f"a task failed: {store.tasks.select(states=('failed',))[0].last_error}")
            time.sleep(0.05)
        total = time.monotonic() - started
        stop.set()
        wake.set()
        slot.join(10)
        if speech:
            speech.stop()
        store.close()
        return total, tasks * render
    finally:
        standin.stop()
        shutil.rmtree(base, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", type=int, default=8)
    ap.add_argument("--tts", type=float, default=1.0, help="seconds the TTS service takes per script")
    ap.add_argument("--render", type=float, default=1.5, help="seconds a render takes")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        mp4 = ready_mp4(Path(tmp))
        ideal = args.tts + args.tasks * args.render
        print(f"{args.tasks} script tasks, TTS {args.tts:g} s, render {args.render:g} s, 1 render slot, "
              f"1 TTS service; render-bound ideal {ideal:.1f} s")
        results = {}
        for ahead in (0, 1):
            total, rendering = run(args.tasks, args.tts, args.render, ahead, mp4)
            results[ahead] = total
            label = "speech ahead (1 speech slot)" if ahead else "baseline: speech in the render slot"
            print(f"  {label:38s} {total:6.1f} s  {total / ideal:5.2f}x ideal  "
                  f"render slot idle {1 - rendering / total:5.1%}")
        print(f"  speech ahead / baseline: {results[1] / results[0]:.2f}x")


if __name__ == "__main__":
    main()
