"""The suite keeps its own promises: `make test-fast` (-m "not daemon") starts no real daemon process."""

from __future__ import annotations

import pytest

from daemon_harness import DaemonHarness
from remote_rig import RemoteWorker


def test_an_unmarked_test_starting_the_real_daemon_fails_saying_to_mark_it(tmp_path):
    harness = DaemonHarness(tmp_path / "base")
    with pytest.raises(RuntimeError, match="not marked `@pytest.mark.daemon`"):
        harness.start()
    assert harness.proc is None


def test_an_unmarked_test_starting_a_remote_worker_fails_saying_to_mark_it(tmp_path):
    worker = RemoteWorker(tmp_path / "worker", "w1", {}, {})
    with pytest.raises(RuntimeError, match="not marked `@pytest.mark.daemon`"):
        worker.launch()
    assert worker.proc is None
