"""A stand-in for HeyGem's video service (reference: HEYGEM_API.md), served on 127.0.0.1.

It follows the documented protocol: one job at a time (10001 while busy), files named relative to
`<data>/temp/` (or as /code/data/... paths), 10002 for a missing or non-video input, the task
forgotten after the first terminal answer (10004 then). Its result is a real MP4 built from the
avatar video's frames and the audio, written to `<data>/temp/<code>-r.mp4`.

Tests steer it through a shared `Group`: a queue of behaviours for the next accepted jobs ("stall",
"fail:<msg>", "no-audio"), `expect_peers(n)` (a job holds at 10% until n jobs have reached that point,
so they all run at once and overlap is proven from the records, not from timing), and `occupy()` (an outside job
keeps a service busy). Every answer and job event is recorded in `Group.journal`.
"""

from __future__ import annotations

import json
import tempfile
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import av

from heygem_daemon.media.audio import load_clip
from heygem_daemon.media.frames import open_portrait
from heygem_daemon.media.writer import Mp4Writer

CONTAINER_DATA = "/code/data/"
VIDEO_FORMATS = ("mp4", "mov", "webm", "matroska")
PEER_WAIT_SECONDS = 30.0
STEP_SECONDS = 0.05


@dataclass
class Job:
    code: str
    audio: Path
    video: Path
    behaviour: str
    status: int = 1
    progress: float = 0.0
    result: str = ""
    msg: str = ""


@dataclass
class Group:
    """What several stand-in services share: the journal, the behaviour queue, the overlap barrier."""

    behaviours: deque[str] = field(default_factory=deque)
    peers: int = 1
    journal: list[tuple[str, str, str]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    running: int = 0
    arrived: int = 0
    changed: threading.Condition = field(init=False)

    def __post_init__(self) -> None:
        self.changed = threading.Condition(self.lock)

    def expect_peers(self, n: int) -> None:
        """From now on, jobs hold at 10% until `n` of them have reached that point together."""
        with self.lock:
            self.peers, self.arrived = n, 0

    def record(self, event: str, service: str, code: str) -> None:
        with self.lock:
            self.journal.append((event, service, code))

    def events(self, kind: str) -> list[tuple[str, str, str]]:
        with self.lock:
            return [e for e in self.journal if e[0] == kind]

    def max_running(self, since: int = 0) -> int:
        """Most jobs running at once, replayed from the journal's start/end order (from entry `since`)."""
        most = now = 0
        with self.lock:
            for event, _, _ in self.journal[since:]:
                now += {"start": 1, "end": -1}.get(event, 0)
                most = max(most, now)
        return most


class HeygemStandin:
    def __init__(self, name: str, data_dir: Path, group: Group) -> None:
        self.name, self.data_dir, self.group = name, data_dir, group
        (data_dir / "temp").mkdir(parents=True, exist_ok=True)
        self.jobs: dict[str, Job] = {}
        self.current: Job | None = None
        self.occupied = False
        self.release_stuck = threading.Event()
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.release_stuck.set()
        self.server.shutdown()
        self.server.server_close()

    def occupy(self, busy: bool = True) -> None:
        """Busy with a job someone else submitted (the desktop app, another daemon)."""
        with self.lock:
            self.occupied = busy

    def unstick(self) -> None:
        """A stalled job vanishes, as when the container is restarted."""
        self.release_stuck.set()

    # --- protocol ---------------------------------------------------------------------------------

    def _path(self, name: str) -> Path:
        if name.startswith(CONTAINER_DATA):
            return self.data_dir / name[len(CONTAINER_DATA):]
        return self.data_dir / "temp" / name

    def submit(self, body: dict[str, Any]) -> dict[str, Any]:
        code = str(body.get("code") or "")
        audio, video = self._path(str(body.get("audio_url", ""))), self._path(str(body.get("video_url", "")))
        with self.lock:
            if self.occupied or self.current is not None:
                self.group.record("busy", self.name, code)
                return {"code": 10001, "success": False, "msg": "busy, please try again later"}
            if not code or not audio.is_file():
                return {"code": 10002, "success": False, "msg": f"failed to get audio duration: {audio.name}"}
            if not video.is_file() or not _is_video(video):
                return {"code": 10002, "success": False, "msg": f"format video error: {video.name}"}
            with self.group.lock:
                behaviour = self.group.behaviours.popleft() if self.group.behaviours else "ok"
            job = Job(code, audio, video, behaviour)
            self.jobs[code] = self.current = job
        self.group.record("submit", self.name, f"{code} {audio.name} {video.name}")
        threading.Thread(target=self._work, args=(job,), daemon=True).start()
        return {"code": 10000, "success": True, "msg": "ok", "data": {}}

    def query(self, code: str) -> dict[str, Any]:
        with self.lock:
            job = self.jobs.get(code)
            if job is None:
                return {"code": 10004, "success": False, "msg": "task not found"}
            data = {"code": code, "status": job.status, "progress": job.progress, "result": job.result,
                    "msg": job.msg}
            if job.status in (2, 3):
                del self.jobs[code]  # the real service forgets a task once it has told its end
        return {"code": 10000, "success": True, "msg": "ok", "data": data}

    # --- the job ----------------------------------------------------------------------------------

    def _work(self, job: Job) -> None:
        group = self.group
        with group.changed:
            group.running += 1
            group.journal.append(("start", self.name, job.code))
            group.changed.notify_all()
        try:
            self._step(job, 5)
            if job.behaviour == "stall":
                self.release_stuck.clear()  # an unstick() meant for an earlier job does not count
                self._step(job, 20)
                self.release_stuck.wait()
                with self.lock:
                    self.jobs.pop(job.code, None)
                return
            if job.behaviour.startswith("fail:"):
                self._step(job, 30)
                self._end(job, 3, msg=job.behaviour[len("fail:"):])
                return
            self._step(job, 10)
            self._wait_for_peers(job)
            result = f"{job.code}-r.mp4"
            self._render(job, self.data_dir / "temp" / result)
            self._end(job, 2, result=result)
        except Exception as exc:  # inputs removed under it, say: the real service reports a failure too
            self._end(job, 3, msg=f"{type(exc).__name__}: {exc}")
        finally:
            with group.changed:
                group.running -= 1
                group.journal.append(("end", self.name, job.code))
            with self.lock:
                self.current = None

    def _wait_for_peers(self, job: Job) -> None:
        """Hold until `peers` jobs have arrived here (so they all run at once), moving the progress a little
        meanwhile as a working service does."""
        deadline = time.monotonic() + PEER_WAIT_SECONDS
        with self.group.changed:
            self.group.arrived += 1
            self.group.changed.notify_all()
            while self.group.arrived < self.group.peers and time.monotonic() < deadline:
                self.group.changed.wait(STEP_SECONDS)
                job.progress = min(job.progress + 0.01, 14.99)

    def _step(self, job: Job, progress: float) -> None:
        with self.lock:
            job.progress = progress
        time.sleep(STEP_SECONDS)

    def _end(self, job: Job, status: int, result: str = "", msg: str = "") -> None:
        with self.lock:
            job.status, job.progress, job.result, job.msg = status, 100 if status == 2 else job.progress, result, msg

    def _render(self, job: Job, out: Path) -> None:
        """The avatar's frames, back and forth, for as long as the audio plays; with the audio muxed in."""
        clip = load_clip(job.audio)
        count = max(1, round(clip.duration * 25))
        sound = None if job.behaviour == "no-audio" else clip
        tmp = out.with_name(out.name + ".writing")
        with tempfile.TemporaryDirectory() as scratch:
            frames = open_portrait(job.video, 240, Path(scratch))
            with Mp4Writer(tmp, *frames.size, 25, 300_000, sound, 64_000, "ultrafast") as writer:
                for i in range(count):
                    writer.write(frames.for_output(i))
                    with self.lock:
                        job.progress = 15 + 80 * i / count
            del frames
        tmp.rename(out)


def _is_video(path: Path) -> bool:
    try:
        with av.open(str(path)) as c:
            return bool(c.streams.video) and any(f in VIDEO_FORMATS for f in c.format.name.split(","))
    except av.FFmpegError:
        return False


def _handler(service: HeygemStandin) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *_: Any) -> None:
            pass

        def _answer(self, body: dict[str, Any]) -> None:
            data = json.dumps(body).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_POST(self) -> None:
            if urlsplit(self.path).path != "/easy/submit":
                self.send_error(404)
                return
            raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            self._answer(service.submit(json.loads(raw or b"{}")))

        def do_GET(self) -> None:
            parts = urlsplit(self.path)
            if parts.path != "/easy/query":
                self.send_error(404)
                return
            self._answer(service.query(parse_qs(parts.query).get("code", [""])[0]))

    return Handler
