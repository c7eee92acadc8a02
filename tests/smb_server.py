"""A real Samba server (Debian's smbd) sharing one folder on 127.0.0.1, and smbclient uploads through it: what
an office's Windows and Mac clients do to a shared inbox. smbd writes through the local filesystem, so the
daemon sees an SMB upload as the kernel reports smbd's own writes."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import BinaryIO

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


class SmbServer:
    def __init__(self, share: Path, run: Path) -> None:
        if not shutil.which("smbd") or not shutil.which("smbclient"):
            pytest.skip("needs Debian's samba and smbclient (tests/system/packages.sh installs them)")
        if os.geteuid() != 0:
            pytest.skip("smbd needs root")
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
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"smbd did not start (see {run / 'smbd.log'})")
                time.sleep(0.05)

    def upload(self, name: str, fifo: Path) -> tuple[subprocess.Popen[bytes], BinaryIO]:
        """smbclient `put` from a FIFO: the SMB file stays open on the server for as long as the returned
        writer is, sending what is written to it (smbclient sends in 16 MiB pieces, and the rest at EOF)."""
        os.mkfifo(fifo)
        client = subprocess.Popen(["smbclient", "//127.0.0.1/inbox", "-p", str(self.port), "-N",
                                   "-c", f"put {fifo} {name}"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        return client, open(fifo, "wb")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
