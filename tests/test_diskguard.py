"""The disk guard decides from real statvfs numbers; here the numbers are fed in."""

from __future__ import annotations

from heygem_daemon.config import load_config
from heygem_daemon.ops.diskguard import GB, DiskGuard, Usage


def guard(tmp_path, free_gb: dict[str, float]) -> DiskGuard:
    cfg = load_config(None, environ={"HEYGEM_BASE_DIR": str(tmp_path), "HEYGEM_DISK_GUARD__MIN_FREE_GB": "10"},
                      prepare=False)
    return DiskGuard(cfg, lambda path: Usage(100 * GB, 0, int(free_gb[path.rsplit("/", 1)[1]] * GB)))


def test_low_space_on_outputs_pauses_claiming_and_says_where(tmp_path):
    free = {"outputs": 4.0, "work": 50.0}
    g = guard(tmp_path, free)
    reason = g.check()
    assert reason is not None and "outputs/ has 4.0 GB free" in reason and "work/" not in reason
    assert g.low == reason


def test_claiming_resumes_only_with_room_above_the_threshold(tmp_path):
    free = {"outputs": 4.0, "work": 50.0}
    g = guard(tmp_path, free)
    g.check()
    free["outputs"] = 10.5  # above 10 GB, but inside the 10 % margin: still paused
    assert g.check() is not None
    free["outputs"] = 11.5
    assert g.check() is None and g.low is None
