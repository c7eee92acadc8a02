"""A daily online backup of the state database (`state/heygem.db.bak`), scheduled like a cleanup sweep.

A damaged database stops the daemon with one line saying how to put this copy back (state.db).
"""

from __future__ import annotations

from heygem_daemon.log import get_logger
from heygem_daemon.ops.cleanup import Sweep

log = get_logger("heygem.cleanup")


def backup_database(sweep: Sweep) -> None:
    target = sweep.store.db.backup()
    log.info("database backed up", backup=str(target), size=target.stat().st_size)
