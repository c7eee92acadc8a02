"""A stand-in for HeyGem's video service, built from how the real one behaves (HEYGEM_API.md, issue 11,
the official client's src/main/service/video.js), served on 127.0.0.1.

Like the real service it is single-threaded (one request at a time; the job runs beside it), runs one
job at a time and answers 10001 to any submit meanwhile (also while another client's job runs:
`occupy()`); answers 10002 only for a missing or empty parameter; reports bad media as a failed job
(status 3) with the service's own message ("三次获取音频时长失败", "format video error", "存在多人脸");
moves progress 0 -> 5 -> 20, holds 20 for the whole render, then 90 -> 100; leaves `<code>_format.wav`,
`<code>_format.mp4`, `<code>-t.mp4` and the result `<code>-r.mp4` in `<data>/temp/`; and forgets a job
after the first answer that tells its end (10004 then). `restart(seconds)` takes it down as a container
restart does: no answers meanwhile, and every job forgotten.

Tests steer it through a shared `Group`: `render_seconds` (how long a render holds at 20 %), a queue of
behaviours for the next accepted jobs ("hang": holds at 20 % until `release()`; "fail:<msg>";
"no-audio"; "no-result": success reported without a result file), `expect_peers(n)` (a job holds at
20 % until n jobs got there, so overlap is proven from the records, not from timing). Every answer and
job event is recorded in `Group.journal`.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import av

from heygem_daemon.media.audio import load_clip
from heygem_daemon.media.errors import MediaError
from heygem_daemon.media.faces import count_faces
from heygem_daemon.media.frames import open_portrait
from heygem_daemon.media.writer import Mp4Writer

CONTAINER_DATA = "/code/data/"
PEER_WAIT_SECONDS = 30.0
STEP_SECONDS = 0.05
NO_AUDIO_LENGTH = "三次获取音频时长失败"
BAD_VIDEO = "format video error"
SEVERAL_FACES = "存在多人脸"
DONE = "任务完成"


class _Restarted(Exception):
    """The container went away under the job."""


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
    """What several stand-in services share: the journal, the behaviours, the overlap barrier."""

    behaviours: deque[str] = field(default_factory=deque)
    render_seconds: float = 0.0
    peers: int = 1
    journal: list[tuple[str, str, str]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    arrived: int = 0
    changed: threading.Condition = field(init=False)

    def __post_init__(self) -> None:
        self.changed = threading.Condition(self.lock)

    def expect_peers(self, n: int) -> None:
        """From now on, jobs hold at 20 % until `n` of them have reached that point together."""
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
        data_dir.mkdir(parents=True, exist_ok=True)  # temp/ and result/ are the client's to make
        self.jobs: dict[str, Job] = {}
        self.current: Job | None = None
        self.occupied = False
        self.generation = 0
        """Bumped by a restart: a job of an earlier generation stops."""
        self.released = threading.Event()
        self.lock = threading.Lock()
        self.server = self._serve(0)
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"

    def _serve(self, port: int) -> HTTPServer:
        server = HTTPServer(("127.0.0.1", port), _handler(self))  # one request at a time, like Flask threaded=False
        # A short poll: stopping a stand-in (every test's teardown) then takes 0.05 s, not 0.5 s.
        threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
        return server

    def stop(self) -> None:
        self.released.set()
        self.server.shutdown()
        self.server.server_close()

    def occupy(self, busy: bool = True) -> None:
        """Busy with a job someone else submitted (the desktop app, another daemon), for as long as it is set."""
        with self.lock:
            self.occupied = busy

    def release(self) -> None:
        """A hanging job carries on to its end."""
        self.released.set()

    def down(self) -> None:
        """The container stops: no answer at all, and every job (ours or not) is gone."""
        self.server.shutdown()
        self.server.server_close()
        with self.lock:
            self.generation += 1
            self.jobs.clear()
            self.current = None
            self.occupied = False
        self.group.record("down", self.name, "")

    def up(self) -> None:
        """Back on the same port, knowing no job."""
        self.server = self._serve(self.port)
        self.group.record("up", self.name, "")

    def restart(self, down_seconds: float) -> None:
        self.down()
        time.sleep(down_seconds)
        self.up()

    def restart_in_background(self, down_seconds: float) -> threading.Thread:
        thread = threading.Thread(target=self.restart, args=(down_seconds,), daemon=True)
        thread.start()
        return thread

    # --- protocol ---------------------------------------------------------------------------------

    def _path(self, name: str) -> Path:
        if name.startswith(CONTAINER_DATA):
            return self.data_dir / name[len(CONTAINER_DATA):]
        return self.data_dir / "temp" / name

    def submit(self, body: dict[str, Any]) -> dict[str, Any]:
        code, audio_url, video_url = (str(body.get(k) or "") for k in ("code", "audio_url", "video_url"))
        if not (code and audio_url and video_url):
            return {"code": 10002, "success": False, "msg": "参数错误: code, audio_url and video_url are required"}
        with self.lock:
            if self.occupied or self.current is not None:
                self.group.record("busy", self.name, code)
                return {"code": 10001, "success": False, "msg": "忙碌中"}
            with self.group.lock:
                behaviour = self.group.behaviours.popleft() if self.group.behaviours else "ok"
            job = Job(code, self._path(audio_url), self._path(video_url), behaviour)
            if behaviour == "hang":  # cleared here, not when the job reaches 20 %: a release may come first
                self.released.clear()
            self.jobs[code] = self.current = job
            generation = self.generation
        self.group.record("submit", self.name, f"{code} {job.audio.name} {job.video.name}")
        threading.Thread(target=self._work, args=(job, generation), daemon=True).start()
        return {"code": 10000, "success": True, "msg": "ok", "data": {}}

    def query(self, code: str) -> dict[str, Any]:
        with self.lock:
            job = self.jobs.get(code)
            if job is None:
                return {"code": 10004, "success": False, "msg": "任务不存在"}
            data = {"code": code, "status": job.status, "progress": job.progress, "result": job.result,
                    "msg": job.msg}
            if job.status in (2, 3):
                del self.jobs[code]  # the real service forgets a task once it has told its end
        self.group.record(f"status{data['status']}", self.name, code)
        return {"code": 10000, "success": True, "msg": "ok", "data": data}

    # --- the job ----------------------------------------------------------------------------------

    def _work(self, job: Job, generation: int) -> None:
        self.group.record("start", self.name, job.code)
        try:
            self._step(job, generation, 5)
            problem = self._check_media(job)
            if problem:
                self._end(job, generation, 3, msg=problem)
                return
            temp = self.data_dir / "temp"
            shutil.copyfile(job.audio, temp / f"{job.code}_format.wav")
            shutil.copyfile(job.video, temp / f"{job.code}_format.mp4")
            self._step(job, generation, 20)
            self._hold_at_20(job, generation)
            if job.behaviour.startswith("fail:"):
                self._end(job, generation, 3, msg=job.behaviour[len("fail:"):])
                return
            self._render(job, temp / f"{job.code}-t.mp4", sound=False)
            self._step(job, generation, 90)
            result = f"{job.code}-r.mp4"
            if job.behaviour != "no-result":  # the final mux can fail while the job still "succeeds"
                self._render(job, temp / result, sound=job.behaviour != "no-audio")
            self._end(job, generation, 2, result=f"/{result}", msg=DONE)
        except _Restarted:
            pass
        except Exception as exc:  # inputs removed under it, say: the real service reports a failure too
            self._end(job, generation, 3, msg=f"{type(exc).__name__}: {exc}")
        finally:
            self.group.record("end", self.name, job.code)
            with self.lock:
                if self.current is job:
                    self.current = None

    def _check_media(self, job: Job) -> str:
        try:
            load_clip(job.audio)
        except MediaError:
            return NO_AUDIO_LENGTH
        try:
            with av.open(str(job.video)) as c:
                frame = next(c.decode(video=0)).to_ndarray(format="bgr24")
        except (av.FFmpegError, StopIteration):
            return BAD_VIDEO
        return SEVERAL_FACES if count_faces(frame) > 1 else ""

    def _hold_at_20(self, job: Job, generation: int) -> None:
        """The render: progress stays at 20 % all along, as the real service's does."""
        until = time.monotonic() + self.group.render_seconds
        while time.monotonic() < until:
            self._step(job, generation, 20)
        if job.behaviour == "hang":
            while not self.released.wait(STEP_SECONDS):
                self._step(job, generation, 20, pause=0)
        deadline = time.monotonic() + PEER_WAIT_SECONDS
        with self.group.changed:
            self.group.arrived += 1
            self.group.changed.notify_all()
            while self.group.arrived < self.group.peers and time.monotonic() < deadline:
                self.group.changed.wait(STEP_SECONDS)

    def _step(self, job: Job, generation: int, progress: float, pause: float = STEP_SECONDS) -> None:
        with self.lock:
            if generation != self.generation:
                raise _Restarted
            job.progress = progress
        time.sleep(pause)

    def _end(self, job: Job, generation: int, status: int, result: str = "", msg: str = "") -> None:
        with self.lock:
            if generation == self.generation:
                job.status, job.result, job.msg = status, result, msg
                job.progress = 100 if status == 2 else job.progress

    def _render(self, job: Job, out: Path, sound: bool) -> None:
        """The avatar's frames, back and forth, for as long as the audio plays; with the audio muxed in."""
        clip = load_clip(job.audio)
        tmp = out.with_name(out.name + ".writing")
        with tempfile.TemporaryDirectory() as scratch:
            frames = open_portrait(job.video, 240, Path(scratch))
            with Mp4Writer(tmp, *frames.size, 25, 300_000, clip if sound else None, 64_000, "ultrafast") as writer:
                for i in range(max(1, round(clip.duration * 25))):
                    writer.write(frames.for_output(i))
            del frames
        tmp.rename(out)


def _handler(service: HeygemStandin) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *_: Any) -> None:
            pass

        def _answer(self, body: dict[str, Any]) -> None:
            data = json.dumps(body, ensure_ascii=False).encode()
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
