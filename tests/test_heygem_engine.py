"""The `heygem` engine against real stand-in services on 127.0.0.1 that behave like HeyGem's (no daemon
process): long renders at constant progress, restarts, wedges, input errors, leftovers."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

from config_examples import commented_engine_example
from heygem_daemon.ops.cleanup import Sweep
from heygem_daemon.cli import main as cli_main
from heygem_daemon.config import DEFAULT_PRESETS, Config, ConfigError, Limits, load_config
from heygem_daemon.generation.outages import OutageWatch
from heygem_daemon.engines.base import BadInputError, EngineError, OutageError, TaskSpec
from heygem_daemon.engines.command import CommandEngine
from heygem_daemon.engines.heygem import HeygemEngine
from heygem_daemon.engines.heygem.client import HeygemClient
from heygem_daemon.engines.heygem.codes import sweep_codes
from heygem_daemon.engines.heygem.pool import ServicePool
from heygem_daemon.engines.heygem.settings import Endpoint
from heygem_daemon.engines.registry import needs_face, settings_for
from heygem_daemon.intake.probe import ProbeError, probe_portrait
from heygem_daemon.media.face_spec import FaceRule
from heygem_daemon.state import Store
from heygem_standin import SEVERAL_FACES, Group, HeygemStandin
from media_factory import PORTRAIT_JPG, video_facts, write_speech_wav


class Reports:
    """The engine's side of the worker pipe, recorded: progress values and heartbeats."""

    def __init__(self) -> None:
        self.progress: list[float] = []
        self.beats = 0

    def __call__(self, fraction: float) -> None:
        self.progress.append(fraction)

    def heartbeat(self) -> None:
        self.beats += 1


@pytest.fixture
def data_dir(tmp_path) -> Path:
    path = tmp_path / "face2face"
    path.mkdir()
    return path


@pytest.fixture
def group() -> Group:
    return Group()


@pytest.fixture
def service(data_dir, group):
    standin = HeygemStandin("a", data_dir, group)
    yield standin
    standin.stop()


@pytest.fixture
def other(data_dir, group):
    standin = HeygemStandin("b", data_dir, group)
    yield standin
    standin.stop()


@pytest.fixture
def store(tmp_path) -> Store:
    return Store(tmp_path / "heygem.db")


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def engine_for(data_dir: Path, *services, **extra) -> HeygemEngine:
    settings = {"services": list(services), "data_dir": str(data_dir), "poll_interval": 0.05,
                "busy_retry_interval": 0.1, "request_timeout": 5, **extra}
    return HeygemEngine(HeygemEngine.Settings.model_validate(settings))


def make_task(tmp_path: Path, task_id: int = 1, portrait: Path = PORTRAIT_JPG, store: Store | None = None,
              seconds: float = 1.0) -> TaskSpec:
    workdir = tmp_path / f"task-{task_id}"
    workdir.mkdir(exist_ok=True)
    audio = write_speech_wav(tmp_path / "voice.wav", seconds)
    return TaskSpec(task_id=task_id, job_id="j", name="out", audio=audio, portrait=portrait,
                    output=tmp_path / f"out-{task_id}.mp4.part", workdir=workdir, preset=DEFAULT_PRESETS["480p"],
                    store=store.path if store else None)


def temp_files(data_dir: Path) -> list[str]:
    return sorted(p.name for p in (data_dir / "temp").iterdir())


def two_faces(tmp_path: Path) -> Path:
    photo = cv2.imread(str(PORTRAIT_JPG))
    path = tmp_path / "two.jpg"
    cv2.imwrite(str(path), np.hstack([photo, photo]))
    return path


def sweep(tmp_path: Path, store: Store) -> Sweep:
    run = Sweep(Config.model_validate({"base_dir": str(tmp_path)}), store, time.time())
    sweep_codes(run)
    return run


# --- the happy path ---------------------------------------------------------------------------------


def test_a_photo_goes_in_as_a_video_and_the_result_comes_back_with_sound(tmp_path, data_dir, service, group):
    task = make_task(tmp_path)
    seen = Reports()
    engine_for(data_dir, service.url).generate(task, seen)
    facts = video_facts(task.output)
    assert facts.has_video and facts.has_audio and abs(facts.audio_duration - 1.0) < 0.1
    (submitted,) = group.events("submit")
    assert submitted[2].split()[2].endswith("-avatar.mp4")
    assert seen.progress[-1] == 1.0 and any(0.05 < p < 1.0 for p in seen.progress)
    # The service's intermediates (<code>_format.*, <code>-t.mp4) go with the inputs; result/ is made.
    assert temp_files(data_dir) == []
    assert (data_dir / "result").is_dir()


def test_a_result_without_sound_gets_the_tasks_audio(tmp_path, data_dir, service, group):
    group.behaviours.append("no-audio")
    task = make_task(tmp_path)
    engine_for(data_dir, service.url).generate(task, Reports())
    facts = video_facts(task.output)
    assert facts.has_audio and abs(facts.audio_duration - facts.video_duration) < 0.1


def test_a_render_at_constant_progress_longer_than_a_stall_window_is_alive_and_finishes(
        tmp_path, data_dir, service, group):
    group.render_seconds = 1.5
    seen = Reports()
    engine_for(data_dir, service.url).generate(make_task(tmp_path), seen)
    assert video_facts(tmp_path / "out-1.mp4.part").has_video
    # Progress stood at 20 % all through the render; each "running" answer was a heartbeat instead.
    at_20 = 0.05 + 0.9 * 0.2
    assert seen.progress.count(at_20) == 1
    assert seen.beats >= 1.5 / 0.05 / 2


def test_a_render_over_its_audio_scaled_limit_fails_the_attempt_and_leaves_the_services_files(
        tmp_path, data_dir, service, group, store):
    group.behaviours.append("hang")
    engine = engine_for(data_dir, service.url, render_timeout_factor=0.5, render_timeout_base=0.5)
    with pytest.raises(EngineError) as err:
        engine.generate(make_task(tmp_path, store=store), Reports())
    assert err.value.kind.retried and err.value.kind.counts_attempt
    assert "still renders after 1 s (0.5 x 1.0 s of audio + 0.5 s), at 20%" in err.value.reason
    assert "heygem-gen-video" in err.value.hint and "duix-avatar-gen-video" in err.value.hint
    # The service still renders: its inputs stay, the code stays remembered, the sweep waits for it.
    assert temp_files(data_dir) and len(store.heygem.select()) == 1
    assert sweep(tmp_path, store).removed == [] and temp_files(data_dir)
    service.release()
    deadline = time.monotonic() + 30
    while sweep(tmp_path, store).removed == [] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert temp_files(data_dir) == [] and store.heygem.select() == []


# --- what the service says about the inputs ---------------------------------------------------------


def test_a_missing_parameter_is_a_bad_input_with_the_services_message(service):
    with pytest.raises(BadInputError, match="refused the inputs: 参数错误"):
        HeygemClient(service.url, 5).submit("c0de", "", "x.mp4", False, False)


def test_a_portrait_with_several_faces_ends_as_bad_input_with_the_services_message(
        tmp_path, data_dir, service, group):
    with pytest.raises(BadInputError) as err:
        engine_for(data_dir, service.url).generate(make_task(tmp_path, portrait=two_faces(tmp_path)), Reports())
    assert err.value.reason == (f"heygem service at {service.url}: the portrait shows more than one face "
                                f"({SEVERAL_FACES})")
    assert "exactly one person" in err.value.hint and not err.value.kind.retried
    assert temp_files(data_dir) == []


def test_an_unknown_failure_message_stays_a_retryable_error(tmp_path, data_dir, service, group):
    group.behaviours.append("fail:CUDA error: out of memory")
    with pytest.raises(EngineError) as err:
        engine_for(data_dir, service.url).generate(make_task(tmp_path), Reports())
    assert err.value.kind.counts_attempt and err.value.kind.retried
    assert err.value.reason == f"heygem service at {service.url} failed: CUDA error: out of memory"
    assert temp_files(data_dir) == []


def test_success_without_a_result_file_is_the_final_mux_retried_once(tmp_path, data_dir, service, group):
    group.behaviours.extend(["no-result", "no-result"])
    engine, task = engine_for(data_dir, service.url), make_task(tmp_path)
    with pytest.raises(EngineError) as first:
        engine.generate(task, Reports())
    assert type(first.value) is EngineError and "final mux failed" in first.value.reason
    assert "data_dir" not in first.value.hint
    with pytest.raises(BadInputError, match="final mux failed.*second time"):
        engine.generate(task, Reports())
    assert temp_files(data_dir) == []


# --- outages, busy and wedged services ----------------------------------------------------------------


def test_an_unreachable_service_is_an_outage_that_uses_no_attempt(tmp_path, data_dir, store):
    url = closed_port_url()
    engine = engine_for(data_dir, url)
    with pytest.raises(OutageError) as err:
        engine.generate(make_task(tmp_path, store=store), Reports())
    assert not err.value.kind.counts_attempt
    assert err.value.dependency == f"heygem service {url}"  # as `status` names the service
    assert err.value.reason.startswith(
        f"no heygem service can take the job ({url}: heygem service at {url} unreachable")
    assert temp_files(data_dir) == [] and store.heygem.select() == []
    (shown,) = HeygemEngine.dependencies(engine.settings)  # what `status` shows
    assert shown.state == "down" and "unreachable" in shown.detail


def test_a_restart_mid_render_is_an_outage_and_the_next_attempt_delivers(tmp_path, data_dir, service, group, store):
    group.render_seconds = 5
    engine, task = engine_for(data_dir, service.url), make_task(tmp_path, store=store)
    restart = threading.Timer(0.5, service.restart, args=(1.0,))
    restart.start()
    with pytest.raises(OutageError, match="stopped answering during the render|restarted and lost the job"):
        engine.generate(task, Reports())
    group.render_seconds = 0
    restart.join()  # the service is back once restart() returned, however loaded the machine is
    engine.generate(task, Reports())
    assert video_facts(task.output).has_audio
    sweep(tmp_path, store)  # the lost job's code: the service forgot it in the restart
    assert temp_files(data_dir) == [] and store.heygem.select() == []


def test_a_service_that_was_down_is_asked_again_while_the_other_is_busy(tmp_path, data_dir, service, other, group):
    other.occupy()
    service.down()
    threading.Timer(0.5, service.up).start()
    seen = Reports()
    engine_for(data_dir, service.url, other.url).generate(make_task(tmp_path, task_id=0), seen)
    assert [e[1] for e in group.events("submit")] == ["a"]
    assert group.events("busy") and seen.beats > 0


def test_a_busy_service_is_skipped_for_a_free_one(tmp_path, data_dir, service, other, group):
    service.occupy()
    # Tasks spread over the services by id: task 2 of 2 services asks the first one first.
    engine_for(data_dir, service.url, other.url).generate(make_task(tmp_path, task_id=2), Reports())
    assert [e[1] for e in group.events("busy")] == ["a"]
    assert [e[1] for e in group.events("submit")] == ["b"]


def test_a_service_wedged_by_another_client_is_shown_and_alerted_while_the_other_one_works(
        tmp_path, data_dir, service, other, group, store):
    service.occupy()
    settings = {"busy_alert_seconds": 0.2}
    engine = engine_for(data_dir, service.url, other.url, **settings)
    for task_id in (2, 4):  # both ask the wedged service first
        engine.generate(make_task(tmp_path, task_id=task_id), Reports())
        time.sleep(0.2)
    assert [e[1] for e in group.events("submit")] == ["b", "b"]
    states = {d.name: d.state for d in HeygemEngine.dependencies(engine.settings)}
    assert states == {f"heygem service {service.url}": "wedged", f"heygem service {other.url}": "ok"}
    cfg = Config.model_validate({"base_dir": str(tmp_path), "engines": {"heygem": {
        "services": [service.url, other.url], "data_dir": str(data_dir), **settings}}})
    alerts: list[tuple[str, str]] = []
    OutageWatch(cfg, store, lambda *alert: alerts.append(alert)).check()
    ((key, text),) = alerts
    assert key.startswith(f"outage:heygem service {service.url}@")
    assert "is wedged: busy with a job that is not ours" in text and "duix-avatar-gen-video" in text
    doctor = HeygemEngine.doctor(engine.settings, ["cpu"])
    assert [c.ok for c in doctor if "jobs" in c.name] == [False]


def test_status_names_the_wedged_service(tmp_path, data_dir, service, other, capsys):
    service.occupy()
    engine = engine_for(data_dir, service.url, other.url, busy_alert_seconds=0.1)
    engine.generate(make_task(tmp_path, task_id=2), Reports())
    time.sleep(0.15)
    engine.generate(make_task(tmp_path, task_id=4), Reports())
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"base_dir": str(tmp_path), "engine": {"name": "heygem"}, "engines": {
        "heygem": {"services": [service.url, other.url], "data_dir": str(data_dir), "busy_alert_seconds": 0.1}}}))
    assert cli_main(["-c", str(config), "status"]) == 0
    out = capsys.readouterr().out
    assert f"heygem service {service.url} is WEDGED: busy with a job that is not ours" in out
    assert other.url not in out


# --- files: several hosts, leftovers -------------------------------------------------------------------


def test_each_service_may_have_its_own_data_folder(tmp_path, group):
    first, second = tmp_path / "gpu1", tmp_path / "gpu2"
    a, b = HeygemStandin("a", first, group), HeygemStandin("b", second, group)
    try:
        a.occupy()
        engine = engine_for(first, a.url, {"url": b.url, "data_dir": str(second)})
        engine.generate(make_task(tmp_path, task_id=0), Reports())
    finally:
        a.stop()
        b.stop()
    ((_, service, _),) = group.events("submit")
    assert service == "b" and temp_files(first) == [] and temp_files(second) == []


def test_codes_of_a_cut_short_attempt_are_swept_once_the_service_forgot_them(tmp_path, data_dir, service, store):
    code = "7d0c4a52-0000-4000-8000-000000000001"
    temp = data_dir / "temp"
    temp.mkdir(exist_ok=True)
    for name in (f"{code}-audio.wav", f"{code}-avatar.mp4", f"{code}_format.wav", f"{code}-r.mp4"):
        (temp / name).write_bytes(b"x")
    (temp / "someone-elses.mp4").write_bytes(b"y")
    store.heygem.remember(code, str(temp), 1)
    store.heygem.submitted(code, str(temp), service.url)
    removed = sweep(tmp_path, store).removed  # the service answers 10004: it has forgotten the code
    assert len(removed) == 4 and temp_files(data_dir) == ["someone-elses.mp4"] and store.heygem.select() == []


# --- pool, doctor, settings, intake ---------------------------------------------------------------------


def test_one_service_serves_one_task_holder_at_a_time(tmp_path):
    pool = ServicePool([Endpoint("http://a", tmp_path), Endpoint("http://b", tmp_path)])
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
    with pytest.raises(ConfigError, match=r"engines\.heygem\.services\.0\.url: .*is not an http\(s\) URL"):
        settings_for(load_config(path, environ={}, prepare=False), "heygem")


def test_the_removed_stall_seconds_is_a_config_error_naming_the_replacement(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(f"engines:\n  heygem:\n    stall_seconds: 600\n    data_dir: {tmp_path}\n")
    with pytest.raises(ConfigError, match=r"engines\.heygem\.stall_seconds: removed.*render_timeout_factor"):
        settings_for(load_config(path, environ={}, prepare=False), "heygem")


def test_the_commented_engine_examples_in_config_yaml_are_valid():
    heygem = HeygemEngine.Settings.model_validate(commented_engine_example("heygem"))
    command = CommandEngine.Settings.model_validate(commented_engine_example("command"))
    assert [e.url for e in heygem.endpoints()] == ["http://127.0.0.1:8383", "http://gpu2:8383"]
    assert heygem.endpoints()[1].data_dir == Path("/mnt/gpu2/face2face")
    assert command.progress_regex == r"(\d+)%"


def test_intake_refuses_a_portrait_with_several_faces_for_heygem(tmp_path):
    assert needs_face("heygem", {}) is FaceRule.ONE
    with pytest.raises(ProbeError, match="more than one face in two.jpg"):
        probe_portrait(two_faces(tmp_path), Limits(), FaceRule.ONE)
    assert probe_portrait(two_faces(tmp_path), Limits(), FaceRule.ANY).kind == "image"
    assert probe_portrait(PORTRAIT_JPG, Limits(), FaceRule.ONE).kind == "image"
