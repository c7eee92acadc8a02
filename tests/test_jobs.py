"""Finishing a job: what stays behind in outputs/ when generation made nothing."""

from __future__ import annotations

from pathlib import Path

from heygem_daemon.config import Config, load_config
from heygem_daemon.failures import Kind, Problem
from heygem_daemon.generation.lifecycle import LifeCycle
from heygem_daemon.state import NewTask, Store


def failed_job(tmp_path: Path, leave: str | None = None) -> tuple[Config, Path]:
    """A job whose only task fails for good after the worker made its outputs folder (as workers do)."""
    (tmp_path / "config.yaml").write_text("base_dir: .\n")
    cfg = load_config(tmp_path / "config.yaml", environ={})
    store = Store(cfg.folder("state") / "heygem.db")
    staging = cfg.folder("work") / "x" / "in"
    staging.mkdir(parents=True)
    folder = cfg.folder("outputs") / "promo"
    job = store.jobs.create("promo", {"sources": ["promo"], "folder": True, "staging": str(staging)})
    life = LifeCycle(cfg, store)
    life.queue(store.jobs.get(job.id), [NewTask("anna", "a.wav", "anna.jpg", str(folder / "anna.mp4"))])
    task = life.take("cpu")
    folder.mkdir(parents=True)
    if leave:
        (folder / leave).write_bytes(b"not ours")
    life.attempt_failed(task, Problem(Kind.BAD_INPUT, "generate", "no face found", "use another photo"), "cpu")
    assert store.jobs.get(job.id).state == "failed"
    return cfg, folder


def test_a_job_that_made_no_video_leaves_no_outputs_folder(tmp_path):
    cfg, folder = failed_job(tmp_path)
    assert not folder.exists()
    assert (cfg.folder("failed") / "promo" / "error.json").is_file()


def test_an_outputs_folder_holding_another_file_is_left_alone(tmp_path):
    _, folder = failed_job(tmp_path, leave="notes.txt")
    assert (folder / "notes.txt").read_bytes() == b"not ours"
