"""The state of the daemon in one SQLite file; the only package that holds SQL.

`Store` is what a process opens: one Database and a repository per aggregate.
"""

from __future__ import annotations

from pathlib import Path

from heygem_daemon.state.api import ApiRepository, ApiToken, KeyUse, Webhook
from heygem_daemon.state.db import Database
from heygem_daemon.state.deliveries import Batch, Delivery, DeliveryRepository, Part
from heygem_daemon.state.heygem import HeygemCode, HeygemCodes
from heygem_daemon.state.jobs import CANCELLING, TERMINAL_JOB_STATES, Job, JobRepository
from heygem_daemon.state.ops import OpsRepository
from heygem_daemon.state.outbox import NewNotification, Notification, OutboxRepository
from heygem_daemon.state.tasks import NewTask, Task, TaskQueue
from heygem_daemon.state.web import WebRepository, WebSession

__all__ = ["DB_FILE", "db_path", "CANCELLING", "TERMINAL_JOB_STATES", "ApiToken", "Batch", "Delivery", "HeygemCode",
           "Job", "KeyUse", "NewNotification", "NewTask", "Notification", "Part", "Store", "Task", "Webhook",
           "WebSession"]


DB_FILE = "heygem.db"


def db_path(state_dir: Path) -> Path:
    """The daemon's database in its state folder."""
    return state_dir / DB_FILE


class Store:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.db = Database(path)
        self.jobs = JobRepository(self.db)
        self.tasks = TaskQueue(self.db)
        self.outbox = OutboxRepository(self.db)
        self.deliveries = DeliveryRepository(self.db)
        self.ops = OpsRepository(self.db)
        self.heygem = HeygemCodes(self.db)
        self.web = WebRepository(self.db)
        self.api = ApiRepository(self.db)

    def close(self) -> None:
        self.db.close()
