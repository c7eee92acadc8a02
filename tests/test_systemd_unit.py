"""The shipped units (the daemon's, the web console's and the remote worker's) are valid for systemd and
hardened (exposure 2.0 or lower), the daemon's with and without the GPU drop-in, checked offline.
tests/system/systemd_check.sh boots the daemon's under a real systemd."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

UNIT = Path(__file__).resolve().parent.parent / "systemd" / "heygem-daemon.service"
WEB_UNIT = UNIT.parent / "heygem-web.service"
WORKER_UNIT = UNIT.parent / "heygem-worker.service"
GPU_DROP_IN = UNIT.parent / "heygem-daemon.service.d" / "gpu.conf"
pytestmark = pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                                reason="systemd-analyze missing (.ci/run installs it)")


def unit_copy(tmp_path: Path, gpu: bool = False, unit: Path = UNIT) -> Path:
    """ExecStart must name an executable that exists here; everything else is the shipped file (and the
    GPU drop-in beside it, where systemd finds drop-ins of a unit loaded from a path)."""
    text = unit.read_text()
    text = re.sub(r"^ExecStart=\S+", f"ExecStart={shutil.which('true')}", text, flags=re.M)
    copy = tmp_path / unit.name
    copy.write_text(text)
    if gpu:
        (tmp_path / GPU_DROP_IN.parent.name).mkdir()
        shutil.copy(GPU_DROP_IN, tmp_path / GPU_DROP_IN.parent.name / GPU_DROP_IN.name)
    return copy


def analyze(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "SYSTEMD_LOG_LEVEL": "warning", "SYSTEMD_PAGER": "", "SYSTEMD_COLORS": "0"}
    return subprocess.run(["systemd-analyze", *args], capture_output=True, text=True, env=env, timeout=120)


@pytest.mark.parametrize("gpu", [False, True], ids=["cpu", "gpu-drop-in"])
def test_systemd_analyze_verify_passes_without_warnings_about_the_unit(tmp_path, gpu):
    result = analyze("verify", "--man=no", str(unit_copy(tmp_path, gpu)))
    ours = [line for line in result.stderr.splitlines() if UNIT.name in line or GPU_DROP_IN.name in line]
    assert result.returncode == 0 and ours == [], result.stderr


@pytest.mark.parametrize("gpu", [False, True], ids=["cpu", "gpu-drop-in"])
def test_security_exposure_is_at_most_2_0(tmp_path, gpu):
    result = analyze("security", "--offline=yes", "--no-pager", str(unit_copy(tmp_path, gpu)))
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    assert match, result.stdout + result.stderr
    print(f"systemd-analyze security exposure ({'with' if gpu else 'without'} gpu.conf): {match.group(1)}")
    assert float(match.group(1)) <= 2.0


def test_the_unit_speaks_notify_with_a_watchdog_and_reloads_with_sighup():
    text = UNIT.read_text()
    for line in ("Type=notify", "NotifyAccess=main", "ExecReload=/bin/kill -HUP $MAINPID", "KillMode=mixed",
                 "Restart=on-failure", "DevicePolicy=closed"):
        assert re.search(rf"^{re.escape(line)}$", text, re.M), line
    assert int(re.search(r"^WatchdogSec=(\d+)$", text, re.M).group(1)) > 0


def test_only_the_gpu_drop_in_names_device_nodes():
    assert "DeviceAllow=" not in UNIT.read_text()
    drop_in = GPU_DROP_IN.read_text()
    assert drop_in.splitlines()[drop_in.splitlines().index("[Service]") + 1:] == [
        line for line in drop_in.splitlines() if line.startswith("DeviceAllow=")]
    assert "DeviceAllow=/dev/nvidiactl rw" in drop_in and "DeviceAllow=char-nvidia-uvm rw" in drop_in


@pytest.mark.parametrize("unit", [WEB_UNIT, WORKER_UNIT], ids=["web", "worker"])
def test_the_other_units_pass_verify_and_are_hardened_to_2_0_or_lower(tmp_path, unit):
    copy = unit_copy(tmp_path, unit=unit)
    verify = analyze("verify", "--man=no", str(copy))
    assert verify.returncode == 0 and [line for line in verify.stderr.splitlines() if unit.name in line] == [], \
        verify.stderr
    security = analyze("security", "--offline=yes", "--no-pager", str(copy))
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", security.stdout)
    assert match and float(match.group(1)) <= 2.0, security.stdout + security.stderr
    print(f"systemd-analyze security exposure ({unit.name}): {match.group(1)}")


def test_the_worker_unit_runs_the_worker_command_and_stops_it_warm():
    text = WORKER_UNIT.read_text()
    assert re.search(r"^ExecStart=\S+/heygem-daemon worker$", text, re.M)
    for line in ("KillMode=mixed", "Restart=on-failure", "DevicePolicy=closed", "RestartPreventExitStatus=2"):
        assert re.search(rf"^{re.escape(line)}$", text, re.M), line
