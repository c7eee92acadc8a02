"""A real Samba server (Debian's smbd) sharing one folder on 127.0.0.1, and an SMB client (Samba's libsmbclient)
uploading through it: what an office's Windows and Mac clients do to a shared inbox. smbd writes through the
local filesystem, so the daemon sees an SMB upload as the kernel reports smbd's own writes."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

CONF = """[global]
  smb ports = {port}
  interfaces = 127.0.0.1
  bind interfaces only = yes
  server role = standalone server
  map to guest = Bad User
  server min protocol = SMB2
  disable spoolss = yes
  load printers = no
  printcap name = /dev/null
  private dir = {run}/private
  lock directory = {run}/lock
  state directory = {run}/state
  cache directory = {run}/cache
  pid directory = {run}/pid
  ncalrpc dir = {run}/ncalrpc
  log file = {run}/smbd.log
[inbox]
  path = {share}
  guest ok = yes
  guest only = yes
  read only = no
  force user = root
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


CLIENT = Path(__file__).parent / "tools" / "smb_upload.py"
SYSTEM_PYTHON = "/usr/bin/python3"


class Upload:
    """tools/smb_upload.py at work: paused with its file open until `finish()`."""

    def __init__(self, url: str, source: Path, split: int) -> None:
        self.proc = subprocess.Popen([SYSTEM_PYTHON, str(CLIENT), url, str(source), str(split)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self._expect("paused")

    def _expect(self, word: str) -> None:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().decode(errors="replace").strip()
        if line != word:
            self.proc.kill()
            rest = self.proc.stdout.read().decode(errors="replace")
            raise AssertionError(f"the SMB client said {line!r} instead of {word!r}: {rest[-2000:]}")

    def finish(self) -> None:
        """The client goes on: the rest of the file, then the close."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(b"go\n")
        self.proc.stdin.flush()
        self._expect("closed")
        assert self.proc.wait(30) == 0

    def abandon(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def smb_client_missing() -> str | None:
    """Why this machine cannot run the test (None when it can)."""
    if not shutil.which("smbd"):
        return "needs Debian's samba (tests/system/packages.sh installs it)"
    if subprocess.run([SYSTEM_PYTHON, "-c", "import smbc"], capture_output=True).returncode != 0:
        return "needs Debian's python3-smbc, Samba's client library for Python (tests/system/packages.sh installs it)"
    if os.geteuid() != 0:
        return "smbd needs root"
    return None


class SmbServer:
    def __init__(self, share: Path, run: Path) -> None:
        missing = smb_client_missing()
        if missing:
            pytest.skip(missing)
        self.share, self.run, self.port = share, run, _free_port()
        for sub in ("private", "lock", "state", "cache", "pid", "ncalrpc"):
            (run / sub).mkdir(parents=True, exist_ok=True)
        self.conf = run / "smb.conf"
        self.conf.write_text(CONF.format(port=self.port, run=run, share=share))
        self.proc = subprocess.Popen(["smbd", "--foreground", "--no-process-group", f"--configfile={self.conf}"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     start_new_session=True)  # smbd signals its whole process group as it stops
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.5).close()
                return
            except OSError as refused:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"smbd did not start (see {run / 'smbd.log'})") from refused
                time.sleep(0.05)

    def upload(self, name: str, source: Path, split: int) -> Upload:
        """Start uploading `source` as `name`; returns once its first `split` bytes are on the share and the
        client holds the file open, paused."""
        return Upload(f"smb://127.0.0.1:{self.port}/inbox/{name}", source, split)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
