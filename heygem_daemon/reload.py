"""SIGHUP: which changed config keys the running daemon can take at once, and which wait for a restart."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from heygem_daemon.config import Config

# Keys (or whole sections) fixed for the life of the process: folders, worker processes and their
# engines, the watcher's observer, the metrics server. Everything else is read where it is used.
RESTART_KEYS = (
    "base_dir", "folders", "engines", "engine.name", "workers.devices", "workers.per_device", "workers.nice",
    "watcher.mode", "watcher.poll_interval", "watcher.probe_workers", "logging.console", "metrics",
)


@dataclass(frozen=True)
class ReloadPlan:
    applied: Config
    """The new config with restart-only keys kept at their running values."""
    live: list[str]
    restart: list[str]


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict) and data:
        out: dict[str, Any] = {}
        for k, v in data.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: data}


def _needs_restart(key: str) -> bool:
    return any(key == r or key.startswith(r + ".") for r in RESTART_KEYS)


def _set(tree: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    for p in parents:
        tree = tree.setdefault(p, {})
    tree[last] = value


def _drop(tree: dict[str, Any], dotted: str) -> None:
    *parents, last = dotted.split(".")
    for p in parents:
        tree = tree.get(p, {})
    tree.pop(last, None)


def plan_reload(old: Config, new: Config) -> ReloadPlan:
    before, after = _flatten(old.model_dump(mode="json")), _flatten(new.model_dump(mode="json"))
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k, ...) != after.get(k, ...))
    live = [k for k in changed if not _needs_restart(k)]
    restart = [k for k in changed if _needs_restart(k)]
    merged = new.model_dump(mode="json")
    for key in restart:
        if key in before:
            _set(merged, key, before[key])
        else:
            _drop(merged, key)
    return ReloadPlan(Config.model_validate(merged), live, restart)
