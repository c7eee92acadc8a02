"""The files one attempt puts in the services' data folders (`<data_dir>/temp/`).

Every name starts with the attempt's code (a fresh uuid), and the service names its own files after it
too (`<code>_format.mp4`, `<code>_format.wav`, `<code>-t.mp4`, `<code>-r.mp4`), so `<code>*` is exactly
what to remove afterwards. The files may only go once the service has forgotten the code (told the job's
end, or answered 10004): until then it may still be reading them. So each code is remembered in the
store before anything is written; what an attempt cannot remove itself (it was cancelled, killed, or
left a job running on the service) the sweep in codes.py removes later."""

from __future__ import annotations

import errno
import math
import os
import shutil
from pathlib import Path

import av

from heygem_daemon.engines.base import TaskSpec
from heygem_daemon.engines.heygem.settings import Endpoint
from heygem_daemon.media.errors import MediaError
from heygem_daemon.media.kinds import MediaKind, kind_of
from heygem_daemon.state import Store


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


def _link_or_copy(src: Path, dest: Path) -> None:
    try:
        os.link(src, dest)
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP):
            raise
        shutil.copyfile(src, dest)


class Exchange:
    def __init__(self, code: str, task: TaskSpec, store: Store | None) -> None:
        self.code, self.task, self.store = code, task, store
        self.staged: dict[Path, tuple[str, str]] = {}
        """temp folder -> the (audio, video) names the service there is given."""
        self.held_by: Endpoint | None = None
        """The service that may still know the code (accepted the job, has not told its end)."""
        self.started = 0.0
        """When the code was given out (wall clock), for a job adopted from an earlier attempt."""
        self._avatar: Path | None = None

    @classmethod
    def left_running(cls, code: str, started: float, endpoint: Endpoint, task: TaskSpec,
                     store: Store | None) -> Exchange:
        """An earlier attempt's exchange, whose job `endpoint` may still run. Its files are named after
        the code, so removing `<code>*` needs no names."""
        exchange = cls(code, task, store)
        exchange.staged[endpoint.temp] = ("", "")
        exchange.held_by, exchange.started = endpoint, started
        return exchange

    def prepare(self, seconds: float) -> None:
        """The service wants a video of the person: a photo becomes an H.264 yuv420p MP4 as long as the
        audio, made once in the task's scratch folder and linked into each data folder used."""
        task = self.task
        if kind_of(task.portrait) is MediaKind.VIDEO:
            self._avatar = task.portrait
            return
        # OpenCV and numpy load in the worker only: the daemon imports this package for settings and sweeps.
        from heygem_daemon.media.frames import open_portrait
        from heygem_daemon.media.writer import Mp4Writer

        frames = open_portrait(task.portrait, task.preset.height, task.workdir)
        out = task.workdir / f"{self.code}-avatar.mp4"
        width, height = frames.size
        with Mp4Writer(out, width, height, task.preset.fps, task.preset.video_bitrate, None,
                       task.preset.audio_bitrate, task.x264_preset) as writer:
            for _ in range(max(1, math.ceil(seconds * task.preset.fps))):
                writer.write(frames.frame(0))
        self._avatar = out

    def into(self, endpoint: Endpoint) -> tuple[str, str]:
        """The inputs in this service's temp folder (made with result/ if missing, as newer images need)."""
        temp = endpoint.temp
        if temp in self.staged:
            return self.staged[temp]
        assert self._avatar is not None, "prepare() first"
        temp.mkdir(exist_ok=True)
        (endpoint.data_dir / "result").mkdir(exist_ok=True)
        if self.store is not None:
            self.store.heygem.remember(self.code, str(temp), self.task.task_id)
        names = (self._place(self.task.audio, temp, "audio"), self._place(self._avatar, temp, "avatar"))
        self.staged[temp] = names
        return names

    def _place(self, src: Path, temp: Path, role: str) -> str:
        name = f"{self.code}-{role}{src.suffix.lower()}"
        _link_or_copy(src, temp / name)
        return name

    def submitting(self, endpoint: Endpoint) -> None:
        """Noted before the request goes out: a worker killed right after the service accepted must not
        leave a code that looks never submitted (its files would be removed under the service)."""
        self.held_by = endpoint
        if self.store is not None:
            self.store.heygem.submitted(self.code, str(endpoint.temp), endpoint.url)

    def refused(self, endpoint: Endpoint) -> None:
        """The service did not take the job (busy, unreachable, bad parameter): it never knew the code."""
        self.held_by = None
        if self.store is not None:
            self.store.heygem.submitted(self.code, str(endpoint.temp), None)

    def forgotten(self) -> None:
        """The service told the job's end (or said it does not know the code): our files are ours again."""
        self.held_by = None

    def result(self, endpoint: Endpoint, reported: str) -> Path:
        """Where the result is on this host: the service reports a name (or a container path) in temp/."""
        return endpoint.temp / (Path(reported).name if reported else f"{self.code}-r.mp4")

    def close(self) -> None:
        """Remove `<code>*` everywhere the service has forgotten the code; the rest is the sweep's."""
        if self._avatar is not None and self._avatar.parent == self.task.workdir:
            self._avatar.unlink(missing_ok=True)
        for temp in self.staged:
            if self.held_by is not None and self.held_by.temp == temp:
                continue
            remove_code(temp, self.code)
            if self.store is not None:
                self.store.heygem.forget(self.code, str(temp))


def remove_code(temp: Path, code: str) -> list[tuple[Path, int]]:
    """Delete `<temp>/<code>*`; returns what went, with sizes."""
    gone = []
    for path in temp.glob(f"{code}*"):
        try:
            size = path.lstat().st_size
            path.unlink()
        except FileNotFoundError:
            continue
        gone.append((path, size))
    return gone
