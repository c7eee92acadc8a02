"""Engine names -> classes, imported only when used so that torch never loads in the daemon process.

Engines are `importlib.metadata` entry points in the group `heygem_daemon.engines` (name = engine name,
value = `module:Class`): the four built-in ones are declared in pyproject.toml, and a third-party engine
is a package that declares its own, installed into the daemon's environment (README: "Adding an engine").
"""

from __future__ import annotations

import importlib
from functools import cache
from importlib.metadata import entry_points
from typing import Any

from pydantic import ValidationError

from heygem_daemon.config import Config, ConfigError
from heygem_daemon.engines.base import Engine
from heygem_daemon.media.face_spec import FaceRule

GROUP = "heygem_daemon.engines"


@cache
def installed(group: str) -> dict[str, str]:
    """An entry-point group: name -> `module:Class` (read once per process; packages are installed before start).
    Lip-sync engines are GROUP; third-party speech engines (heygem_daemon/speech/registry.py) another."""
    return {ep.name: ep.value for ep in entry_points(group=group)}


def available() -> dict[str, str]:
    return installed(GROUP)


def load_class(found: dict[str, str], name: str, key: str) -> Any:
    """The class `found` (name -> `module:Class`) names; `key` is the config key that chose it, for the error."""
    try:
        target = found[name]
    except KeyError:
        raise ConfigError(f"{key}: unknown engine {name!r}; available: {', '.join(sorted(found))}") from None
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


def validate_settings(cls: Any, raw: dict[str, Any], key: str) -> Any:
    """`cls.Settings` from a config section, a mistake as one line naming the key (`key` = the section)."""
    try:
        return cls.Settings.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"].removeprefix("Value error, ")
        raise ConfigError(f"{key}.{where}: {msg}") from None


def engine_names(cfg: Config) -> list[str]:
    """The engines this config uses: the default one and every one with a section."""
    return sorted({cfg.engine.name, *cfg.engines})


def engine_class(name: str) -> Any:
    return load_class(available(), name, "engine.name")


def settings_for(cfg: Config, name: str) -> Any:
    return validate_settings(engine_class(name), cfg.engines.get(name, {}), f"engines.{name}")


def check_engines(cfg: Config) -> None:
    """Fail at start-up, not at the first job, when an engine section is wrong."""
    unknown = set(cfg.engines) - set(available())
    if unknown:
        raise ConfigError(f"engines.{sorted(unknown)[0]}: unknown engine; available: {', '.join(sorted(available()))}")
    settings_for(cfg, cfg.engine.name)
    for name in cfg.engines:
        settings_for(cfg, name)
    from heygem_daemon.speech.registry import check_speech

    check_speech(cfg)


def build_engine(name: str, raw_settings: dict[str, Any]) -> Engine:
    cls = engine_class(name)
    return cls(cls.Settings.model_validate(raw_settings))  # type: ignore[no-any-return]


def needs_face(name: str, raw_settings: dict[str, Any] | None = None) -> FaceRule:
    """What intake must find in a portrait: a face at all (an engine may leave that to its settings,
    `needs_face:`), and exactly one when the engine declares `single_face`."""
    cls = engine_class(name)
    wanted = bool(cls.needs_face)
    if "needs_face" in cls.Settings.model_fields:
        try:
            wanted = bool(cls.Settings.model_validate(raw_settings or {}).needs_face)
        except ValidationError:
            pass  # an unconfigured engine: its job fails at generation with the config error
    if not wanted:
        return FaceRule.NONE
    return FaceRule.ONE if getattr(cls, "single_face", False) else FaceRule.ANY
