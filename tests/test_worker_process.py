"""The worker process as the supervisor sees it: what comes back through the pipe for each kind of end."""

from __future__ import annotations


from heygem_daemon.config import DEFAULT_PRESETS
from heygem_daemon.engines.base import TaskSpec
from heygem_daemon.failures import Kind
from heygem_daemon.generation.workers import WorkerProcess
from media_factory import PORTRAIT_JPG, write_speech_wav


def run_in_worker(spec: TaskSpec) -> tuple:
    """The real worker process running the real preview engine; returns its final message."""
    worker = WorkerProcess("cpu", {}, 0)
    try:
        worker.conn.send(("preview", spec))
        while (msg := worker.conn.recv())[0] in ("progress", "beat"):
            pass
        return msg
    finally:
        worker.close()


def test_a_full_disk_while_encoding_is_an_outage_not_an_engine_failure(tmp_path, tmpfs):
    outputs = tmpfs("full-outputs", "size=64k")  # room for the MP4 header, not for the video
    work = tmp_path / "task"
    work.mkdir()
    spec = TaskSpec(task_id=1, job_id="j", name="anna", audio=write_speech_wav(tmp_path / "voice.wav", 3.0),
                    portrait=PORTRAIT_JPG, output=outputs / "anna.mp4.part", workdir=work,
                    preset=DEFAULT_PRESETS["480p"])

    kind, error_kind, reason, hint, _dependency = run_in_worker(spec)

    assert kind == "error" and Kind(error_kind) is Kind.OUTAGE
    assert reason.startswith("disk full") and "waits and runs again by itself" in hint
