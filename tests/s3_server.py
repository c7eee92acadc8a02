"""A real moto S3 server in its own process on 127.0.0.1; stop it to play "S3 is down", start it again."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import boto3
from botocore.config import Config

KEY_ID, SECRET = "testing-key-id", "testing-secret"
PART_PUT = re.compile(r'"PUT /(?P<bucket>[^/ ]+)/(?P<key>[^? ]+)\?uploadId=(?P<upload>[^& ]+)&partNumber=(?P<n>\d+) ')


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MotoServer:
    def __init__(self, log_path: Path) -> None:
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> "MotoServer":
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                                         stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                self.client().list_buckets()
                return self
            except Exception:
                time.sleep(0.1)
        raise RuntimeError(f"moto server did not start:\n{self.log_path.read_text()[-2000:]}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)

    def client(self) -> Any:
        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1", aws_access_key_id=KEY_ID,
                            aws_secret_access_key=SECRET,
                            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}))

    def new_bucket(self) -> str:
        name = f"b-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return name

    def part_puts(self, bucket: str) -> list[tuple[str, int]]:
        """(upload id, part number) of every UploadPart the server received for `bucket`, from its access log."""
        text = self.log_path.read_text(errors="replace")
        return [(m["upload"], int(m["n"])) for m in PART_PUT.finditer(text) if m["bucket"] == bucket]

    def s3_settings(self, bucket: str, **extra: Any) -> dict[str, Any]:
        return {"bucket": bucket, "endpoint_url": self.endpoint, "region": "us-east-1", "addressing_style": "path",
                **extra}


def credentials_env() -> dict[str, str]:
    return {"AWS_ACCESS_KEY_ID": KEY_ID, "AWS_SECRET_ACCESS_KEY": SECRET}
