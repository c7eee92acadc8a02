"""The daemon around heygem services that go away, in-process: real stand-in services on 127.0.0.1, the real
heygem engine run by a slot in this process, a real store; the outage watch's clock is moved instead of
sleeping. One outage is one alert and one back note; the tasks waiting for a service go as soon as it
answers, not when their backoff ends; a render left on a service by a killed daemon is taken, not redone."""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import pytest

from heygem_daemon.config import load_config
from heygem_daemon.engines.base import TaskSpec
from heygem_daemon.failures import Kind
from heygem_daemon.generation.lifecycle import LifeCycle
from heygem_daemon.generation.outages import OutageWatch
from heygem_daemon.generation.workers import Attempt, Slot, run_engine
from heygem_daemon.state import Store
from heygem_standin import Group, HeygemStandin
from notify_receiver import wait_until
from test_job_lifecycle import FakeClock, claimed

ALERT_SECONDS = 30


class Silent:
    def __call__(self, fraction: float) -> None: ...

    def heartbeat(self) -> None: ...


class Killed(BaseException):
    """The daemon dies: nothing below the slot catches it, nothing is recorded."""


class DiesOnceRendering(Silent):
    """Kills the attempt at its first progress from the service (the job is running there by then)."""

    def __call__(self, fraction: float) -> None:
        if fraction > 0.05:
            raise Killed


class HeygemInProcess(Slot):
    """The real heygem engine in this process instead of a worker process (same TaskSpec, same outcome)."""

    progress: Silent = Silent()

    def _attempt(self, engine: str, spec: TaskSpec) -> Attempt:
        self.engines: dict[str, Any] = getattr(self, "engines", {})  # built once, as a worker process does
        outcome = run_engine(self.engines, self.engine_settings, engine, spec, self.progress)
        if outcome[0] == "done":
            return Attempt(True)
        _, kind, reason, hint, dependency = outcome
        return Attempt(False, reason, hint, Kind(kind), dependency=dependency)


class Told:
    """The operator's side: alerts and back notes, in order."""

    def __init__(self) -> None:
        self.alerts: list[tuple[str, str]] = []
        self.backs: list[tuple[str, str]] = []
        self.woken = 0

    def watch(self, life: LifeCycle, clock: FakeClock) -> OutageWatch:
        return OutageWatch(life.cfg, life.store, lambda *a: self.alerts.append(a), clock,
                           wake=self._wake, on_back=lambda *a: self.backs.append(a))

    def _wake(self) -> None:
        self.woken += 1


@pytest.fixture
def services(tmp_path):
    group = Group()
    pair = [HeygemStandin(n, tmp_path / "face2face", group) for n in ("a", "b")]
    yield pair
    for s in pair:
        s.stop()


def life_for(tmp_path, services: list[HeygemStandin], clock: FakeClock, backoff: float) -> LifeCycle:
    (tmp_path / "config.yaml").write_text(json.dumps({
        "base_dir": str(tmp_path), "engine": {"name": "heygem"},
        "engines": {"heygem": {"services": [s.url for s in services], "data_dir": str(services[0].data_dir),
                               "poll_interval": 0.05, "busy_retry_interval": 0.05}},
        "workers": {"backoff_seconds": backoff, "backoff_max_seconds": backoff,
                    "outage_alert_seconds": ALERT_SECONDS}}))
    cfg = load_config(tmp_path / "config.yaml", environ={})
    return LifeCycle(cfg, Store(cfg.folder("state") / "heygem.db"), clock=clock)


def heygem_slot(life: LifeCycle, clock: FakeClock) -> HeygemInProcess:
    settings = {name: dict(raw) for name, raw in life.cfg.engines.items()}
    return HeygemInProcess(life.cfg, life, "cpu", 0, threading.Event(), threading.Event(), settings,
                           threading.Event(), clock)


def later(clock: FakeClock, seconds: float) -> None:
    clock.now = max(clock.now, time.time()) + seconds


def test_two_services_down_with_tasks_waiting_on_each_is_one_alert_and_one_back_note(tmp_path, services):
    clock = FakeClock()
    clock.now = time.time()
    life = life_for(tmp_path, services, clock, backoff=600)
    for s in services:
        s.down()
    job = claimed(life, "duo", pairs=2, media=True)
    slot = heygem_slot(life, clock)
    assert slot.step() and slot.step()  # each task tries both services, each records the one it tried first
    waits = {t.last_error["dependency"] for t in life.store.tasks.select(job.id)}
    assert waits == {f"heygem service {s.url}" for s in services}
    told = Told()
    watch = told.watch(life, clock)
    assert watch.check() == []  # not yet outage_alert_seconds
    later(clock, ALERT_SECONDS + 1)
    watch.check()
    later(clock, 11)
    watch.check()  # still out: nothing more
    ((key, text),) = told.alerts
    assert all(f"heygem service {s.url} is down" in text for s in services) and text.count("1 task(s)") == 2
    for s in services:
        s.up()
    assert sorted(watch.probe()) == sorted(waits)
    later(clock, 11)
    watch.check()
    later(clock, 11)
    watch.check()
    ((back_key, back),) = told.backs
    assert back_key.startswith("back:") and all(f"heygem service {s.url} is back" in back for s in services)
    assert len(told.alerts) == 1


def test_tasks_waiting_for_a_service_go_as_soon_as_it_answers_whatever_their_backoff(tmp_path, services):
    clock = FakeClock()
    clock.now = time.time()
    service = services[0]
    life = life_for(tmp_path, [service], clock, backoff=600)
    service.down()
    job = claimed(life, "solo", media=True)
    slot = heygem_slot(life, clock)
    assert slot.step()
    (task,) = life.store.tasks.select(job.id)
    assert task.state == "queued" and task.not_before > clock.now + 250 and task.progress == 0
    told = Told()
    watch = told.watch(life, clock)
    assert watch.probe() == []  # still down: asked, nothing woken
    assert not slot.step()
    service.up()
    later(clock, 0.1)  # the next probe is due poll_interval after the last
    assert watch.probe() == [f"heygem service {service.url}"]
    assert told.woken == 1 and life.store.tasks.get(task.id).not_before <= clock.now
    assert slot.step()
    assert life.store.jobs.get(job.id).state == "done"
    assert [a["outcome"] for a in life.store.tasks.attempts(task.id)] == ["outage", "done"]


def test_a_render_a_killed_daemon_left_on_the_service_is_taken_after_restart_not_rendered_again(
        tmp_path, services):
    clock = FakeClock()
    clock.now = time.time()
    service = services[0]
    life = life_for(tmp_path, [service], clock, backoff=600)
    service.group.behaviours.append("hang")
    job = claimed(life, "solo", media=True)
    slot = heygem_slot(life, clock)
    slot.progress = DiesOnceRendering()
    with pytest.raises(Killed):
        slot.step()
    (code,) = [e[2].split()[0] for e in service.group.events("submit")]
    life.recover()  # the next start: the task is queued again, its attempt not counted
    service.release()
    wait_until(lambda: service.group.events("end"), 30, lambda: "the render to end on the service")
    slot.progress = Silent()
    assert slot.step()
    assert life.store.jobs.get(job.id).state == "done"
    assert len(service.group.events("submit")) == 1  # rendered once
    assert ("status2", "a", code) in service.group.journal  # its end, told to the attempt that took it
    assert sorted((service.data_dir / "temp").iterdir()) == [] and life.store.heygem.select() == []
