"""`heygem-daemon health` (the container HEALTHCHECK): the pid lock says whether a daemon runs, its state file's
heartbeat whether its main loop still turns."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from heygem_daemon.cli import main
from heygem_daemon.ops.daemon_state import STATE_FILE, write_state
from heygem_daemon.service import acquire_lock


@pytest.fixture
def config(tmp_path: Path) -> Path:
    (tmp_path / "state").mkdir()
    path = tmp_path / "config.yaml"
    path.write_text(f"base_dir: {tmp_path}\n", encoding="utf-8")
    return path


def health(config: Path, *extra: str) -> int:
    return main(["-c", str(config), "health", *extra])


def test_health_is_ok_while_the_daemon_holds_its_lock_and_beats(config: Path, capsys) -> None:
    state = config.parent / "state"
    with acquire_lock(state):
        write_state(state, draining=False)
        assert health(config) == 0
    assert capsys.readouterr().out.strip() == "healthy"


def test_health_fails_when_no_daemon_holds_the_lock(config: Path, capsys) -> None:
    state = config.parent / "state"
    with acquire_lock(state):
        write_state(state, draining=False)
    # The state file of the daemon that stopped is still there: only the lock says who runs.
    assert health(config) == 1
    assert "not running" in capsys.readouterr().err


def test_health_fails_when_the_heartbeat_is_older_than_max_age(config: Path, capsys) -> None:
    state = config.parent / "state"
    with acquire_lock(state):
        write_state(state, draining=False)
        saved = json.loads((state / STATE_FILE).read_text(encoding="utf-8"))
        (state / STATE_FILE).write_text(json.dumps({**saved, "updated": time.time() - 120}), encoding="utf-8")
        assert health(config, "--max-age", "60") == 1
        assert health(config, "--max-age", "600") == 0
    assert "stuck" in capsys.readouterr().err
