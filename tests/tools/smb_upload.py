#!/usr/bin/python3
"""An SMB client that pauses mid-upload with its file open, as a laptop on Wi-Fi does: Samba's own client
library (libsmbclient, through Debian's python3-smbc), so it runs on the system Python, not the venv.

    smb_upload.py smb://127.0.0.1:PORT/share/NAME SOURCE SPLIT

Writes SOURCE's first SPLIT bytes (each write answered by the server before the next), prints `paused`,
waits for a line on stdin, writes the rest, closes the file and prints `closed`.
"""

import os
import sys

import smbc


def main() -> None:
    url, source, split = sys.argv[1], sys.argv[2], int(sys.argv[3])
    with open(source, "rb") as fh:
        data = fh.read()
    # The share takes guests (map to guest = Bad User): any name will do.
    ctx = smbc.Context(auth_fn=lambda *_server: ("WORKGROUP", "guest", ""))
    remote = ctx.open(url, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
    remote.write(data[:split])
    print("paused", flush=True)
    sys.stdin.readline()
    remote.write(data[split:])
    remote.close()
    print("closed", flush=True)


if __name__ == "__main__":
    main()
