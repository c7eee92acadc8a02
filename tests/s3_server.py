"""Real S3-compatible servers in their own processes on 127.0.0.1; stop one to play "S3 is down", start it again.

- moto: the full API, accepts any signature, never expires a link.
- nanio: checks SigV4 signatures and access keys, refuses expired presigned links and skewed clocks.
- LimitedProxy: a real HTTP proxy in front of either that answers like servers lacking parts of the API (or
  holds downloads back, like a slow link).
"""

from __future__ import annotations

import base64
import http.client
import os
import re
import socket
import subprocess
import sys
import threading
import time
import uuid
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import boto3
from botocore.config import Config

KEY_ID, SECRET = "testing-key-id", "testing-secret"
PART_PUT = re.compile(r'"PUT /(?P<bucket>[^/ ]+)/(?P<key>[^? ]+)\?uploadId=(?P<upload>[^& ]+)&partNumber=(?P<n>\d+) ')


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class S3Process:
    """One server process; subclasses say how to start it."""

    name = "s3"

    def __init__(self, log_path: Path) -> None:
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def command(self) -> tuple[list[str], dict[str, str] | None]:
        raise NotImplementedError

    def start(self) -> "S3Process":
        argv, env = self.command()
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                self.client().list_buckets()
                return self
            except Exception:
                time.sleep(0.1)
        raise RuntimeError(f"{self.name} server did not start:\n{self.log_path.read_text()[-2000:]}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)

    def client(self) -> Any:
        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1", aws_access_key_id=KEY_ID,
                            aws_secret_access_key=SECRET,
                            config=Config(signature_version="s3v4", s3={"addressing_style": "path"},
                                          retries={"max_attempts": 1}))

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


class MotoServer(S3Process):
    name = "moto"

    def command(self) -> tuple[list[str], dict[str, str] | None]:
        return [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)], None


class NanioServer(S3Process):
    """nanio (PyPI): buckets are folders under `data_dir`; one access key, KEY_ID/SECRET."""

    name = "nanio"

    def command(self) -> tuple[list[str], dict[str, str] | None]:
        data = self.log_path.with_name(f"{self.log_path.stem}-data")
        env = {**os.environ, "NANIO_ACCESS_KEY": KEY_ID, "NANIO_SECRET_KEY": SECRET}
        return [sys.executable, "-m", "nanio", "serve", "--data-dir", str(data), "--host", "127.0.0.1",
                "--port", str(self.port)], env


# What s3rver 3.7.1 answered when measured (issue 15): these calls are missing from its API.
LACKING = {
    "ListParts": (405, "MethodNotAllowed", "The specified method is not allowed against this resource."),
    "AbortMultipartUpload": (405, "MethodNotAllowed", "The specified method is not allowed against this resource."),
    "ListMultipartUploads": (501, "NotImplemented", "A header you provided implies functionality that is not "
                             "implemented."),
    "Lifecycle": (501, "NotImplemented", "A header you provided implies functionality that is not implemented."),
}


def operation(method: str, path: str, query: dict[str, list[str]]) -> str | None:
    """The name of the S3 call a request makes, for the calls LACKING lists."""
    bucket_only = path.strip("/").count("/") == 0
    if "lifecycle" in query:
        return "Lifecycle"
    if method == "GET" and bucket_only and "uploads" in query:
        return "ListMultipartUploads"
    if method == "GET" and "uploadId" in query:
        return "ListParts"
    if method == "DELETE" and "uploadId" in query:
        return "AbortMultipartUpload"
    return None


class PartChecksums:
    """What AWS documents for multipart part checksums (CreateMultipartUpload, UploadPart,
    CompleteMultipartUpload): an upload created with `x-amz-checksum-algorithm: CRC32` takes only parts that
    carry `x-amz-checksum-crc32`, and an upload created without one only parts without; a CRC32 that does not
    match the body is BadDigest; the completion of a CRC32 upload must list each part's checksum."""

    def __init__(self) -> None:
        self.crc32_uploads: set[str] = set()
        self.part_payloads: list[str] = []
        """x-amz-content-sha256 of each part received: a signed sha256 or UNSIGNED-PAYLOAD."""

    def refusal(self, method: str, query: dict[str, list[str]], headers: Any, body: bytes) -> tuple[str, str] | None:
        upload = query.get("uploadId", [""])[0]
        if method == "PUT" and upload and "partNumber" in query:
            self.part_payloads.append(headers.get("x-amz-content-sha256", ""))
            sent = headers.get("x-amz-checksum-crc32")
            expected = "crc32" if upload in self.crc32_uploads else "null"
            if expected != ("crc32" if sent else "null"):
                return "InvalidRequest", (f"Checksum Type mismatch occurred, expected checksum Type: {expected}, "
                                          f"actual checksum Type: {'crc32' if sent else 'null'}")
            if sent and sent != base64.b64encode(zlib.crc32(body).to_bytes(4, "big")).decode():
                return "BadDigest", "The CRC32 you specified did not match the calculated checksum."
        if method == "POST" and upload in self.crc32_uploads:
            for part in re.findall(rb"<Part>(.*?)</Part>", body, re.S):
                if b"<ChecksumCRC32>" not in part:
                    number = re.search(rb"<PartNumber>(\d+)</PartNumber>", part)
                    return "InvalidRequest", ("The upload was created using a crc32 checksum. The complete request "
                                              "must include the checksum for each part. It was missing for part "
                                              f"{int(number.group(1)) if number else 0} in the request.")
        return None

    def answered(self, method: str, query: dict[str, list[str]], headers: Any, answer: bytes) -> bytes:
        """Note a CRC32 upload as it is created; ListParts names its algorithm (ListPartsResult's
        ChecksumAlgorithm), as AWS answers."""
        if method == "POST" and "uploads" in query and headers.get("x-amz-checksum-algorithm", "").upper() == "CRC32":
            found = re.search(rb"<UploadId>([^<]+)</UploadId>", answer)
            if found:
                self.crc32_uploads.add(found.group(1).decode())
        if method == "GET" and query.get("uploadId", [""])[0] in self.crc32_uploads:
            return re.sub(rb"(</UploadId>)", rb"\1<ChecksumAlgorithm>CRC32</ChecksumAlgorithm>", answer, count=1)
        return answer


class LimitedProxy:
    """A real HTTP proxy to `upstream` that answers LACKING calls with s3rver 3.7.1's measured errors.

    Everything else is forwarded byte for byte (signatures stay valid: the Host header is kept), so the
    daemon meets a server that has the basic API and not the rest, as in the field.
    """

    def __init__(self, upstream: S3Process, lacking: tuple[str, ...] = tuple(LACKING),
                 corrupt_uploads: bool = False, hold_downloads: threading.Event | None = None,
                 answer_mb_s: float = 0.0, checksums: PartChecksums | None = None) -> None:
        """`corrupt_uploads`: flip the first byte of every PUT body on the way, as a bad link would.
        `checksums`: answer for part checksums as AWS does (PartChecksums), after any corruption.
        `hold_downloads`: a GetObject is answered only once it is set (a slow link the test lets go).
        `answer_mb_s`: answers go out at most this fast (a link slower than localhost); 0: at once."""
        self.upstream, self.lacking, self.corrupt_uploads = upstream, lacking, corrupt_uploads
        self.hold_downloads, self.answer_mb_s, self.checksums = hold_downloads, answer_mb_s, checksums
        self.refused: list[str] = []
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), self._handler())
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def start(self) -> "LimitedProxy":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def s3_settings(self, bucket: str, **extra: Any) -> dict[str, Any]:
        return {**self.upstream.s3_settings(bucket, **extra), "endpoint_url": self.endpoint}

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _any(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                url = urlsplit(self.path)
                query = parse_qs(url.query, keep_blank_values=True)
                op = operation(self.command, url.path, query)
                downloading = self.command == "GET" and not query and "/" in url.path.strip("/")
                if proxy.hold_downloads is not None and downloading:
                    proxy.hold_downloads.wait(60)
                if proxy.corrupt_uploads and self.command == "PUT" and body:
                    body = bytes([body[0] ^ 0xFF]) + body[1:]
                if op in proxy.lacking:
                    proxy.refused.append(op)
                    self._error(*LACKING[op])
                    return
                refused = proxy.checksums.refusal(self.command, query, self.headers, body) if proxy.checksums else None
                if refused:
                    self._error(400, *refused)
                    return
                conn = http.client.HTTPConnection("127.0.0.1", proxy.upstream.port, timeout=60)
                try:
                    conn.request(self.command, self.path, body=body, headers=dict(self.headers.items()))
                    resp = conn.getresponse()
                    data = resp.read()
                    dropped = ("transfer-encoding", "connection")
                    if self.command != "HEAD":  # a HEAD answer keeps the object's length
                        dropped += ("content-length",)
                    headers = [(k, v) for k, v in resp.getheaders() if k.lower() not in dropped]
                    if proxy.checksums and resp.status == 200:
                        data = proxy.checksums.answered(self.command, query, self.headers, data)
                    self._answer(resp.status, headers, data)
                finally:
                    conn.close()

            def _error(self, status: int, code: str, message: str) -> None:
                self._answer(status, [("Content-Type", "application/xml")],
                             f"<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>{code}</Code>"
                             f"<Message>{message}</Message></Error>".encode())

            def _answer(self, status: int, headers: list[tuple[str, str]], data: bytes) -> None:
                self.send_response(status)
                for k, v in headers:
                    self.send_header(k, v)
                if self.command != "HEAD":
                    self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command == "HEAD":
                    return
                step = 256 * 1024 if proxy.answer_mb_s else len(data) or 1
                for at in range(0, len(data), step):
                    self.wfile.write(data[at:at + step])
                    if proxy.answer_mb_s:
                        time.sleep(step / (proxy.answer_mb_s * 1024 * 1024))

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _any

        return Handler


def credentials_env() -> dict[str, str]:
    return {"AWS_ACCESS_KEY_ID": KEY_ID, "AWS_SECRET_ACCESS_KEY": SECRET}
