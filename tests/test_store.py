import threading
import time

from heygem_daemon.state import NewTask, Store


def make_store(tmp_path) -> Store:
    return Store(tmp_path / "heygem.db")


def queued_job(store: Store, name: str = "alice", n: int = 1) -> str:
    job = store.jobs.create(name, {"pairs": []})
    store.jobs.queue(job.id, [NewTask(f"t{i}", "a.wav", "p.jpg", f"/out/{name}/t{i}.mp4") for i in range(n)])
    return job.id


def test_job_names_are_made_unique(tmp_path):
    store = make_store(tmp_path)
    assert store.jobs.create("alice", {}).name == "alice"
    assert store.jobs.create("alice", {}).name == "alice-2"
    assert store.jobs.create("bob", {}, taken={"bob"}).name == "bob-2"


def test_claimed_job_is_queued_with_its_tasks_in_one_step(tmp_path):
    store = make_store(tmp_path)
    job_id = queued_job(store, n=3)
    assert store.jobs.get(job_id).state == "queued"
    assert [t.state for t in store.tasks.select(job_id)] == ["queued"] * 3


def test_take_next_task_hands_each_task_to_exactly_one_taker(tmp_path):
    store = make_store(tmp_path)
    queued_job(store, n=20)
    taken: list[int] = []
    lock = threading.Lock()

    def taker() -> None:
        own = Store(tmp_path / "heygem.db")
        while (task := own.tasks.take_next("cpu")) is not None:
            with lock:
                taken.append(task.id)

    threads = [threading.Thread(target=taker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(taken) == sorted(set(taken)) and len(taken) == 20


def test_taking_a_task_marks_job_running_and_counts_the_attempt(tmp_path):
    store = make_store(tmp_path)
    job_id = queued_job(store)
    task = store.tasks.take_next("cuda:0")
    assert task is not None and task.state == "running" and task.attempts == 1 and task.device == "cuda:0"
    assert store.jobs.get(job_id).state == "running"
    assert store.tasks.attempts(task.id)[0]["device"] == "cuda:0"


def test_failed_attempt_with_retry_waits_until_not_before(tmp_path):
    store = make_store(tmp_path)
    queued_job(store)
    task = store.tasks.take_next("cpu")
    assert store.tasks.fail_attempt(task.id, {"reason": "boom"}, retry_at=2e12) == "queued"
    assert store.tasks.take_next("cpu") is None
    assert store.tasks.take_next("cpu", now=2e12).id == task.id
    assert store.tasks.fail_attempt(task.id, {"reason": "boom"}, retry_at=None) == "failed"
    assert store.tasks.get(task.id).last_error == {"reason": "boom"}


def test_requeue_after_crash_does_not_count_the_interrupted_attempt(tmp_path):
    store = make_store(tmp_path)
    queued_job(store)
    task = store.tasks.take_next("cpu")
    store.tasks.requeue([task.id], reset_attempts=False)
    again = store.tasks.take_next("cpu")
    assert again.id == task.id and again.attempts == 1
    assert [a["outcome"] for a in store.tasks.attempts(task.id)][0] == "interrupted"


def test_duplicate_lookup_ignores_failed_jobs_and_the_window(tmp_path):
    store = make_store(tmp_path)
    first = store.jobs.create("a", {}, fingerprint="f1")
    store.jobs.set_state(first.id, "failed")
    assert store.jobs.find_duplicate("f1", 3600) is None
    second = store.jobs.create("b", {}, fingerprint="f1")
    store.jobs.set_state(second.id, "done")
    assert store.jobs.find_duplicate("f1", 3600).id == second.id
    assert store.jobs.find_duplicate("f1", 0) is None


def test_retried_job_frees_its_name(tmp_path):
    store = make_store(tmp_path)
    job = store.jobs.create("alice", {})
    store.jobs.set_state(job.id, "retried")
    assert store.jobs.create("alice", {}).name == "alice"


def test_new_outputs_are_the_outputs_of_done_tasks_not_taken_for_delivery_yet(tmp_path):
    store = make_store(tmp_path)
    job_id = queued_job(store, n=4)
    registered, marked, new = (store.tasks.take_next("cpu") for _ in range(3))  # t3 stays queued
    for task in (registered, marked, new):
        assert store.tasks.finish(task.id)
    store.deliveries.ensure_batch(job_id, "alice", "alice", job_id)
    store.deliveries.add(job_id, registered.output, "t0.mp4", 1, "", registered.id)
    # Delivered by a batch since forgotten: only the `delivered` mark remembers the path.
    store.deliveries.ensure_batch("adhoc-1", "alice", "alice", None)
    store.deliveries.add("adhoc-1", marked.output, "t1.mp4", 1, "", None)
    store.deliveries.mark_reported("adhoc-1", None)
    assert store.deliveries.forget_reported_adhoc(time.time() + 1) == ["alice"]
    assert store.deliveries.new_outputs(job_id) == [new.output]
