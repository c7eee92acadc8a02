"""The `heygem` engine's parts against a real stand-in service on 127.0.0.1 (no daemon process)."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from config_examples import commented_engine_example
from heygem_daemon.config import DEFAULT_PRESETS, ConfigError, load_config
from heygem_daemon.engines.base import BadInputError, EngineError, TaskSpec
from heygem_daemon.engines.command import CommandEngine
from heygem_daemon.engines.heygem import HeygemEngine
from heygem_daemon.engines.heygem.client import HeygemClient
from heygem_daemon.engines.heygem.pool import ServicePool
from heygem_daemon.engines.registry import settings_for
from heygem_standin import Group, HeygemStandin
from media_factory import PORTRAIT_JPG, video_facts, write_speech_wav


@pytest.fixture
def data_dir(tmp_path) -> Path:
    path = tmp_path / "face2face"
    (path / "temp").mkdir(parents=True)
    return path


@pytest.fixture
def group() -> Group:
    return Group()


@pytest.fixture
def service(data_dir, group):
    standin = HeygemStandin("a", data_dir, group)
    yield standin
    standin.stop()


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def engine_for(data_dir: Path, *urls: str, **extra) -> HeygemEngine:
    settings = {"services": list(urls), "data_dir": str(data_dir), "poll_interval": 0.05,
                "busy_retry_interval": 0.1, "stall_seconds": 5, "request_timeout": 5, **extra}
    return HeygemEngine(HeygemEngine.Settings.model_validate(settings))


def make_task(tmp_path: Path, task_id: int = 1) -> TaskSpec:
    workdir = tmp_path / "task"
    workdir.mkdir()
    audio = write_speech_wav(tmp_path / "voice.wav", 1.0)
    return TaskSpec(task_id=task_id, job_id="j", name="out", audio=audio, portrait=PORTRAIT_JPG,
                    output=tmp_path / "out.mp4.part", workdir=workdir, preset=DEFAULT_PRESETS["480p"])


def test_a_photo_goes_in_as_a_video_and_the_result_comes_back_with_sound(tmp_path, data_dir, service, group):
    task = make_task(tmp_path)
    seen: list[float] = []
    engine_for(data_dir, service.url).generate(task, seen.append)
    facts = video_facts(task.output)
    assert facts.has_video and facts.has_audio and abs(facts.audio_duration - 1.0) < 0.1
    (submitted,) = group.events("submit")
    assert submitted[2].split()[2].endswith("-avatar.mp4")
    assert seen[-1] == 1.0 and any(0.05 < p < 1.0 for p in seen)
    assert not list((data_dir / "temp").iterdir())


def test_a_result_without_sound_gets_the_tasks_audio(tmp_path, data_dir, service, group):
    group.behaviours.append("no-audio")
    task = make_task(tmp_path)
    engine_for(data_dir, service.url).generate(task, lambda _p: None)
    facts = video_facts(task.output)
    assert facts.has_audio and abs(facts.audio_duration - facts.video_duration) < 0.1


def test_a_missing_input_file_is_a_bad_input_with_the_services_message(service):
    with pytest.raises(BadInputError, match="refused the inputs: failed to get audio duration: gone.wav"):
        HeygemClient(service.url, 5).submit("c0de", "gone.wav", "gone.mp4", False, False)


def test_a_failure_answer_is_a_retryable_error_with_the_services_message(tmp_path, data_dir, service, group):
    group.behaviours.append("fail:no face found in the video")
    with pytest.raises(EngineError) as err:
        engine_for(data_dir, service.url).generate(make_task(tmp_path), lambda _p: None)
    assert err.value.kind.retried
    assert err.value.reason == f"heygem service at {service.url} failed: no face found in the video"
    assert not list((data_dir / "temp").iterdir())


def test_an_unreachable_service_is_a_retryable_error_naming_it(tmp_path, data_dir):
    url = closed_port_url()
    with pytest.raises(EngineError) as err:
        engine_for(data_dir, url).generate(make_task(tmp_path), lambda _p: None)
    assert err.value.kind.retried and err.value.reason.startswith(f"heygem service at {url} unreachable")
    assert not list((data_dir / "temp").iterdir())


def test_a_stalled_job_fails_the_attempt_and_leaves_no_files(tmp_path, data_dir, service, group):
    group.behaviours.append("stall")
    with pytest.raises(EngineError) as err:
        engine_for(data_dir, service.url, stall_seconds=1).generate(make_task(tmp_path), lambda _p: None)
    assert err.value.kind.retried and "stalled at 20% for 1 s" in err.value.reason
    assert not list((data_dir / "temp").iterdir())
    service.unstick()


def test_a_busy_service_is_skipped_for_a_free_one(tmp_path, data_dir, service, group):
    other = HeygemStandin("b", data_dir, group)
    try:
        service.occupy()
        # Tasks spread over the services by id: task 2 of 2 services asks the first one first.
        engine_for(data_dir, service.url, other.url).generate(make_task(tmp_path, task_id=2), lambda _p: None)
    finally:
        other.stop()
    assert [e[1] for e in group.events("busy")] == ["a"]
    assert [e[1] for e in group.events("submit")] == ["b"]


def test_one_service_serves_one_task_holder_at_a_time(tmp_path):
    pool = ServicePool(["http://a", "http://b"], tmp_path / "locks")
    first, second = pool.try_acquire(0), pool.try_acquire(0)
    assert {first.url, second.url} == {"http://a", "http://b"}
    assert pool.try_acquire(0) is None
    with first:
        pass
    assert pool.try_acquire(0).url == first.url


def test_doctor_counts_an_unknown_task_answer_as_reachable(data_dir, service):
    down = closed_port_url()
    settings = HeygemEngine.Settings(services=[service.url, down], data_dir=data_dir)
    checks = HeygemEngine.doctor(settings, ["cpu"])
    assert [c.ok for c in checks] == [True, True, False]
    assert "unreachable" in checks[2].detail


def test_doctor_reports_a_missing_data_dir(tmp_path, service):
    settings = HeygemEngine.Settings(services=[service.url], data_dir=tmp_path / "not-mounted")
    assert [c.ok for c in HeygemEngine.doctor(settings, ["cpu"])] == [False, True]


def test_a_service_that_is_not_an_http_url_is_a_config_error(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(f"engines:\n  heygem:\n    services: ['127.0.0.1:8383']\n    data_dir: {tmp_path}\n")
    with pytest.raises(ConfigError, match=r"engines\.heygem\.services: .*is not an http\(s\) URL"):
        settings_for(load_config(path, environ={}, prepare=False), "heygem")


def test_the_commented_engine_examples_in_config_yaml_are_valid():
    heygem = HeygemEngine.Settings.model_validate(commented_engine_example("heygem"))
    command = CommandEngine.Settings.model_validate(commented_engine_example("command"))
    assert heygem.services == ["http://127.0.0.1:8383"]
    assert command.progress_regex == r"(\d+)%"
