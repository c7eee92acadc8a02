"""SIGHUP: which changed config keys the running daemon can take at once, and which wait for a restart."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from heygem_daemon.config import Config

# Keys (or whole sections) fixed for the life of the process: folders, worker processes and their
# engines, the watcher's observer, the metrics server, the S3 and chat clients. Everything else is read
# where it is used.
RESTART_KEYS = (
    "base_dir", "folders", "engines", "engine.name", "workers.devices", "workers.per_device", "workers.nice",
    "workers.remote", "speech.ahead_slots",
    "watcher.mode", "watcher.poll_interval", "watcher.probe_workers", "logging.console", "metrics",
    "s3", "delivery", "notify",
)


@dataclass(frozen=True)
class ReloadPlan:
    applied: Config
    """The new config with restart-only keys kept at their running values."""
    live: list[str]
    restart: list[str]


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for k, v in data.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: data}


def _restart_prefix(key: str) -> str | None:
    return next((r for r in RESTART_KEYS if key == r or key.startswith(r + ".")), None)


def _get(tree: dict[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        tree = tree[part]
    return tree


def _set(tree: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    for p in parents:
        tree = tree.setdefault(p, {})
    tree[last] = value


def plan_reload(old: Config, new: Config) -> ReloadPlan:
    old_tree, new_tree = old.model_dump(mode="json"), new.model_dump(mode="json")
    before, after = _flatten(old_tree), _flatten(new_tree)
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k, ...) != after.get(k, ...))
    live = [k for k in changed if _restart_prefix(k) is None]
    restart = [k for k in changed if _restart_prefix(k) is not None]
    # Whole restart-only settings go back to their running value, so nothing half-applies.
    for prefix in {_restart_prefix(k) for k in restart}:
        _set(new_tree, prefix, _get(old_tree, prefix))  # type: ignore[arg-type]
    return ReloadPlan(Config.model_validate(new_tree), live, restart)
