"""Speech slots speak queued scripts while the render slots are busy, so a render finds its audio made."""

from __future__ import annotations

import time

import pytest

from heygem_daemon.config import load_config
from heygem_daemon.engines.base import SpeechSpec
from heygem_daemon.generation.lifecycle import LifeCycle
from heygem_daemon.generation.speech_ahead import SpeechAhead
from heygem_daemon.generation.workers import task_spec
from heygem_daemon.speech.step import spoken
from heygem_daemon.state import NewTask, Store
from tts_standin import TtsStandin


@pytest.fixture
def standin():
    s = TtsStandin().start()
    yield s
    s.stop()


@pytest.fixture
def life(tmp_path, standin):
    (tmp_path / "base").mkdir()
    path = tmp_path / "config.yaml"
    services = f"{{heygem-tts: {{services: [{standin.url}]}}}}"
    path.write_text(f"base_dir: base\nspeech: {{engine: heygem-tts, engines: {services}}}\n")
    cfg = load_config(path, environ={})
    for name in ("work", "outputs", "state"):
        cfg.folder(name).mkdir(exist_ok=True)
    store = Store(cfg.folder("state") / "heygem.db")
    yield LifeCycle(cfg, store)
    store.close()


def queued_scripts(life: LifeCycle, texts: list[str]) -> list[int]:
    job = life.store.jobs.create("welcome", {"sources": ["welcome"], "folder": True})
    staging = life.cfg.folder("work") / job.id / "in"
    staging.mkdir(parents=True)
    for i, text in enumerate(texts):
        (staging / f"s{i}.txt").write_text(text, encoding="utf-8")
    life.store.jobs.set_state(job.id, "detected", spec={**job.spec, "staging": str(staging)})
    out = life.cfg.folder("outputs") / job.name
    life.queue(life.store.jobs.get(job.id),
               [NewTask(f"s{i}", f"s{i}.txt", "face.jpg", str(out / f"s{i}.mp4")) for i in range(len(texts))])
    return [t.id for t in life.store.tasks.select(job.id)]


class Beats:
    def __call__(self, fraction: float) -> None:
        pass

    def heartbeat(self) -> None:
        pass


def test_queued_scripts_are_spoken_before_a_render_slot_takes_them_and_the_render_asks_no_more(life, standin):
    ids = queued_scripts(life, ["First video.", "Second video."])
    ahead = SpeechAhead(life.cfg, life)
    ahead.start()
    try:
        cache = life.cfg.folder("work") / ".speech-cache"
        deadline = time.monotonic() + 30
        while len(list(cache.glob("[!.]*.wav"))) < 2 and time.monotonic() < deadline:  # both spoken and kept
            time.sleep(0.05)
    finally:
        ahead.stop()
    assert sorted(i["text"] for i in standin.invokes) == ["First video.", "Second video."]
    tasks = [life.store.tasks.get(i) for i in ids]
    assert [t.state for t in tasks] == ["queued", "queued"]  # no render slot took them
    for task in tasks:  # what the render slot's attempt does when it takes the task
        spec = task_spec(life.cfg, life, task, "cpu")[1]
        assert isinstance(spec.speech, SpeechSpec)
        spoken(spec, {}, Beats())
    assert len(standin.invokes) == 2
