"""The remote worker's unit is valid for systemd and hardened like the daemon's (exposure 2.0 or lower)."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
from test_systemd_unit import analyze

UNIT = Path(__file__).resolve().parent.parent / "systemd" / "heygem-worker.service"
pytestmark = pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                                reason="systemd-analyze missing (.ci/run installs it)")


def unit_copy(tmp_path: Path) -> Path:
    """ExecStart must name an executable that exists here; everything else is the shipped file."""
    copy = tmp_path / UNIT.name
    copy.write_text(re.sub(r"^ExecStart=\S+", f"ExecStart={shutil.which('true')}", UNIT.read_text(), flags=re.M))
    return copy


def test_the_worker_unit_passes_systemd_analyze_verify(tmp_path):
    result = analyze("verify", "--man=no", str(unit_copy(tmp_path)))
    ours = [line for line in result.stderr.splitlines() if UNIT.name in line]
    assert result.returncode == 0 and ours == [], result.stderr


def test_the_worker_unit_exposure_is_at_most_2_0(tmp_path):
    result = analyze("security", "--offline=yes", "--no-pager", str(unit_copy(tmp_path)))
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    assert match, result.stdout + result.stderr
    print(f"systemd-analyze security exposure (worker): {match.group(1)}")
    assert float(match.group(1)) <= 2.0


def test_the_worker_unit_runs_the_worker_command_and_stops_it_warm():
    text = UNIT.read_text()
    assert re.search(r"^ExecStart=\S+/heygem-daemon worker$", text, re.M)
    for line in ("KillMode=mixed", "Restart=on-failure", "DevicePolicy=closed", "RestartPreventExitStatus=2"):
        assert re.search(rf"^{re.escape(line)}$", text, re.M), line
