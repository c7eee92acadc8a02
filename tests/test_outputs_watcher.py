"""The outputs watcher's work follows what changed, not how many videos outputs/ already holds."""

from __future__ import annotations

from pathlib import Path

import pytest

from heygem_daemon.config import Watcher
from heygem_daemon.delivery.outputs import OutputsWatcher

EARLIER = 500


class Known:
    """delivery's question "is this path delivered already?", counting how often it is asked."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.paths: set[str] = set()
        self.asked = 0

    def __call__(self, rel: str) -> bool:
        self.asked += 1
        return str(self.root / rel) in self.paths


@pytest.fixture
def outputs(tmp_path):
    root = tmp_path / "outputs"
    known = Known(root)
    for i in range(EARLIER):
        path = root / f"old-{i // 50:02d}" / f"v{i:04d}.mp4"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"video")
        known.paths.add(str(path))
    watcher = OutputsWatcher(root, Watcher(settle_seconds=1.0, rescan_seconds=60.0))
    assert watcher.step(0.0, known) == []  # the start-up walk sees everything once
    assert known.asked == EARLIER
    known.asked = 0
    return root, watcher, known


def test_a_new_job_folder_costs_a_look_at_that_folder_only(outputs):
    root, watcher, known = outputs
    (root / "new").mkdir()
    (root / "new" / "a.mp4").write_bytes(b"new video")
    watcher.touch(str(root / "new"))  # what watchdog reports: the folder created, then the file
    watcher.touch(str(root / "new" / "a.mp4"))
    assert watcher.step(1.0, known) == []
    assert watcher.step(2.5, known) == [("new/a.mp4", 9)]
    assert known.asked <= 3


def test_the_periodic_rescan_finds_a_missed_video_looking_only_at_what_changed_since_the_last_walk(outputs):
    root, watcher, known = outputs
    watcher.rescan_slack_ns = 0  # the earlier videos were written a moment ago, within the 1 s slack
    (root / "old-03" / "missed.mp4").write_bytes(b"no event came")
    assert watcher.step(61.0, known) == []
    assert watcher.step(62.5, known) == [("old-03/missed.mp4", 13)]
    assert known.asked <= 3


def test_a_full_walk_when_asked_sees_every_file_again(outputs):
    root, watcher, known = outputs
    watcher.touch(None)  # the kernel dropped events
    watcher.step(1.0, known)
    assert known.asked == EARLIER


def test_with_inotify_idle_steps_walk_nothing_until_lost_events_ask_for_a_full_walk(outputs):
    root, watcher, known = outputs
    watcher.periodic = False  # as the delivery service sets it for inotify: the kernel reports every change
    watcher.rescan_slack_ns = 0
    (root / "old-03" / "missed.mp4").write_bytes(b"no event came")
    assert watcher.step(61.0, known) == [] and watcher.step(125.0, known) == []
    assert known.asked == 0  # nothing looked at, however long it idles
    watcher.touch(None)  # the kernel dropped events: then everything is looked at once
    assert watcher.step(126.0, known) == []
    assert watcher.step(127.5, known) == [("old-03/missed.mp4", 13)]
