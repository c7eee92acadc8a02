"""Engines are entry points (group heygem_daemon.engines): a third-party engine installs as a package."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

ENGINE_MODULE = '''
from pathlib import Path
from typing import ClassVar

from pydantic import Field

from heygem_daemon.engines.base import EngineSettings
from heygem_daemon.engines.preview import PreviewEngine


class EchoEngine(PreviewEngine):
    """A third party's engine: here the preview renderer under another name and its own settings."""

    name: ClassVar[str] = "echo"

    class Settings(EngineSettings):
        loudness: float = Field(1.0, gt=0.0)
        mouth_gain: float = 1.0
        detect_every: int = 5
'''


def install_echo_engine(site: Path) -> None:
    """What `pip install heygem-echo-engine` leaves in site-packages: the module and its dist-info."""
    (site / "heygem_echo_engine.py").write_text(ENGINE_MODULE)
    info = site / "heygem_echo_engine-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: heygem-echo-engine\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[heygem_daemon.engines]\necho = heygem_echo_engine:EchoEngine\n")


def config_check(config: Path, site: Path | None) -> subprocess.CompletedProcess[str]:
    path = f"{site}:{REPO}" if site else str(REPO)
    return subprocess.run([sys.executable, "-m", "heygem_daemon.cli", "config", "check", str(config)],
                          capture_output=True, text=True, env={"PYTHONPATH": path, "PATH": "/usr/bin:/bin"})


def test_the_four_builtin_engines_are_declared_entry_points():
    from heygem_daemon.engines.registry import available

    assert {"preview", "wav2lip", "heygem", "command"} <= set(available())


def test_an_installed_engine_package_is_found_by_name_with_its_own_settings(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text("base_dir: .\nengine: {name: echo}\nengines: {echo: {loudness: 2}}\n")
    site = tmp_path / "site"
    site.mkdir()
    assert "engines.echo: unknown engine" in config_check(config, None).stderr
    install_echo_engine(site)
    result = config_check(config, site)
    assert result.returncode == 0 and "engine echo" in result.stdout, result.stderr
    config.write_text("base_dir: .\nengine: {name: echo}\nengines: {echo: {loudnes: 2}}\n")
    assert "engines.echo.loudnes: unknown key" in config_check(config, site).stderr


# What the daemon process itself does with engines and sweeps: it reads every engine's settings and face rule
# (start-up check, intake) and runs every cleanup sweep (the heygem codes sweep imports that engine's package).
DAEMON_SIDE = """
import importlib, sys
from heygem_daemon import service
from heygem_daemon.engines.registry import available, needs_face
from heygem_daemon.ops.cleanup import SWEEPS
for name in available():
    needs_face(name)
for job in SWEEPS:
    importlib.import_module(job.target.partition(":")[0])
print(" ".join(sorted(m for m in ("cv2", "numpy", "PIL", "torch", "celery") if m in sys.modules)))
"""


def test_the_daemon_process_loads_no_opencv_numpy_torch_or_celery_for_its_engines_and_sweeps():
    # They load where the work is done: engine workers, intake's probe processes, remote workers. OpenCV and
    # numpy alone would be about 30 MB of the daemon's resident memory (bench/idle.py).
    out = subprocess.run([sys.executable, "-c", DAEMON_SIDE], capture_output=True, text=True, check=True).stdout
    assert out.split() == []
