"""Benchmark the wav2lip engine against a serial pipeline of the same model shaped like the reference.

Both run in this process on the same inputs (synthesised speech, a portrait video made from the test
photo, random weights in the released format unless --checkpoint is given), with the model already
loaded. The serial baseline does what the reference inference script does: every portrait frame in
memory, detect on all of them, all crops in memory, the model in batches of 128 (plain fp32 module),
frames pasted and written to an AVI (MPEG-4 part 2, as the reference's DIVX), then the AVI decoded
and encoded again with the audio into the MP4. Prints frames/s of both and the ratio.

    .venv/bin/python bench/wav2lip.py                          # CPU, 20 s of speech at 480p
    .venv/bin/python bench/wav2lip.py --device cuda --fp16 --seconds 60 --preset 720p
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

import av
import cv2
import numpy as np
import psutil
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # media_factory lives with the tests

from heygem_daemon.config import DEFAULT_PRESETS, Preset  # noqa: E402
from heygem_daemon.engines.base import TaskSpec  # noqa: E402
from heygem_daemon.engines.wav2lip.audio_features import chunks_at, melspectrogram  # noqa: E402
from heygem_daemon.engines.wav2lip.boxes import MISSING, finish_boxes  # noqa: E402
from heygem_daemon.engines.wav2lip.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from heygem_daemon.engines.wav2lip.engine import Wav2LipEngine  # noqa: E402
from heygem_daemon.engines.wav2lip.face_batch import prepare_faces, to_frames  # noqa: E402
from heygem_daemon.engines.wav2lip.model import Wav2Lip  # noqa: E402
from heygem_daemon.engines.wav2lip.render import frame_starts  # noqa: E402
from heygem_daemon.engines.wav2lip.runtime import Predictor  # noqa: E402
from heygem_daemon.media.audio import load_clip, load_mono  # noqa: E402
from heygem_daemon.media.faces import detect_face  # noqa: E402
from heygem_daemon.media.frames import open_portrait  # noqa: E402
from heygem_daemon.media.writer import Mp4Writer  # noqa: E402
from media_factory import PORTRAIT_JPG, video_facts, write_portrait_video, write_speech_wav  # noqa: E402

REFERENCE_BATCH = 128


class PeakRss:
    """Largest growth of this process's resident memory while running (sampled every 20 ms)."""

    def __init__(self) -> None:
        self.process = psutil.Process()
        self.start = self.peak = self.process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self.process.memory_info().rss)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def __str__(self) -> str:
        return f"peak RSS +{(self.peak - self.start) / 2**20:.0f} MiB"


class GpuSampler:
    """GPU utilisation (%) from nvidia-smi every half second while running; empty without a GPU."""

    def __init__(self, device: torch.device) -> None:
        self.samples: list[float] = []
        self.index = str(device.index or 0)
        self.enabled = device.type == "cuda" and shutil.which("nvidia-smi") is not None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            out = subprocess.run(["nvidia-smi", "-i", self.index, "--query-gpu=utilization.gpu",
                                  "--format=csv,noheader,nounits"], capture_output=True, text=True)
            if out.returncode == 0 and out.stdout.strip():
                self.samples.append(float(out.stdout.split()[0]))

    def __enter__(self) -> GpuSampler:
        if self.enabled:
            self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        if self.enabled:
            self._thread.join()

    def summary(self) -> str:
        return f", GPU busy {np.mean(self.samples):.0f}% (mean of {len(self.samples)} samples)" if self.samples else ""


def serial_reference(task: TaskSpec, model: Wav2Lip, device: torch.device, half: torch.dtype | None,
                     settings: Wav2LipEngine.Settings) -> tuple[float, dict[str, float]]:
    """The reference's shape, stage after stage; returns wall seconds and seconds per stage."""
    spent: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(stage: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        spent[stage] = now - clock
        clock = now

    start = clock
    fps = task.preset.fps
    portrait = open_portrait(task.portrait, task.preset.height, task.workdir)
    frames = [np.array(portrait.frame(k)) for k in range(portrait.count)]  # whole video in memory
    lap("read frames")
    raw = np.full((len(frames), 4), MISSING, np.int32)
    for k, frame in enumerate(frames):
        if (box := detect_face(frame)) is not None:
            raw[k] = (box.x, box.y, box.w, box.h)
    boxes = finish_boxes(raw, portrait.size, settings.pads, settings.smooth_frames)
    assert boxes is not None
    lap("detect all frames")
    mono = load_mono(task.audio)
    starts = frame_starts(len(mono), fps)
    mels = chunks_at(melspectrogram(mono), starts)  # every chunk at once
    sources = [portrait.index_for_output(i, fps) for i in range(len(starts))]
    crops = np.stack([cv2.resize(frames[k][y1:y2, x1:x2], (96, 96))
                      for k in sources for x1, y1, x2, y2 in [boxes[k]]])
    lap("mel + all crops")
    avi = task.workdir / "result.avi"
    width, height = portrait.size
    infer_s = 0.0
    with av.open(str(avi), "w", format="avi") as out:
        stream = out.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"qscale": "2"}
        for first in range(0, len(starts), REFERENCE_BATCH):
            t0 = time.perf_counter()
            with torch.inference_mode(), torch.autocast(device.type, dtype=half or torch.float32,
                                                         enabled=half is not None):
                faces = prepare_faces(crops[first : first + REFERENCE_BATCH], device=device)
                pred = to_frames(model(mels[first : first + REFERENCE_BATCH].to(device), faces)).cpu().numpy()
            infer_s += time.perf_counter() - t0
            for j, mouth in enumerate(pred):
                k = sources[first + j]
                x1, y1, x2, y2 = boxes[k]
                frame = frames[k].copy()
                frame[y1:y2, x1:x2] = cv2.resize(mouth, (int(x2 - x1), int(y2 - y1)))
                out.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="bgr24")))
        out.mux(stream.encode(None))
    lap("model + paste + AVI")
    spent["  of which model"] = infer_s
    with av.open(str(avi)) as src, Mp4Writer(task.output, width, height, fps, task.preset.video_bitrate,
                                             load_clip(task.audio), task.preset.audio_bitrate,
                                             task.x264_preset) as writer:
        for frame in src.decode(video=0):
            writer.write(frame.to_ndarray(format="bgr24"))
    lap("re-encode with audio")
    return time.perf_counter() - start, spent


def _task(tmp: Path, label: str, audio: Path, portrait: Path, preset: Preset, device: str) -> TaskSpec:
    work = tmp / label / "job" / "task-1"  # a fresh box cache per run: the engine detects too
    work.mkdir(parents=True)
    return TaskSpec(1, "bench", label, audio, portrait, tmp / f"{label}.mp4", work, preset, device=device)


def half_vs_full(predictor: Predictor, full: Predictor, portrait: Path, audio: Path, preset: Preset,
                 tmp: Path) -> float:
    """Mean absolute difference (0..255) of the mouths the model makes in half and in full precision."""
    frames = open_portrait(portrait, preset.height, tmp)
    box = detect_face(np.array(frames.frame(0)))
    assert box is not None
    crop = cv2.resize(np.array(frames.frame(0))[box.y : box.y + box.h + 10, box.x : box.x + box.w], (96, 96))
    mono = load_mono(audio)
    starts = frame_starts(len(mono), preset.fps)[:REFERENCE_BATCH]
    mels = chunks_at(melspectrogram(mono), starts).to(predictor.device)
    crops = torch.from_numpy(np.ascontiguousarray(np.broadcast_to(crop, (len(starts), 96, 96, 3))))
    a, b = predictor(crops, mels).astype(np.int16), full(crops, mels).astype(np.int16)
    return float(np.abs(a - b).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20.0, help="length of the speech")
    parser.add_argument("--preset", default="480p", choices=sorted(DEFAULT_PRESETS))
    parser.add_argument("--portrait", default="video", choices=["video", "still"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--fp16", action="store_true", help="half precision (bfloat16 on CPU) for both pipelines")
    parser.add_argument("--checkpoint", type=Path, help="real weights (default: random weights, same speed)")
    args = parser.parse_args()
    preset = DEFAULT_PRESETS[args.preset]
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        audio = write_speech_wav(tmp / "speech.wav", args.seconds)
        portrait = PORTRAIT_JPG if args.portrait == "still" else write_portrait_video(tmp / "portrait.mp4", 4.0)
        checkpoint = args.checkpoint or save_checkpoint(Wav2Lip(), tmp / "wav2lip.pth")
        settings = Wav2LipEngine.Settings(checkpoint=checkpoint, fp16=args.fp16)
        engine = Wav2LipEngine(settings)
        predictor = engine.predictor(args.device)  # loaded before the clock starts, as the baseline's
        model = load_checkpoint(checkpoint, device)
        print(f"wav2lip, {args.seconds:g} s speech, {args.portrait} portrait, preset {args.preset}, device "
              f"{args.device}, {torch.get_num_threads()} torch threads, half {predictor.half}, "
              f"engine batch {predictor.batch_size}")

        serial_task = _task(tmp, "serial", audio, portrait, preset, args.device)
        with PeakRss() as serial_rss:
            serial_s, stages = serial_reference(serial_task, model, device, predictor.half, settings)
        frames = video_facts(serial_task.output).frames
        engine_task = _task(tmp, "engine", audio, portrait, preset, args.device)
        with GpuSampler(device) as gpu, PeakRss() as engine_rss:
            start = time.perf_counter()
            engine.generate(engine_task, lambda _f: None)
            engine_s = time.perf_counter() - start
        assert video_facts(engine_task.output).frames == frames

        print(f"serial (reference shape): {frames} frames in {serial_s:6.2f} s = {frames / serial_s:7.1f} frames/s"
              f", {serial_rss}")
        for stage, seconds in stages.items():
            print(f"    {stage:<22} {seconds:6.2f} s")
        print(f"pipelined engine:         {frames} frames in {engine_s:6.2f} s = {frames / engine_s:7.1f} frames/s"
              f", {engine_rss}{gpu.summary()}")
        print(f"ratio engine/serial: {serial_s / engine_s:.2f}x   realtime factor: {args.seconds / engine_s:.1f}x")
        if predictor.half is not None:
            full = Predictor.load(checkpoint, args.device, False, True, None)
            diff = half_vs_full(predictor, full, portrait, audio, preset, tmp)
            print(f"{predictor.half} vs float32 mouths: mean abs difference {diff:.3f} / 255")


if __name__ == "__main__":
    main()
