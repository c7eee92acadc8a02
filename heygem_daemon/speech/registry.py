"""Speech engine names -> classes: the built-in ones, and entry points in the group `heygem_daemon.speech` that
another package declares (as a third-party lip-sync engine does, README "Adding an engine"). The built-in
ones are named here rather than in pyproject.toml so they are there whatever metadata an install left."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from heygem_daemon.config import Config, ConfigError
from heygem_daemon.engines.registry import installed, load_class, validate_settings

GROUP = "heygem_daemon.speech"
BUILT_IN = {"espeak": "heygem_daemon.speech.espeak:EspeakEngine",
            "heygem-tts": "heygem_daemon.speech.heygem_tts:HeygemTtsEngine",
            "command": "heygem_daemon.speech.command:CommandSpeechEngine"}


def available() -> dict[str, str]:
    return {**BUILT_IN, **installed(GROUP)}


def speech_class(name: str) -> Any:
    return load_class(available(), name, "speech.engine")


def speech_settings(cfg: Config, name: str | None = None) -> Any:
    name = name or cfg.speech.engine
    return validate_settings(speech_class(name), cfg.speech.engines.get(name, {}), f"speech.engines.{name}")


def check_speech(cfg: Config) -> None:
    """Fail at start-up, not at the first script, when the speech section is wrong."""
    speech_settings(cfg)
    for name in cfg.speech.engines:
        speech_settings(cfg, name)


def build_speech(name: str, raw_settings: dict[str, Any]) -> Any:
    cls = speech_class(name)
    return cls(validate_settings(cls, raw_settings, f"speech.engines.{name}"))


def speech_checks(cfg: Config) -> Iterable[Any]:
    """`doctor`: the speech engine scripts are read out with (and any other configured)."""
    from heygem_daemon.ops.checks import Check

    for name in sorted({cfg.speech.engine, *cfg.speech.engines}):
        try:
            cls, settings = speech_class(name), speech_settings(cfg, name)
        except ConfigError as exc:
            yield Check(f"speech {name}", False, str(exc), "fix the speech section in the config")
            continue
        doctor = getattr(cls, "doctor", None)
        yield from doctor(settings) if doctor else [Check(f"speech {name}", True, "has no self-check; skipped")]
