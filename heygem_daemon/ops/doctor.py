"""`heygem-daemon doctor`: everything the daemon needs, checked once, as a table of OK/FAIL with the fix.

Checks come from providers: functions taking the config and returning `Check`s. Another part of the
daemon adds its own with one line in `PROVIDERS` (delivery: S3 credentials and bucket; notify: webhook
URLs), imported only when the doctor runs.
"""

from __future__ import annotations

import importlib
import shutil
import uuid
from pathlib import Path
from typing import Any, Callable, Iterable

from heygem_daemon.ops.checks import Check
from heygem_daemon.config import Config, ConfigError, Folders, Remote, load_config

GB = 1024 ** 3

PROVIDERS: list[str] = [
    "heygem_daemon.ops.doctor:folder_checks",
    "heygem_daemon.ops.doctor:codec_checks",
    "heygem_daemon.ops.doctor:disk_checks",
    "heygem_daemon.ops.doctor:engine_checks",
    "heygem_daemon.speech.registry:speech_checks",
    "heygem_daemon.ops.doctor:database_checks",
    "heygem_daemon.ops.doctor:remote_checks",
    "heygem_daemon.delivery.s3:s3_checks",
    "heygem_daemon.notify.outbox:notify_checks",
]


def unwritable(folder: Path) -> str | None:
    """None when a file can really be created in `folder` (os.access is blind to read-only mounts)."""
    probe = folder / f".heygem-doctor-{uuid.uuid4().hex[:8]}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        return exc.strerror or str(exc)
    return None


def folder_checks(cfg: Config) -> Iterable[Check]:
    for key in Folders.model_fields:
        path = cfg.folder(key)
        name = f"folder {key}"
        fix = "chown it to the daemon's user, or add it to ReadWritePaths= in the unit"
        if path.is_dir():
            problem = unwritable(path)
            yield Check(name, not problem, f"{path}" + (f" is not writable ({problem})" if problem else ""), fix)
        elif path.exists():
            yield Check(name, False, f"{path} is not a folder", f"point folders.{key} at a folder")
        elif path.parent.is_dir() and not unwritable(path.parent):
            yield Check(name, True, f"{path} (created at start)")
        else:
            yield Check(name, False, f"{path} is missing and cannot be created",
                        f"create it (install -d -o heygem -g heygem {path}), mount the share, or fix folders.{key}")


def _existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def codec_checks(cfg: Config) -> Iterable[Check]:
    import av

    hevc = sorted(name for name, p in cfg.presets.items() if p.codec == "hevc")
    wanted = [("libx264", "H.264 video", ""), ("aac", "AAC audio", "")]
    if hevc:
        fallback = f"; presets {', '.join(hevc)} fall back to H.264 (libx264) until then"
        wanted.insert(1, ("libx265", f"HEVC video for {', '.join(hevc)}", fallback))
    for codec, what, fallback in wanted:
        try:
            av.codec.Codec(codec, "w")
        except Exception as exc:  # PyAV raises different types across versions for an unknown codec
            yield Check(f"encoder {codec}", False, f"PyAV {av.__version__} has no {what} encoder ({exc}){fallback}",
                        "install PyAV from PyPI (its wheels bundle FFmpeg with libx264, libx265 and aac)")
        else:
            yield Check(f"encoder {codec}", True, f"{what} (PyAV {av.__version__})")


def disk_checks(cfg: Config) -> Iterable[Check]:
    need = cfg.disk_guard.min_free_gb
    for key in ("outputs", "work"):
        free = shutil.disk_usage(_existing(cfg.folder(key))).free / GB
        ok = free >= need
        yield Check(f"free disk {key}", ok, f"{free:.1f} GB free (disk_guard.min_free_gb = {need:g})",
                    "" if ok else "free some space (cleanup settings) or lower disk_guard.min_free_gb")


def engine_checks(cfg: Config) -> Iterable[Check]:
    from heygem_daemon.engines.registry import engine_class, engine_names, settings_for

    for name in engine_names(cfg):
        try:
            cls = engine_class(name)
            settings = settings_for(cfg, name)
        except ConfigError as exc:
            yield Check(f"engine {name}", False, str(exc), "fix the engine's section in the config")
            continue
        doctor = getattr(cls, "doctor", None)
        if doctor is None:
            yield Check(f"engine {name}", True, "has no self-check; skipped")
            continue
        yield from doctor(settings, list(cfg.workers.devices))


def database_checks(cfg: Config) -> Iterable[Check]:
    from heygem_daemon.state import db_path
    from heygem_daemon.state.db import backup_path, quick_check

    path = db_path(cfg.folder("state"))
    backup = backup_path(path)
    if not path.exists():
        yield Check("database", True, f"{path} (created at start)")
        return
    problems = quick_check(path)
    restore = (f"stop the daemon, move {path.name} (with -wal, -shm) aside and copy {backup} to {path}"
               if backup.is_file() else f"move {path.name} (with -wal, -shm) aside; the daemon starts a new one")
    yield Check("database", not problems, f"{path}: quick_check " + ("ok" if not problems else "; ".join(problems[:3])),
                restore)


WORKER_PROVIDERS: list[str] = [
    "heygem_daemon.ops.doctor:worker_checks",
    "heygem_daemon.ops.doctor:engine_checks",
]
"""`doctor --worker` on a GPU host: it has none of the daemon's folders, and its key may only write under the
key prefix (no HeadBucket)."""


def _broker(remote: Remote) -> tuple[Check, Any]:
    """Redis answers (with the password of broker_url): the check and, when it does, the Celery app."""
    from heygem_daemon.generation.celery_app import broker_name, make_app  # the `remote` extra
    from heygem_daemon.generation.remote_broker import broker_error

    app = make_app(remote, sender=True)
    try:
        with app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1)
    except Exception as exc:
        return Check("task broker", False, f"{broker_name(remote)}: {broker_error(exc)}",
                     "start Redis (systemctl start redis-server) or fix workers.remote.broker_url (its password: "
                     "Redis's requirepass)"), None
    return Check("task broker", True, broker_name(remote)), app


def remote_checks(cfg: Config) -> Iterable[Check]:
    """With workers.remote: Redis answers, a healthy `heygem-daemon worker` serves each queue, and what is
    wrong with the others (quarantined by their set-up, or serving a queue this daemon does not send to)."""
    remote = cfg.workers.remote
    if remote is None:
        return
    from heygem_daemon.generation.remote_setup import live_workers

    broker, app = _broker(remote)
    yield broker
    if app is None:
        return
    workers = live_workers(app.backend.client)
    for queue in remote.queues:
        healthy = [w.host for w in workers if w.queue == queue and w.problem is None]
        yield Check(f"remote workers {queue}", bool(healthy), ", ".join(healthy) or
                    f"no healthy `heygem-daemon worker` serves queue {queue}: its tasks wait in Redis",
                    f"start heygem-worker (--queue {queue}) on a GPU host (README \"Many GPU hosts\")")
    for w in workers:
        if w.problem is not None:
            yield Check(f"remote worker {w.host}", False, f"quarantined, takes no task: {w.problem['reason']}",
                        f"{w.problem['hint']}; then restart it (on that host: heygem-daemon doctor --worker)")
        elif w.queue not in remote.queues:
            yield Check(f"remote worker {w.host}", False, f"serves queue {w.queue}, which this daemon does not send "
                        f"to (workers.remote.queues: {', '.join(remote.queues)})",
                        "give the worker one of the daemon's queues (--queue), or add its queue to the daemon's")


def worker_checks(cfg: Config) -> Iterable[Check]:
    """On a worker host: Redis answers with this host's password, and the set-up a worker checks before it
    takes a task (engine section, the share mounted, the bucket written with this host's key)."""
    remote = cfg.workers.remote
    if remote is None:
        yield Check("workers.remote", False, "not set: this is no worker config",
                    "give it broker_url and queues (README \"Many GPU hosts\")")
        return
    import socket

    from heygem_daemon.generation.remote_setup import setup_problems

    yield _broker(remote)[0]
    problems = setup_problems(cfg, f"doctor@{socket.gethostname()}")
    for p in problems:
        yield Check("worker set-up", False, p.reason, p.hint)
    if not problems:
        what = "bucket written and read with this host's key" if remote.transfer == "s3" else "share mounted"
        yield Check("worker set-up", True, f"engine sections valid; {what}")


def _provider(target: str) -> Callable[[Config], Iterable[Check]]:
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)  # type: ignore[no-any-return]


def run_checks(path: Path | None, environ: dict[str, str] | None = None, worker: bool = False) -> list[Check]:
    try:
        cfg = load_config(path, environ, prepare=False)
    except ConfigError as exc:
        return [Check("config", False, str(exc), f"fix {path or 'the config'}; `heygem-daemon config check` helps")]
    checks = [Check("config", True, str(path or "embedded defaults"))]
    for target in WORKER_PROVIDERS if worker else PROVIDERS:
        try:
            checks.extend(_provider(target)(cfg))
        except Exception as exc:  # a broken check must not hide the others
            checks.append(Check(target.rpartition(":")[2], False, f"check crashed: {exc!r}", "report this bug"))
    return checks


def render(checks: list[Check]) -> str:
    width = max(len(c.name) for c in checks)
    lines = [f"{'CHECK':<{width}}  RESULT  DETAIL", f"{'-' * width}  ------  ------"]
    for c in checks:
        lines.append(f"{c.name:<{width}}  {'OK' if c.ok else 'FAIL':<6}  {c.detail}")
        if not c.ok and c.fix:
            lines.append(f"{'':<{width}}          fix: {c.fix}")
    failed = sum(not c.ok for c in checks)
    lines.append(f"{len(checks) - failed} OK, {failed} FAIL")
    return "\n".join(lines)
