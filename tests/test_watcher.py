"""The folder watcher: a re-created folder is watched again, and lost kernel events ask for a rescan."""

from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path

import pytest

from heygem_daemon.fs.watcher import start_watcher


class Touches:
    """What the watcher reported, with a way to wait for one report (no fixed sleeps)."""

    def __init__(self) -> None:
        self.paths: list[str | None] = []
        self.changed = threading.Condition()

    def __call__(self, path: str | None) -> None:
        with self.changed:
            self.paths.append(path)
            self.changed.notify_all()

    def wait_for(self, wanted: str | None, timeout: float = 10.0) -> bool:
        with self.changed:
            return self.changed.wait_for(lambda: wanted in self.paths, timeout)


@pytest.fixture
def watched(tmp_path):
    folder = tmp_path / "inbox"
    folder.mkdir()
    touches = Touches()
    observer, mode = start_watcher(folder, "inotify", 1.0, touches)
    assert mode == "inotify"
    yield folder, touches, observer
    observer.stop()
    observer.join(5)


def test_a_deleted_and_re_created_folder_is_watched_again_and_rescanned(watched):
    folder, touches, _observer = watched
    shutil.rmtree(folder)
    folder.mkdir()
    assert touches.wait_for(None), "no rescan asked for after the folder came back"
    (folder / "late.wav").write_bytes(b"RIFF")
    assert touches.wait_for(str(folder / "late.wav")), "a file in the re-created folder was not seen"


def test_an_inotify_queue_overflow_asks_for_a_full_rescan(watched):
    folder, touches, observer = watched
    limit = int(Path("/proc/sys/fs/inotify/max_queued_events").read_text())
    # Keep watchdog's reader from draining the kernel queue while a burst larger than it arrives.
    with observer._inotify_fd._lock:
        for i in range(limit // 2 + 100):  # each new file queues at least create + open + close
            Path(folder, f"f{i}").touch()
    assert touches.wait_for(None, 30), "the overflow did not lead to a rescan"
    assert os.path.isdir(folder)


def test_an_inbox_renamed_away_and_re_created_is_watched_again_by_its_path(watched):
    folder, touches, _observer = watched
    folder.rename(folder.with_name("inbox.old"))  # mv inbox inbox.old; mkdir inbox
    folder.mkdir()
    assert touches.wait_for(None), "no rescan asked for after the folder was renamed away and re-created"
    (folder / "late.wav").write_bytes(b"RIFF")
    assert touches.wait_for(str(folder / "late.wav")), "a file in the new folder was not seen"
