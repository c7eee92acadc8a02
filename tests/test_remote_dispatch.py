"""Remote generation in-process: what travels to a worker, the path map, the config, and a broker that
cannot be reached (the real-process behaviour is in test_remote.py)."""

from __future__ import annotations

import json
import os
import signal
import threading
from pathlib import Path

import pytest
import redis as redis_client
from billiard.exceptions import TimeLimitExceeded
from remote_rig import RedisServer, free_port
from test_job_lifecycle import FakeClock, claimed

from heygem_daemon.config import ConfigError, load_config
from heygem_daemon.failures import Kind, Problem
from heygem_daemon.generation.celery_app import (
    attempt_part,
    decode,
    encode,
    make_app,
    map_path,
    render_time_limit,
)
from heygem_daemon.generation.lifecycle import LifeCycle
from heygem_daemon.generation.remote import Flight, RemoteDispatcher
from heygem_daemon.generation.remote_worker import _Beats, child_device, child_label
from heygem_daemon.generation.workers import Attempt, task_spec
from heygem_daemon.state import Store


def remote_config(tmp_path: Path, **remote) -> dict:
    return {"base_dir": str(tmp_path), "workers": {"devices": [], "backoff_seconds": 5, "remote": {
        "broker_url": f"redis://127.0.0.1:{free_port()}/0", "queues": {"gpu": 2}, **remote}}}


def load(tmp_path: Path, data: dict):
    (tmp_path / "config.yaml").write_text(json.dumps(data))
    return load_config(tmp_path / "config.yaml", environ={})


def test_a_path_is_mapped_by_its_longest_matching_prefix():
    path_map = {"/srv/heygem": "/mnt/share", "/srv/heygem/outputs": "/mnt/out"}
    assert map_path(Path("/srv/heygem/work/j1/in/a.wav"), path_map) == Path("/mnt/share/work/j1/in/a.wav")
    assert map_path(Path("/srv/heygem/outputs/j/a.mp4"), path_map) == Path("/mnt/out/j/a.mp4")
    assert map_path(Path("/srv/heygem-other/a.wav"), path_map) == Path("/srv/heygem-other/a.wav")


def test_a_task_travels_as_json_with_the_workers_paths_and_no_store(tmp_path):
    cfg = load(tmp_path, remote_config(tmp_path, path_map={str(tmp_path): "/mnt/share"}))
    life = LifeCycle(cfg, Store(cfg.folder("state") / "heygem.db"), clock=FakeClock())
    claimed(life, "alice")
    _, spec = task_spec(cfg, life, life.take("remote:gpu"), "remote:gpu")
    travelled = decode(json.loads(json.dumps(encode(spec, cfg.workers.remote.path_map))), "cuda:0")
    assert travelled.audio == Path("/mnt/share") / spec.audio.relative_to(tmp_path)
    assert travelled.output == Path("/mnt/share") / spec.output.relative_to(tmp_path)
    assert travelled.preset == spec.preset and travelled.device == "cuda:0" and travelled.store is None


def test_an_unreachable_broker_makes_the_task_wait_without_using_an_attempt(tmp_path):
    cfg = load(tmp_path, remote_config(tmp_path))
    life = LifeCycle(cfg, Store(cfg.folder("state") / "heygem.db"))
    job = claimed(life, "alice")
    dispatcher = RemoteDispatcher(cfg, life)
    dispatcher.step()
    (task,) = life.store.tasks.select(job.id)
    assert task.state == "queued" and task.attempts == 0
    assert task.last_error["kind"] == "outage" and task.last_error["dependency"].startswith("task broker 127.0.0.1:")
    assert "redis-server" in task.last_error["hint"]
    assert [o["dependency"] for o in dispatcher.outages()] == [task.last_error["dependency"]]


def test_a_late_result_of_an_attempt_given_up_on_is_discarded(tmp_path):
    cfg = load(tmp_path, remote_config(tmp_path))
    life = LifeCycle(cfg, Store(cfg.folder("state") / "heygem.db"), clock=FakeClock())
    job = claimed(life, "alice")
    first = life.take("remote:gpu")
    life.attempt_failed(first, Problem(Kind.ENGINE, "generate", "remote worker silent"), "remote:gpu")
    life.clock.advance(3600)
    second = life.take("remote:gpu")
    late = attempt_part(first.output, first.attempts)
    late.parent.mkdir(parents=True)
    late.write_bytes(b"a video from attempt 1")
    RemoteDispatcher(cfg, life)._finish(Flight(first, "gpu", None, late, 1.0, 1.0), Attempt(True))
    (task,) = life.store.tasks.select(job.id)
    assert (task.state, task.attempts) == ("running", second.attempts) and second.attempts == 2
    assert not late.exists() and not Path(first.output).exists()


def test_remote_only_needs_no_local_device_but_a_redis_broker(tmp_path):
    assert load(tmp_path, remote_config(tmp_path)).workers.devices == []
    with pytest.raises(ConfigError, match="broker_url: Value error|use a Redis URL"):
        load(tmp_path, remote_config(tmp_path, broker_url="amqp://localhost"))
    with pytest.raises(ConfigError, match="visibility_timeout_seconds must be above stall_seconds"):
        load(tmp_path, remote_config(tmp_path, visibility_timeout_seconds=60))
    with pytest.raises(ConfigError, match="list at least one device"):
        load(tmp_path, {"base_dir": str(tmp_path), "workers": {"devices": []}})


def test_each_pool_child_sees_only_its_own_card(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert child_device(["cuda:0", "cuda:3"], 1) == "cuda:0" and os.environ["CUDA_VISIBLE_DEVICES"] == "3"
    assert child_device(["cpu"], 0) == "cpu"


def test_status_names_each_pool_child_by_its_own_device():
    assert [child_label(["cuda:0", "cuda:3"], i) for i in (0, 1)] == ["cuda:0", "cuda:3"]
    assert [child_label(["cpu", "cpu"], i) for i in (0, 1)] == ["cpu#0", "cpu#1"]


def test_the_celery_id_of_an_attempt_is_stored_before_it_is_sent(tmp_path):
    cfg = load(tmp_path, remote_config(tmp_path))
    life = LifeCycle(cfg, Store(cfg.folder("state") / "heygem.db"))
    job = claimed(life, "alice")
    RemoteDispatcher(cfg, life).step()  # the broker is away: the send fails after the id is written
    (task,) = life.store.tasks.select(job.id)
    (attempt,) = life.store.tasks.attempts(task.id)
    assert attempt["outcome"] == "outage" and attempt["remote_id"].startswith(f"heygem-{task.id}-1-")


def sent_before_a_restart(tmp_path: Path, queue: str):
    """A job whose one task a previous daemon process sent to `queue` as Celery task heygem-1-1-abc."""
    cfg = load(tmp_path, remote_config(tmp_path))
    store = Store(cfg.folder("state") / "heygem.db")
    job = claimed(LifeCycle(cfg, store), "alice")
    sent = store.tasks.take_next(f"remote:{queue}")
    store.tasks.set_remote_id(sent.id, "heygem-1-1-abc")
    return cfg, store, job, sent


def test_a_restart_leaves_a_remote_render_running_and_the_dispatcher_follows_the_same_celery_task(tmp_path):
    cfg, store, job, sent = sent_before_a_restart(tmp_path, "gpu")
    life = LifeCycle(cfg, store)
    dispatcher = RemoteDispatcher(cfg, life)  # a new process: nothing in flight yet
    assert life.recover(dispatcher.adoptable())["adopted"] == 1
    dispatcher._adopt()
    (flight,) = dispatcher.flights["gpu"]
    assert flight.celery_id == "heygem-1-1-abc" and flight.part == attempt_part(sent.output, 1)
    (task,) = store.tasks.select(job.id)
    assert (task.state, task.attempts) == ("running", 1)


def test_a_render_on_a_queue_no_longer_served_is_queued_again_at_restart(tmp_path):
    cfg, store, job, _ = sent_before_a_restart(tmp_path, "old-queue")
    life = LifeCycle(cfg, store)
    assert life.recover(RemoteDispatcher(cfg, life).adoptable()) == {"requeued": 1, "completed": 0, "adopted": 0}
    (task,) = store.tasks.select(job.id)
    assert (task.state, task.attempts) == ("queued", 0)


def test_a_stop_leaves_remote_renders_running_for_the_next_start_to_adopt(tmp_path):
    cfg, store, job, task = sent_before_a_restart(tmp_path, "gpu")
    life = LifeCycle(cfg, store)
    dispatcher = RemoteDispatcher(cfg, life)
    dispatcher.flights["gpu"].append(Flight(task, "gpu", None, attempt_part(task.output, 1), 1.0, 1.0))
    dispatcher._leave_running()
    assert not dispatcher.busy()
    assert [(t.id, t.state) for t, _ in life.store.tasks.running_remote()] == [(task.id, "running")]
    assert RemoteDispatcher(cfg, life).adoptable() == {task.id}
    assert life.store.tasks.select(job.id)[0].state == "running"


@pytest.fixture
def redis(tmp_path):
    server = RedisServer(tmp_path / "redis").start()
    yield server
    server.stop()


def dispatching(tmp_path: Path, redis: RedisServer, pairs: int = 1):
    """A dispatcher on a real Redis whose queue no worker serves, on a fake clock, and a job of `pairs` tasks."""
    cfg = load(tmp_path, remote_config(tmp_path, broker_url=redis.url))
    life = LifeCycle(cfg, Store(cfg.folder("state") / "heygem.db"), clock=FakeClock())
    job = claimed(life, "alice", pairs=pairs)
    return cfg, life, job, RemoteDispatcher(cfg, life, life.clock)


def test_tasks_lost_with_the_brokers_data_are_sent_again_without_using_an_attempt(tmp_path, redis):
    cfg, life, job, dispatcher = dispatching(tmp_path, redis, pairs=2)
    clock = life.clock
    dispatcher.step()  # both sent to a queue no worker serves: they wait in Redis
    first = {f.celery_id for f in dispatcher.flights["gpu"]}
    client = redis_client.Redis.from_url(redis.url)
    assert client.llen("gpu") == 2
    clock.advance(cfg.workers.stall_seconds + 1)
    dispatcher.step()  # waiting in the queue that long is no loss
    assert {f.celery_id for f in dispatcher.flights["gpu"]} == first
    client.flushall()  # what a restart without persistence leaves
    dispatcher.step()
    assert {f.celery_id for f in dispatcher.flights["gpu"]} == first  # a render may still beat
    clock.advance(cfg.workers.stall_seconds + 1)
    dispatcher.step()  # missing at the first look
    assert {f.celery_id for f in dispatcher.flights["gpu"]} == first
    dispatcher.step()  # and at the second: sent again
    assert client.llen("gpu") == 2 and not first & {f.celery_id for f in dispatcher.flights["gpu"]}
    for task in life.store.tasks.select(job.id):
        assert (task.state, task.attempts) == ("running", 1)
        assert [a["outcome"] for a in life.store.tasks.attempts(task.id)] == ["interrupted", None]


def test_a_task_heard_of_after_the_broker_lost_its_data_is_left_running(tmp_path, redis):
    cfg, life, _, dispatcher = dispatching(tmp_path, redis)
    clock = life.clock
    dispatcher.step()
    (flight,) = dispatcher.flights["gpu"]
    redis_client.Redis.from_url(redis.url).flushall()
    dispatcher.step()
    clock.advance(1)
    # The worker still renders: its next heartbeat writes the task's state again.
    dispatcher.app.backend.store_result(flight.celery_id, {"host": "w1", "beat": 2.0}, "PROGRESS")
    dispatcher.step()
    clock.advance(cfg.workers.stall_seconds)
    dispatcher.step()
    assert dispatcher.flights["gpu"] == [flight] and life.store.tasks.get(flight.task.id).attempts == 1


def test_a_render_is_stopped_before_redis_would_hand_its_task_to_a_second_worker(tmp_path):
    for visibility in (600.0, 3600.0, 43200.0):
        remote = load(tmp_path, remote_config(tmp_path, visibility_timeout_seconds=visibility)).workers.remote
        assert 0 < make_app(remote).conf.task_time_limit == render_time_limit(remote) < visibility


def test_a_render_stopped_at_the_time_limit_fails_its_attempt_saying_which_setting_to_raise(tmp_path, redis):
    _, life, job, dispatcher = dispatching(tmp_path, redis)
    dispatcher.step()
    (flight,) = dispatcher.flights["gpu"]
    # What a worker's pool stores when it kills a child at the hard time limit.
    dispatcher.app.backend.mark_as_failure(flight.celery_id, TimeLimitExceeded(41040.0))
    dispatcher.step()
    (task,) = life.store.tasks.select(job.id)
    assert task.state == "queued" and task.attempts == 1
    assert "ran past 41040 s" in task.last_error["reason"]
    assert "visibility_timeout_seconds" in task.last_error["hint"]


def test_a_redis_that_stops_answering_is_an_outage_not_a_stuck_dispatcher(tmp_path, redis):
    _, life, _, dispatcher = dispatching(tmp_path, redis)
    dispatcher.step()  # alice's task sent
    later = claimed(life, "bob")  # a free place on the queue: the next step would send it
    os.kill(redis.proc.pid, signal.SIGSTOP)  # it still accepts connections, but answers nothing
    try:
        stepping = threading.Thread(target=dispatcher.step, daemon=True)
        stepping.start()
        stepping.join(90)  # redis-py's default would wait 120 s for each answer
        assert not stepping.is_alive(), "the dispatch loop hangs on a Redis that does not answer"
    finally:
        os.kill(redis.proc.pid, signal.SIGCONT)
    assert f"task broker 127.0.0.1:{redis.port}" in [o["dependency"] for o in dispatcher.outages()]
    (task,) = life.store.tasks.select(later.id)
    assert (task.state, task.attempts) == ("queued", 0)  # not sent into a broker known to be away


def test_a_task_the_daemon_died_before_sending_is_sent_after_the_restart(tmp_path, redis):
    cfg = load(tmp_path, remote_config(tmp_path, broker_url=redis.url))
    store = Store(cfg.folder("state") / "heygem.db")
    job = claimed(LifeCycle(cfg, store), "alice")
    store.tasks.set_remote_id(store.tasks.take_next("remote:gpu").id, "heygem-1-1-neversent")
    life = LifeCycle(cfg, store, clock=FakeClock())
    dispatcher = RemoteDispatcher(cfg, life, life.clock)
    life.recover(dispatcher.adoptable())
    dispatcher._adopt()
    life.clock.advance(cfg.workers.stall_seconds + 1)
    dispatcher.step()
    dispatcher.step()
    (flight,) = dispatcher.flights["gpu"]
    assert flight.celery_id != "heygem-1-1-neversent"
    assert redis_client.Redis.from_url(redis.url).llen("gpu") == 1
    (task,) = store.tasks.select(job.id)
    assert (task.state, task.attempts) == ("running", 1)
    assert [a["outcome"] for a in store.tasks.attempts(task.id)] == ["interrupted", None]


def test_a_task_found_revoked_is_sent_again(tmp_path, redis):
    _, life, job, dispatcher = dispatching(tmp_path, redis)
    dispatcher.step()
    (flight,) = dispatcher.flights["gpu"]
    dispatcher.app.backend.mark_as_revoked(flight.celery_id)  # revoked, and then the daemon died
    dispatcher.step()
    (again,) = dispatcher.flights["gpu"]
    assert again.celery_id != flight.celery_id and life.store.tasks.get(flight.task.id).attempts == 1


def test_a_flight_that_cannot_be_finished_fails_alone_and_the_others_go_on(tmp_path):
    cfg = load(tmp_path, remote_config(tmp_path))
    life = LifeCycle(cfg, Store(cfg.folder("state") / "heygem.db"), clock=FakeClock())
    job = claimed(life, "alice", pairs=2)
    dispatcher = RemoteDispatcher(cfg, life, life.clock)
    for task in (life.take("remote:gpu"), life.take("remote:gpu")):
        part = attempt_part(task.output, task.attempts)
        part.parent.mkdir(parents=True, exist_ok=True)
        part.write_bytes(b"a rendered video")  # the worker's part: done
        dispatcher.flights["gpu"].append(Flight(task, "gpu", f"heygem-{task.id}-1-x", part, 1.0, 1.0))
    blocked = dispatcher.flights["gpu"][0].task
    Path(blocked.output).mkdir()  # its part cannot be renamed into place
    dispatcher.step()
    first, second = life.store.tasks.select(job.id)
    assert (first.state, first.last_error["kind"]) == ("queued", "internal")
    assert "IsADirectoryError" in first.last_error["reason"]
    assert second.state == "done"


def test_heartbeats_sent_from_a_transfer_thread_reach_their_task(tmp_path, redis):
    app = make_app(load(tmp_path, remote_config(tmp_path, broker_url=redis.url)).workers.remote)

    @app.task(bind=True, name="heygem.test-beats")
    def task(self, payload):  # the worker's task, as Celery runs it
        return payload

    task.push_request(id="heygem-7-1-abcd")
    beats = _Beats(task, {"host": "w1"}, 0.1)
    beating = threading.Thread(target=beats.heartbeat, kwargs={"force": True})
    beating.start()
    beating.join()
    assert app.backend.get_task_meta("heygem-7-1-abcd")["status"] == "PROGRESS"
