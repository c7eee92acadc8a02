"""`heygem-daemon doctor` on real folders, the real PyAV and the real preview engine."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from heygem_daemon.ops.doctor import PROVIDERS, run_checks

REPO = Path(__file__).resolve().parent.parent


def doctor(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "heygem_daemon.cli", "-c", str(config), "doctor"],
                          capture_output=True, text=True, cwd=REPO)


def test_a_healthy_setup_passes_every_check_and_exits_0(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text("base_dir: .\ndisk_guard: {min_free_gb: 0}\n")
    result = doctor(config)
    assert result.returncode == 0, result.stdout + result.stderr
    rows = {line.split("  ")[0].strip(): line for line in result.stdout.splitlines()[2:-1]}
    for name in ("config", "folder inbox", "folder outputs", "encoder libx264", "encoder libx265", "encoder aac",
                 "free disk outputs", "free disk work", "engine preview: face detector"):
        assert " OK " in rows[name], rows.get(name)
    assert "0 FAIL" in result.stdout


def test_a_folder_that_is_a_file_and_a_disk_short_of_space_fail_with_a_fix(tmp_path):
    (tmp_path / "outputs").write_text("not a folder")
    config = tmp_path / "config.yaml"
    config.write_text("base_dir: .\ndisk_guard: {min_free_gb: 1000000}\n")
    result = doctor(config)
    assert result.returncode == 1
    lines = result.stdout.splitlines()
    failed = [line.split("  ")[0] for line in lines if " FAIL " in line]
    assert failed == ["folder outputs", "free disk outputs", "free disk work"]
    assert "point folders.outputs at a folder" in result.stdout
    assert "lower disk_guard.min_free_gb" in result.stdout


def test_an_invalid_config_is_one_failed_check_naming_the_key(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text("watcher: {settle_secnds: 3}\n")
    result = doctor(config)
    assert result.returncode == 1
    assert "config" in result.stdout and "FAIL" in result.stdout and "settle_secnds" in result.stdout


def test_providers_are_plain_import_paths_so_other_parts_add_one_line(tmp_path):
    checks = run_checks(None, environ={"HEYGEM_BASE_DIR": str(tmp_path)})
    assert all(":" in p for p in PROVIDERS)
    assert [c.name for c in checks][:2] == ["config", "folder inbox"]
