"""Secrets from systemd credentials (`LoadCredential=`) or, failing that, an environment variable.

Credentials are files only this service can read, under $CREDENTIALS_DIRECTORY; they never appear in
`systemctl show` or /proc/*/environ as environment variables do. Values are never logged.
"""

from __future__ import annotations

import os
from pathlib import Path


def get_secret(name: str, env_var: str | None = None, environ: dict[str, str] | None = None) -> str | None:
    """The credential `name`, else $env_var, else None. Surrounding whitespace (a trailing newline from
    `echo > file`) is dropped."""
    env = os.environ if environ is None else environ
    folder = env.get("CREDENTIALS_DIRECTORY")
    if folder and name and "/" not in name and name not in (".", ".."):
        try:
            return (Path(folder) / name).read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            pass
    value = env.get(env_var) if env_var else None
    return value.strip() if value else None
