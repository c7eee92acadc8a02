"""SIGKILL the daemon mid-task: after a restart the job finishes exactly once."""

import signal

import psutil
import pytest

from daemon_harness import DaemonHarness
from media_factory import PORTRAIT_JPG, video_facts, write_speech_wav

pytestmark = pytest.mark.daemon  # starts the real daemon: left out of `make test-fast`


def test_sigkill_while_running_then_restart_finishes_exactly_once(tmp_path):
    harness = DaemonHarness(tmp_path / "base", {"engine": {"preset": "720p"}})
    harness.start()
    voice = write_speech_wav(tmp_path / "talk.wav", 10.0)  # long enough to be killed mid-render at 720p
    harness.drop(voice, "crash.wav")
    harness.drop(PORTRAIT_JPG, "crash.jpg")

    def running_with_progress():
        job = harness.job("crash")
        tasks = harness.store().tasks.select(job.id) if job else []
        return tasks and tasks[0].state == "running" and tasks[0].progress > 0.05

    harness.wait_for(running_with_progress, 60, "the task to be running")
    workers = psutil.Process(harness.proc.pid).children(recursive=True)
    harness.kill(signal.SIGKILL)
    psutil.wait_procs(workers, timeout=10)
    assert not [w for w in workers if w.is_running() and w.status() != psutil.STATUS_ZOMBIE]

    harness.start()
    job = harness.wait_job("crash", timeout=120)
    harness.stop()
    assert job.state == "done"
    outputs = sorted(p.name for p in harness.folder("outputs").rglob("*.mp4*"))  # videos and any leftover .part
    assert outputs == ["crash.mp4"]
    facts = video_facts(harness.folder("outputs") / "crash" / "crash.mp4")
    assert abs(facts.video_duration - 10.0) <= 0.04
    store = harness.store()
    [task] = store.tasks.select(job.id)
    assert task.state == "done" and task.attempts == 1
    assert [a["outcome"] for a in store.tasks.attempts(task.id)] == ["interrupted", "done"]
    assert len(store.jobs.select()) == 1
