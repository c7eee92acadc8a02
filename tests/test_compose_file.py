"""deploy/compose.yaml (README "Run in containers") is a valid Compose file and stops the daemon gently."""

from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import yaml

from heygem_daemon.config import Shutdown, load_config

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "deploy" / "compose.yaml"
SCHEMA = Path(__file__).resolve().parent / "compose_spec" / "compose-spec.json"


def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))


def test_compose_file_follows_the_compose_specification_schema() -> None:
    schema = json.loads(SCHEMA.read_text(encoding="utf-8"))
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
              for e in jsonschema.Draft7Validator(schema).iter_errors(compose())]
    assert errors == []


def test_compose_gives_the_daemon_longer_than_its_drain_to_stop() -> None:
    grace = compose()["services"]["heygem-daemon"]["stop_grace_period"]
    assert grace.endswith("s") and float(grace[:-1]) > Shutdown().drain_seconds


def test_compose_reads_scripts_out_with_the_official_tts_container(tmp_path) -> None:
    # Compose's ${NAME:-default} as it resolves with nothing set in .env.
    env = {key: re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", str(value))
           for key, value in compose()["services"]["heygem-daemon"]["environment"].items()}
    cfg = load_config(None, {**env, "HEYGEM_BASE_DIR": str(tmp_path)}, prepare=False)
    assert cfg.speech.engine == "heygem-tts"
    assert cfg.speech.engines["heygem-tts"]["services"] == ["http://duix-avatar-tts:8080"]
