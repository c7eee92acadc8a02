"""The shipped unit is valid for systemd and hardened (exposure 2.5 or lower), checked offline."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

UNIT = Path(__file__).resolve().parent.parent / "systemd" / "heygem-daemon.service"
pytestmark = pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                                reason="systemd-analyze missing (.ci/run installs it)")


def unit_copy(tmp_path: Path) -> Path:
    """ExecStart must name an executable that exists here; everything else is the shipped file."""
    text = UNIT.read_text()
    text = re.sub(r"^ExecStart=\S+", f"ExecStart={shutil.which('true')}", text, flags=re.M)
    copy = tmp_path / UNIT.name
    copy.write_text(text)
    return copy


def analyze(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "SYSTEMD_LOG_LEVEL": "warning", "SYSTEMD_PAGER": "", "SYSTEMD_COLORS": "0"}
    return subprocess.run(["systemd-analyze", *args], capture_output=True, text=True, env=env, timeout=120)


def test_systemd_analyze_verify_passes_without_warnings_about_the_unit(tmp_path):
    result = analyze("verify", "--man=no", str(unit_copy(tmp_path)))
    ours = [line for line in result.stderr.splitlines() if UNIT.name in line]
    assert result.returncode == 0 and ours == [], result.stderr


def test_security_exposure_is_at_most_2_5(tmp_path):
    result = analyze("security", "--offline=yes", "--no-pager", str(unit_copy(tmp_path)))
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    assert match, result.stdout + result.stderr
    print(f"systemd-analyze security exposure: {match.group(1)}")
    assert float(match.group(1)) <= 2.5


def test_the_unit_speaks_notify_with_a_watchdog_and_reloads_with_sighup():
    text = UNIT.read_text()
    for line in ("Type=notify", "NotifyAccess=main", "ExecReload=/bin/kill -HUP $MAINPID", "KillMode=mixed",
                 "Restart=on-failure", "DevicePolicy=closed", "DeviceAllow=/dev/nvidiactl rw"):
        assert re.search(rf"^{re.escape(line)}$", text, re.M), line
    assert int(re.search(r"^WatchdogSec=(\d+)$", text, re.M).group(1)) > 0
