"""audit.log: a line record() acknowledged is on disk, even if the process is killed right after."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

from heygem_daemon.delivery.audit import AUDIT_FILE

RECORD_THEN_DIE = """
import os, signal, sys
from pathlib import Path
from heygem_daemon.delivery.audit import AuditLog
log = AuditLog(Path(sys.argv[1]))
for i in range(int(sys.argv[2])):
    log.record("delivery", job=f"job-{i}", job_id=None, owner="alice", dropped_at=None, files=1, total_bytes=10,
               keys=[f"k/{i}.mp4"], links=[f"https://s3.example/k/{i}.mp4?X-Amz-Signature=abc"])
print("recorded", flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_every_acknowledged_audit_line_survives_a_sigkill_and_carries_no_signature(tmp_path):
    done = subprocess.run([sys.executable, "-c", RECORD_THEN_DIE, str(tmp_path), "200"], capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert done.returncode == -signal.SIGKILL and done.stdout == "recorded\n"
    lines = [json.loads(line) for line in (tmp_path / AUDIT_FILE).read_text().splitlines()]
    assert [line["job"] for line in lines] == [f"job-{i}" for i in range(200)]
    assert all(line["links"][0].endswith(".mp4") and "Signature" not in line["links"][0] for line in lines)
