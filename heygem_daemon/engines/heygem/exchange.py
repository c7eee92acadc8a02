"""The files one task puts in the service's data folder (`<data_dir>/temp/`).

Every name starts with the task's code (a fresh uuid), and the service names its result `<code>-r.mp4`,
so `<code>*` is exactly what to remove afterwards, the service's own by-products included. The codes
used are noted in the task's scratch folder first, so an attempt cut short (worker killed) is cleaned
up by the next one."""

from __future__ import annotations

import errno
import math
import os
import shutil
from pathlib import Path

import av

from heygem_daemon.config import Preset
from heygem_daemon.media.errors import MediaError
from heygem_daemon.media.frames import open_portrait
from heygem_daemon.media.kinds import MediaKind, kind_of
from heygem_daemon.media.writer import Mp4Writer

CODES_FILE = "heygem-codes.txt"


def audio_seconds(path: Path) -> float:
    """Length of the first audio stream, counted from decoded samples (headers can lie)."""
    samples = rate = 0
    try:
        with av.open(str(path)) as container:
            for frame in container.decode(audio=0):
                samples, rate = samples + frame.samples, frame.sample_rate
    except (av.FFmpegError, IndexError) as exc:
        raise MediaError(f"{path.name} is not decodable audio ({exc})", "re-export it as WAV or MP3") from None
    if not rate:
        raise MediaError(f"{path.name} contains no audio samples", "re-export it as WAV or MP3")
    return samples / rate


class Exchange:
    def __init__(self, temp: Path, code: str, workdir: Path) -> None:
        self.temp, self.code, self.workdir = temp, code, workdir

    def open(self) -> None:
        """Clean up after earlier attempts of this task, then note this attempt's code."""
        notes = self.workdir / CODES_FILE
        if notes.is_file():
            for old in notes.read_text(encoding="utf-8").split():
                remove_code(self.temp, old)
        with open(notes, "a", encoding="utf-8") as fh:
            fh.write(self.code + "\n")

    def place(self, src: Path, role: str) -> str:
        """Hard-link (same filesystem) or copy `src` in; returns the name the service is given."""
        name = f"{self.code}-{role}{src.suffix.lower()}"
        dest = self.temp / name
        try:
            os.link(src, dest)
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP):
                raise
            shutil.copyfile(src, dest)
        return name

    def avatar(self, portrait: Path, seconds: float, preset: Preset, x264_preset: str) -> str:
        """The service wants a video of the person: a photo becomes an H.264 yuv420p MP4 as long as the audio."""
        if kind_of(portrait) is MediaKind.VIDEO:
            return self.place(portrait, "avatar")
        frames = open_portrait(portrait, preset.height, self.workdir)
        name = f"{self.code}-avatar.mp4"
        width, height = frames.size
        with Mp4Writer(self.temp / name, width, height, preset.fps, preset.video_bitrate, None,
                       preset.audio_bitrate, x264_preset) as writer:
            for _ in range(max(1, math.ceil(seconds * preset.fps))):
                writer.write(frames.frame(0))
        return name

    def result(self, reported: str) -> Path:
        """Where the result is on this host: the service reports a name (or a container path) in temp/."""
        return self.temp / (Path(reported).name if reported else f"{self.code}-r.mp4")

    def close(self) -> None:
        remove_code(self.temp, self.code)


def remove_code(temp: Path, code: str) -> None:
    for path in temp.glob(f"{code}*"):
        path.unlink(missing_ok=True)
