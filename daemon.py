#!/usr/bin/env python3
"""Entry point: `python daemon.py` is `heygem-daemon run` (extra arguments go before `run`, e.g. -c FILE)."""

import sys

from heygem_daemon.cli import main

if __name__ == "__main__":
    sys.exit(main([*sys.argv[1:], "run"]))
