"""SIGHUP planning: what applies at once, what waits for a restart."""

from __future__ import annotations

from heygem_daemon.config import load_config
from heygem_daemon.ops.reload import plan_reload


def config(tmp_path, text: str):
    path = tmp_path / "config.yaml"
    path.write_text("base_dir: .\n" + text)
    return load_config(path, environ={}, prepare=False)


def test_live_keys_apply_and_restart_keys_keep_their_running_value(tmp_path):
    old = config(tmp_path, "watcher: {settle_seconds: 3}\nworkers: {devices: [cpu]}\n")
    new = config(tmp_path, "watcher: {settle_seconds: 1, mode: polling}\nworkers: {devices: ['cuda:0'], "
                           "max_attempts: 5}\nlogging: {level: debug}\nfolders: {outputs: /srv/out}\n")
    plan = plan_reload(old, new)
    assert plan.live == ["logging.level", "watcher.settle_seconds", "workers.max_attempts"]
    assert plan.restart == ["folders.outputs", "watcher.mode", "workers.devices"]
    assert plan.applied.watcher.settle_seconds == 1 and plan.applied.workers.max_attempts == 5
    assert plan.applied.watcher.mode == "auto" and plan.applied.workers.devices == ["cpu"]
    assert plan.applied.folder("outputs") == old.folder("outputs")


def test_an_engine_section_added_needs_a_restart(tmp_path):
    plan = plan_reload(config(tmp_path, ""), config(tmp_path, "engines: {preview: {mouth_gain: 2}}\n"))
    assert plan.restart == ["engines.preview.mouth_gain"] and plan.live == []
    assert plan.applied.engines == {}


def test_same_config_changes_nothing(tmp_path):
    plan = plan_reload(config(tmp_path, ""), config(tmp_path, ""))
    assert plan.live == plan.restart == []
