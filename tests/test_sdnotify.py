"""sd_notify over a real unix datagram socket, path and abstract."""

from __future__ import annotations

import os
import socket
import uuid

import pytest

from heygem_daemon.ops.sdnotify import Notifier


def listener(address: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + address[1:] if address.startswith("@") else address)
    sock.settimeout(5)
    return sock


@pytest.mark.parametrize("abstract", [False, True], ids=["path", "abstract"])
def test_messages_arrive_as_one_datagram_each(tmp_path, abstract):
    address = f"@heygem-test-{uuid.uuid4().hex}" if abstract else str(tmp_path / "notify.sock")
    sock = listener(address)
    notifier = Notifier({"NOTIFY_SOCKET": address})
    notifier.ready("0 queued")
    notifier.status("1 queued")
    notifier.status("1 queued")  # unchanged: not sent again
    notifier.watchdog()
    notifier.stopping(90)
    got = [sock.recv(4096).decode() for _ in range(4)]
    assert got[0] == f"READY=1\nSTATUS=0 queued\nMAINPID={os.getpid()}"
    assert got[1:] == ["STATUS=1 queued", "WATCHDOG=1", "STOPPING=1\nEXTEND_TIMEOUT_USEC=90000000"]


def test_reloading_carries_the_monotonic_time(tmp_path):
    sock = listener(str(tmp_path / "n.sock"))
    Notifier({"NOTIFY_SOCKET": str(tmp_path / "n.sock")}).reloading()
    fields = dict(line.split("=", 1) for line in sock.recv(4096).decode().splitlines())
    assert fields["RELOADING"] == "1" and int(fields["MONOTONIC_USEC"]) > 0


def test_without_notify_socket_every_call_is_a_no_op():
    notifier = Notifier({})
    notifier.ready("x")
    notifier.watchdog()
    assert not notifier.enabled and notifier.watchdog_interval is None


def test_watchdog_pings_at_half_the_timeout_and_only_for_this_process():
    assert Notifier({"WATCHDOG_USEC": "30000000"}).watchdog_interval == 15.0
    assert Notifier({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}).watchdog_interval == 15.0
    assert Notifier({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}).watchdog_interval is None


def test_a_vanished_socket_does_not_raise(tmp_path):
    notifier = Notifier({"NOTIFY_SOCKET": str(tmp_path / "gone.sock")})
    notifier.watchdog()
    assert notifier.enabled
