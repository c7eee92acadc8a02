"""The cleanup sweep for the services' temp folders: `<code>*` of every code the store remembers whose
service has forgotten it (told the job's end, or answers 10004 after a restart). This is what cleans up
after a cancelled job, a render over its limit and a job a task left behind when it ended; an attempt that
sees its job's end cleans up itself. The newest code of a task not ended is never asked about: its next
attempt may adopt the job (a killed daemon's, an outage mid-render's), and a job's end is told only once."""

from __future__ import annotations

from pathlib import Path

from heygem_daemon.ops.cleanup import Sweep
from heygem_daemon.config import ConfigError
from heygem_daemon.engines.base import EngineError
from heygem_daemon.engines.heygem.client import RUNNING, HeygemClient
from heygem_daemon.engines.heygem.exchange import remove_code

_DEFAULT_TIMEOUT = 10.0


def _timeout(sweep: Sweep) -> float:
    from heygem_daemon.engines.registry import settings_for

    try:
        return float(settings_for(sweep.cfg, "heygem").request_timeout)
    except ConfigError:  # heygem no longer configured: its leftovers still go
        return _DEFAULT_TIMEOUT


def forgotten(client: HeygemClient, code: str) -> bool:
    """Whether the service no longer knows `code`. Asking consumes a terminal answer, so this is only
    for codes nobody follows any more. A service that does not answer may still know it."""
    try:
        state = client.query(code)
    except EngineError:
        return False
    return state is None or state.status != RUNNING


def sweep_codes(sweep: Sweep) -> None:
    rows = sweep.store.heygem.select()
    timeout = _timeout(sweep) if rows else _DEFAULT_TIMEOUT
    clients: dict[str, HeygemClient] = {}
    for row in rows:
        if row.live:
            continue
        if row.service is not None:
            client = clients.get(row.service) or clients.setdefault(
                row.service, HeygemClient(row.service, timeout))
            if not forgotten(client, row.code):
                continue
        # Outside the daemon's own folders, so not Sweep.remove: `<code>*` names only what we made.
        for path, size in remove_code(Path(row.temp), row.code):
            sweep.removed.append(str(path))
            sweep.freed += size
        sweep.store.heygem.forget(row.code, row.temp)
