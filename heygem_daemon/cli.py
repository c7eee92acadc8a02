"""Command line: run the daemon, look at jobs, retry or cancel them, check a config file or the whole set-up."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from heygem_daemon import __version__
from heygem_daemon.ops import signals

if TYPE_CHECKING:  # imported in main(), after `run` has its signal handlers
    from heygem_daemon.config import Config
    from heygem_daemon.state import Store

# Something only the operator can fix (the config, a damaged database): the unit's
# RestartPreventExitStatus=2 keeps systemd from restarting into the same error every few seconds.
EXIT_CONFIG = 2


def default_config_path() -> Path | None:
    """$HEYGEM_CONFIG, else ./config.yaml when present, else the embedded defaults (None)."""
    env = os.environ.get("HEYGEM_CONFIG")
    if env:
        return Path(env)
    local = Path("config.yaml")
    return local if local.is_file() else None


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="heygem-daemon", description=__doc__)
    p.add_argument("--version", action="version", version=f"heygem-daemon {__version__}")
    p.add_argument("-c", "--config", type=Path,
                   help="config file (default: $HEYGEM_CONFIG, else ./config.yaml, else the embedded defaults)")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("run", help="run the daemon in the foreground (what systemd starts)")
    st = sub.add_parser("status", help="jobs with their state and progress")
    st.add_argument("--json", action="store_true", help="machine-readable output")
    st.add_argument("-n", "--limit", type=int, default=20, help="the newest N jobs (default 20)")
    jb = sub.add_parser("jobs", help="list jobs")
    jb.add_argument("--failed", action="store_true", help="only failed jobs, with reason and hint")
    jb.add_argument("-n", "--limit", type=int, default=50, help="the newest N jobs (default 50)")
    rt = sub.add_parser("retry", help="queue a failed job again")
    rt.add_argument("job", help="job name or id")
    cn = sub.add_parser("cancel", help="stop a queued or running job (its inputs go to failed/)")
    cn.add_argument("job", help="job name or id")
    wb = sub.add_parser("web", help="run the web console (config section web:)")
    wbs = wb.add_subparsers(dest="web_command")
    wbs.add_parser("hash-password", help="read a password (twice) and print its argon2 hash for web.users")
    wss = wbs.add_parser("sessions", help="the console's logged-in sessions").add_subparsers(
        dest="sessions_command", required=True)
    wss.add_parser("list", help="who is logged in, from where, until when")
    wss.add_parser("revoke", help="log a user out everywhere, now").add_argument("user")
    wts = wbs.add_parser("token", help="the HTTP API's bearer tokens").add_subparsers(
        dest="token_command", required=True)
    tc = wts.add_parser("create", help="make a token and print it once")
    tc.add_argument("name", help="the token's name (in the audit log and `token list`)")
    tc.add_argument("--user", required=True, help="the console user the token acts as")
    tc.add_argument("--scope", default="jobs:read", help="comma-separated: jobs:read, jobs:write (default jobs:read)")
    tc.add_argument("--callback", help="http(s) URL that gets the signed webhooks of the jobs this token makes")
    wts.add_parser("list", help="tokens with their user, scopes and last use (never the token)")
    wts.add_parser("revoke", help="end a token, now").add_argument("name")
    wts.add_parser("rotate-secret", help="a new webhook signing secret; the old one signs too for "
                   "web.webhook_secret_overlap_hours").add_argument("name")
    wk = sub.add_parser("worker", help="run a remote generation worker (Celery) on this GPU host")
    wk.add_argument("--queue", help="the queue it serves (default: the first in workers.remote.queues)")
    wk.add_argument("--hostname", help="its name in `status` (default: heygem@<host name>)")
    dr = sub.add_parser("doctor", help="check config, folders, codecs, disk, database, engines, broker, S3 and "
                        "chat URLs; exit 1 on any FAIL")
    dr.add_argument("--json", action="store_true", help="the checks as one JSON list (the web console's Health page)")
    dr.add_argument("--worker", action="store_true", help="check a GPU host's `heygem-daemon worker` set-up instead: "
                    "broker, engine sections, the share or the bucket with this host's key")
    cf = sub.add_parser("config", help="config helpers")
    cfs = cf.add_subparsers(dest="config_command", required=True)
    chk = cfs.add_parser("check", help="validate a config file and exit (0 ok, 2 invalid)")
    chk.add_argument("file", type=Path)
    hl = sub.add_parser("health", help="exit 0 while the daemon runs and its heartbeat is fresh, else 1 "
                        "(a container HEALTHCHECK)")
    hl.add_argument("--max-age", type=float, default=30.0,
                    help="seconds a heartbeat stays fresh (default 30)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "run":
        # First thing: a SIGTERM from here on is a clean early stop (exit 0), not death by signal (143).
        signals.install()
    from heygem_daemon.config import ConfigError, load_config
    from heygem_daemon.state import Store, db_path
    from heygem_daemon.state.db import DatabaseDamaged

    try:
        if args.command == "config":
            return _config_check(args.file)
        if args.command == "web" and args.web_command == "hash-password":
            return _hash_password()
        if args.command == "doctor":
            return _doctor(args.config or default_config_path(), args.json, args.worker)
        # A worker host need not have the daemon's folders: it sees the shared ones through the path map.
        cfg = load_config(args.config or default_config_path(), prepare=args.command not in ("worker", "health"))
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    if args.command == "run":
        return _run(cfg, args.config or default_config_path())
    if args.command == "web" and args.web_command not in ("sessions", "token"):
        return _web(cfg, args.config or default_config_path())
    if args.command == "worker":
        return _worker(cfg, args.queue, args.hostname)
    if args.command == "health":
        return _health(cfg, args.max_age)
    try:  # a damaged page may show up at any query, not only when the file is opened
        store = Store(db_path(cfg.folder("state")))
        if args.command == "status":
            return _status(cfg, store, args.json, args.limit)
        if args.command == "jobs":
            return _jobs(cfg, store, args.failed, args.limit)
        if args.command == "web" and args.web_command == "token":
            return _tokens(cfg, store, args)
        if args.command == "web":
            return _sessions(store, args.sessions_command, getattr(args, "user", None))
        return _request(cfg, store, args.command, args.job)
    except DatabaseDamaged as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_CONFIG


def _run(cfg: Config, path: Path | None) -> int:
    from heygem_daemon.config import ConfigError
    from heygem_daemon.service import AlreadyRunning, run_daemon
    from heygem_daemon.state.db import DatabaseDamaged

    try:
        return run_daemon(cfg, path, signals.REQUESTS)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except AlreadyRunning as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except DatabaseDamaged as exc:
        if not cfg.logging.console:  # else the log line already said it on the console
            print(f"error: {exc}", file=sys.stderr)
        return EXIT_CONFIG


def _web(cfg: Config, path: Path | None) -> int:
    web = cfg.web
    if not web.enabled:
        print("config error: the web console is off; set web.enabled: true (README \"Web console\")", file=sys.stderr)
        return EXIT_CONFIG
    if web.auth == "password" and not web.users:
        print("config error: web.users is empty; add `name: <hash>` lines made with "
              "`heygem-daemon web hash-password`, or use web.auth: proxy", file=sys.stderr)
        return EXIT_CONFIG
    try:
        import uvicorn

        from heygem_daemon.web.app import create_app
        from heygem_daemon.web.auth import session_key
        from heygem_daemon.web.guard import proxy_options
    except ImportError as exc:
        print(f"error: the web console needs the `web` extra ({exc.name} is missing): "
              "pip install -e '.[web]' in the daemon's virtual environment", file=sys.stderr)
        return EXIT_CONFIG
    from heygem_daemon.log import setup_logging

    # The journal (or the container's output); logs/heygem.log is the daemon's.
    setup_logging(None, cfg.logging.level, console_stream=cfg.logging.console_stream)
    app = create_app(cfg, path, session_key())
    uvicorn.run(app, host=web.host, port=web.port, server_header=False, log_level=cfg.logging.level,
                access_log=False, timeout_graceful_shutdown=5, **proxy_options(web))
    return 0


def _sessions(store: Store, command: str, user: str | None) -> int:
    """The store's sessions: the running console checks it on every request, so a revoke holds at once."""
    if command == "revoke":
        ended = store.web.end_sessions_of(str(user))
        print(f"{user}: {ended} session(s) ended")
        return 0
    for s in store.web.sessions():
        print(f"{s.user}\t{s.address or '-'}\tsince {_when(s.created_at)}\tuntil {_when(s.expires_at)}")
    return 0


def _tokens(cfg: Config, store: Store, args: argparse.Namespace) -> int:
    """The API's tokens in the store: the running console reads them on every request, so a revoke holds at once."""
    from heygem_daemon.notify.webhooks import where
    from heygem_daemon.web.tokens import TokenError, create_token, parse_scopes, rotate_secret, webhook_secret

    if args.token_command == "create":
        if cfg.web.auth == "password" and args.user not in cfg.web.users:
            print(f"error: {args.user!r} is not in web.users; a token acts as a configured user", file=sys.stderr)
            return 1
        try:
            token = create_token(store, args.name, args.user, parse_scopes(args.scope), args.callback)
        except TokenError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        print(token)
        print("(shown once: only its sha256 is kept; `web token revoke` ends it)", file=sys.stderr)
        if secret := webhook_secret(store, args.name):
            print(f"webhook secret: {secret}")
            print("(shown once: verify X-Heygem-Signature with it; `web token rotate-secret` replaces it)",
                  file=sys.stderr)
        return 0
    if args.token_command == "rotate-secret":
        try:
            secret = rotate_secret(store, args.name, cfg.web.webhook_secret_overlap_hours)
        except TokenError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        print(f"webhook secret: {secret}")
        print(f"(shown once; the previous secret signs too for {cfg.web.webhook_secret_overlap_hours:g} h)",
              file=sys.stderr)
        return 0
    if args.token_command == "revoke":
        ended = store.api.revoke(args.name)
        print(f"{args.name}: {'revoked' if ended else 'no such live token'}")
        return 0 if ended else 1
    for t in store.api.tokens():
        state = f"revoked {_when(t.revoked_at)}" if t.revoked_at else "live"
        used = _when(t.last_used_at) if t.last_used_at else "never"
        print(f"{t.name}\t{t.user}\t{','.join(t.scopes)}\tmade {_when(t.created_at)}\tlast used {used}\t{state}"
              f"\tcallback {where(t.callback_url) if t.callback_url else 'none'}")
    return 0


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(t))


def _hash_password() -> int:
    from getpass import getpass

    from heygem_daemon.web.auth import hash_password

    if sys.stdin.isatty():
        password = getpass("password: ")
        if getpass("again: ") != password:
            print("error: the two passwords differ", file=sys.stderr)
            return 1
    else:
        password = sys.stdin.readline().rstrip("\n")
    if not password:
        print("error: empty password", file=sys.stderr)
        return 1
    print(hash_password(password))
    return 0
def _worker(cfg: Config, queue: str | None, hostname: str | None) -> int:
    from heygem_daemon.config import ConfigError
    from heygem_daemon.generation.remote_worker import run_worker

    try:
        return run_worker(cfg, queue, hostname)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return EXIT_CONFIG


def _health(cfg: Config, max_age: float) -> int:
    from heygem_daemon.ops.health import problem

    said = problem(cfg.folder("state"), max_age)
    print(said or "healthy", file=sys.stderr if said else sys.stdout)
    return 1 if said else 0


def _config_check(path: Path) -> int:
    from heygem_daemon.config import load_config
    from heygem_daemon.engines.registry import check_engines

    cfg = load_config(path, prepare=False)
    check_engines(cfg)
    print(f"{path}: OK (engine {cfg.engine.name}, preset {cfg.engine.preset}, inbox {cfg.folder('inbox')})")
    return 0


def _delivery_text(summary: dict[str, Any] | None) -> str:
    """The batch's state and files, and why it is stuck: BLOCKED (the operator must act) or retrying."""
    if not summary:
        return ""
    files = ", ".join(f"{n} {state}" for state, n in sorted(summary["files"].items()))
    text = f"delivery {summary['state']}" + (f" ({files})" if files else "")
    if problem := summary.get("problem"):
        text += f" {'BLOCKED' if problem['blocked'] else 'retrying'}: {problem['reason']}"
    return text


def _delivery_hint(summary: dict[str, Any] | None) -> list[str]:
    problem = (summary or {}).get("problem")
    return [f"    hint:   {problem['hint']}"] if problem and problem["blocked"] and problem["hint"] else []


def _adhoc_line(view: dict[str, Any]) -> str:
    return f"{view['name']:<28} {'ad hoc':<10} {_delivery_text(view['delivery'])}  -> {view['outputs']}"


def _status(cfg: Config, store: Store, as_json: bool, limit: int) -> int:
    from heygem_daemon.generation.dependencies import OUT_STATES
    from heygem_daemon.generation.outages import describe
    from heygem_daemon.views import status_doc

    doc = status_doc(cfg, store, limit)
    if as_json:
        print(json.dumps(doc, indent=2, ensure_ascii=False))
        return 0
    print("tasks: " + (", ".join(f"{k} {v}" for k, v in sorted(doc["tasks"].items())) or "none yet"))
    for paused in (doc["daemon"].get("state_full"), doc["daemon"].get("disk_low")):  # why the daemon waits
        if paused:
            print(paused)
    for outage in doc["waiting_for"]:
        print(describe(outage))
    for line in _remote_lines(doc["daemon"].get("remote")):
        print(line)
    for dep in doc["dependencies"]:
        if dep["state"] in OUT_STATES:
            hint = f" ({dep['hint']})" if dep["hint"] else ""
            print(f"{dep['name']} is {dep['state'].upper()}: {dep['detail']}{hint}")
    for j in doc["jobs"]:
        waits = j.get("waiting_for", [])
        shown = "waiting" if waits and j["state"] in ("queued", "running") else j["state"]
        line = f"{j['name']:<28} {shown:<10} {j['done']}/{j['videos']} videos {j['progress'] * 100:5.1f}%"
        line += "".join(f"  (waiting for {w['dependency']} since {w['since_text']})" for w in waits)
        if j["priority"] != "normal":
            line += f"  [{j['priority']} priority]"
        if j.get("duplicate_of"):
            line += f"  duplicate of {j['duplicate_of']} -> {j['outputs']}"
        elif j["outputs"]:
            line += f"  -> {j['outputs']}"
        if j.get("error"):
            line += f"  ({j['error']['reason']})"
        if j["delivery"] and j["delivery"]["state"] != "reported":
            line += f"  {_delivery_text(j['delivery'])}"
        print(line)
        for hint in _delivery_hint(j["delivery"]):
            print(hint)
        for w in j.get("warnings", []):
            print(f"    warning: {w['reason']}")
        for line in _chat_lines(j.get("chat")):
            print(f"    {line}")
    for view in doc["adhoc"]:
        print(_adhoc_line(view))
        for hint in _delivery_hint(view["delivery"]):
            print(hint)
    for c in doc["chat_not_delivered"]:
        print(f"chat message not delivered: {c['title']} ({c['reason']})")
    return 0


def _chat_lines(chat: dict[str, Any] | None) -> list[str]:
    """A job's chat messages that did not go out (yet): refused or given up with the reason, or waiting."""
    if not chat:
        return []
    lines = [f"chat message not delivered: {c['reason']}" for c in chat["not_delivered"]]
    if chat["waiting"]:
        lines.append(f"chat: {chat['waiting']} message(s) waiting to be sent"
                     + (f" (last try: {chat['last_error']})" if chat["last_error"] else ""))
    return lines


def _remote_lines(remote: dict[str, Any] | None) -> list[str]:
    """The broker, finished videos waiting to be downloaded and each remote worker heard from, as the running
    daemon last wrote them."""
    from heygem_daemon.generation.outages import describe

    if not remote:
        return []
    lines = []
    if remote["down_since"]:
        lines.append(f"{remote['broker']} UNREACHABLE since {_clock(remote['down_since'])}: "
                     f"{remote.get('why') or 'no answer'}; remote tasks wait, nothing is lost")
    for outage in remote.get("downloads_waiting", []):
        lines.append(f"finished remote videos {describe(outage)}; they are safe in the bucket")
    for queue, since in sorted(remote.get("unserved", {}).items()):
        lines.append(f"NO healthy worker serves queue {queue} since {_clock(since)}: its tasks wait in Redis "
                     f"(start `heygem-daemon worker --queue {queue}` on a GPU host, or fix a quarantined one)")
    for w in remote["workers"]:
        beat = f"{time.time() - w['last_beat']:.0f} s ago" if w["last_beat"] else "never"
        doing = ", ".join(f"{d}: {t}" for d, t in sorted(w["tasks"].items())) or "idle"
        lines.append(f"remote worker {w['host']} [{', '.join(w['devices'])}] {doing}; last heartbeat {beat}")
        if w.get("problem"):
            lines.append(f"    QUARANTINED since {_clock(w['problem']['since'])}, takes no task: "
                         f"{w['problem']['reason']}\n    fix: {w['problem']['hint']}; then restart the worker")
        elif w.get("queue") and w["queue"] not in remote["in_flight"]:
            lines.append(f"    serves queue {w['queue']}, which this daemon does not send to "
                         f"(workers.remote.queues: {', '.join(remote['in_flight'])})")
    return lines


def _clock(when: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(when))


def _jobs(cfg: Config, store: Store, failed_only: bool, limit: int) -> int:
    from heygem_daemon.views import adhoc_view

    jobs = store.jobs.select(("failed",) if failed_only else None, limit=limit)
    adhoc = [] if failed_only else [adhoc_view(cfg, store, b) for b in store.deliveries.adhoc_batches(limit)]
    if not jobs and not adhoc:
        print("no failed jobs" if failed_only else "no jobs yet")
    for job in jobs:
        print(f"{job.name:<28} {job.state:<10} {job.id}")
        if job.error:
            print(f"    reason: {job.error.get('reason')}")
            print(f"    hint:   {job.error.get('hint')}")
    for view in adhoc:
        print(_adhoc_line(view))
        if view["error"]:
            print(f"    hint:   {view['error']['hint']}")
    return 0


def _request(cfg: Config, store: Store, command: str, ref: str) -> int:
    """cancel and retry are requests: the running daemon carries them out (no second process moves files)."""
    from heygem_daemon.generation.lifecycle import JobError, request_cancel, request_retry
    from heygem_daemon.ops.daemon_state import lock_holder

    try:
        said = request_cancel(store, ref) if command == "cancel" else request_retry(store, ref)
    except JobError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if lock_holder(cfg.folder("state")) is None:
        said += " The daemon is not running: the request waits until it starts."
    else:
        said += " The daemon does this within seconds."
    print(said)
    return 0


def _doctor(path: Path | None, as_json: bool, worker: bool = False) -> int:
    from dataclasses import asdict

    from heygem_daemon.ops.doctor import render, run_checks

    checks = run_checks(path, worker=worker)
    # JSON on one line, the last one: a check that prints a line of its own cannot spoil it.
    print(json.dumps([asdict(c) for c in checks], ensure_ascii=False) if as_json else render(checks))
    return 0 if all(c.ok for c in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
