"""The one place that talks to S3: client set-up, resumable multipart upload, streamed upload, bucket hygiene.

Uploads resume from the store: the UploadId is recorded before the first part and every part as it
completes, so after a crash ListParts tells which parts the server holds and only the others are sent.
"""

from __future__ import annotations

import base64
import hashlib
import mimetypes
import threading
import time
import zlib
from concurrent.futures import ALL_COMPLETED, FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlsplit

import boto3
from botocore.client import BaseClient
from botocore.config import Config as BotoConfig
from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError, PartialCredentialsError

from heygem_daemon.ops import metrics
from heygem_daemon.ops.checks import Check
from heygem_daemon.config import S3, Config, Lifecycle
from heygem_daemon.delivery.links import content_disposition
from heygem_daemon.delivery.names import static_prefix
from heygem_daemon.log import get_logger
from heygem_daemon.secrets import get_secret
from heygem_daemon.state import Delivery, Part, Store

log = get_logger("heygem.s3")
MiB = 1024 * 1024
# systemd `LoadCredential=` files; the boto3 chain (env, ~/.aws, instance role) is used when they are absent.
CREDENTIAL_FILES = ("aws_access_key_id", "aws_secret_access_key", "aws_session_token")
LIFECYCLE_RULE_ID = "heygem-daemon"
# Each part of a multipart upload carries its CRC32, declared when the upload is created and listed again when
# it completes, as boto3 sends parts (AWS refuses part checksums an upload did not declare, and a completion
# without them). Unlike boto3 the CRC goes in a header, not an aws-chunked trailer, which older MinIO, Ceph
# and OSS versions refuse; servers that do not know the header ignore it.
PART_CHECKSUM = "CRC32"
PART_CHECKSUM_HEADER = "x-amz-checksum-crc32"
# Errors that no retry can fix: the operator must change credentials, the bucket or a policy.
ALERT_CODES = frozenset({
    "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "NoSuchBucket", "ExpiredToken",
    "InvalidToken", "AllAccessDisabled", "AccountProblem", "InvalidBucketName", "PermanentRedirect",
    "AuthorizationHeaderMalformed",
})
# How servers that lack a call answer it (s3rver 3.7.1: 405 for ListParts/Abort, 501 for the rest).
UNSUPPORTED_STATUS = (405, 501)
UNSUPPORTED_CODES = frozenset({"MethodNotAllowed", "NotImplemented"})


class Stopping(Exception):
    """The daemon is stopping: an upload leaves off between parts and resumes on the next start."""


class Superseded(Exception):
    """The upload's fence said no just before the object would appear: another attempt owns the key now.
    The multipart upload was aborted; nothing was written at the key."""


class S3Failure(Exception):
    """An S3 problem in words: retryable ones wait and go again; the others also alert the operator."""

    def __init__(self, reason: str, hint: str, retryable: bool, code: str = "") -> None:
        super().__init__(reason)
        self.reason, self.hint, self.retryable, self.code = reason, hint, retryable, code

    def as_dict(self) -> dict[str, Any]:
        return {"stage": "deliver", "reason": self.reason, "hint": self.hint, "code": self.code,
                "retryable": self.retryable}


def _code_status(exc: ClientError) -> tuple[str, int]:
    code = str(exc.response.get("Error", {}).get("Code", ""))
    return code, int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)


def unsupported(exc: Exception) -> bool:
    """True when the server lacks the call (405/501): asking again can never work."""
    if not isinstance(exc, ClientError):
        return False
    code, status = _code_status(exc)
    return code in UNSUPPORTED_CODES or status in UNSUPPORTED_STATUS


def describe(exc: Exception, bucket: str) -> S3Failure:
    """Sort an exception from boto3 into retry-later or tell-the-operator, with what to fix in words."""
    if isinstance(exc, (NoCredentialsError, PartialCredentialsError)):
        return S3Failure("no S3 credentials found", "set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, ~/.aws, an "
                         "instance role, or systemd credentials aws_access_key_id/aws_secret_access_key", False,
                         "NoCredentials")
    if isinstance(exc, ClientError):
        err = exc.response.get("Error", {})
        code, status = _code_status(exc)
        call = getattr(exc, "operation_name", "") or "that call"
        if unsupported(exc):
            return S3Failure(f"the S3 server does not support {call} ({status} {code})",
                             "this S3-compatible server lacks that part of the API; use a server that has it "
                             "or leave the feature that needs it off", False, code or str(status))
        if code == "RequestTimeTooSkewed":
            return S3Failure("S3 refused the request: this machine's clock is off by more than 15 minutes",
                             "set the clock right (timedatectl set-ntp true, or chrony/ntpd)", False, code)
        if status >= 500 or code in ("SlowDown", "RequestTimeout", "InternalError", "ServiceUnavailable"):
            return S3Failure(f"S3 answered {status} {code}", "the service is struggling; retrying", True, code)
        if code == "NoSuchBucket" or (status == 404 and call == "HeadBucket"):
            return S3Failure(f"bucket {bucket!r} does not exist", "create it or fix s3.bucket / s3.endpoint_url",
                             False, "NoSuchBucket")
        if code in ("AuthorizationHeaderMalformed", "PermanentRedirect", "IllegalLocationConstraintException"):
            region = err.get("Region") or "another region"
            return S3Failure(f"S3 says bucket {bucket!r} lives in {region} ({code})",
                             "set s3.region to the bucket's region", False, code)
        if code in ALERT_CODES or status == 403:
            return S3Failure(f"S3 refused access to bucket {bucket!r} ({code or status})",
                             "check the credentials and the bucket policy (PutObject, GetObject, "
                             "ListMultipartUploadParts, AbortMultipartUpload)", False, code or str(status))
        return S3Failure(f"S3 refused the request: {code} {err.get('Message', '')}".strip(),
                         "check the s3 section of config.yaml", False, code)
    if isinstance(exc, BotoCoreError):
        return S3Failure(f"cannot reach S3 ({type(exc).__name__})", "network or endpoint down; retrying", True,
                         type(exc).__name__)
    return S3Failure(f"unexpected {type(exc).__name__}: {exc}", "see the daemon log; retrying", True,
                     type(exc).__name__)


def systemd_credentials(environ: dict[str, str] | None = None) -> dict[str, str]:
    """Keys from $CREDENTIALS_DIRECTORY (systemd LoadCredential=), read at start, never logged. Without
    them boto3's own chain (environment, ~/.aws, instance role) applies."""
    found = {name: get_secret(name, None, environ) for name in CREDENTIAL_FILES}
    return {name: value for name, value in found.items() if value}


def make_client(s3: S3, environ: dict[str, str] | None = None) -> BaseClient:
    """The S3 client; `client.meta.endpoint_url` / `region_name` tell what boto3 really used (env included)."""
    config = BotoConfig(
        signature_version="s3v4",
        # Request bodies are signed with their sha256 (SigV4 payload signing; AWS, MinIO and Ceph check it),
        # over https too — except multipart parts, which carry a CRC32 header instead (PART_CHECKSUM): a
        # second sha256 of every byte cost a third of the upload's CPU (bench/upload.py). MD5 costs more still.
        s3={"addressing_style": s3.addressing_style, "payload_signing_enabled": True},
        # botocore's standard mode: exponential backoff with jitter on 5xx, throttling and dropped connections.
        retries={"mode": "standard", "max_attempts": 4},
        connect_timeout=s3.connect_timeout,
        read_timeout=s3.read_timeout,
        max_pool_connections=max(10, 2 * s3.max_concurrency),
        # Newer botocore adds CRC32 trailers (aws-chunked) by default, which MinIO/OSS/Ceph versions reject.
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )
    session = boto3.session.Session(**systemd_credentials(environ))
    client = session.client("s3", endpoint_url=s3.endpoint_url or None, region_name=s3.region or None,
                            config=config)
    unsigned = config.merge(BotoConfig(s3={**(config.s3 or {}), "payload_signing_enabled": False}))

    def part_checks_itself(params: dict[str, Any], context: dict[str, Any], **_: Any) -> None:
        # A part that carries its CRC32 in a header (as boto3 checks parts, but not in an aws-chunked trailer)
        # is sent as UNSIGNED-PAYLOAD: botocore would otherwise hash every byte once more for the signature.
        if PART_CHECKSUM_HEADER in params["headers"]:
            context["client_config"] = unsigned

    client.meta.events.register("before-call.s3.UploadPart", part_checks_itself)
    return client


class Throttle:
    """Caps the upload rate of all threads together (s3.max_bandwidth_mb_s) so a shared uplink stays usable."""

    def __init__(self, mb_per_second: float) -> None:
        self.rate = mb_per_second * MiB
        self._next = time.monotonic()
        self._lock = threading.Lock()

    def take(self, nbytes: int) -> None:
        if not self.rate:
            return
        with self._lock:
            now = time.monotonic()
            start = max(now, self._next)
            self._next = start + nbytes / self.rate
        if start > now:
            time.sleep(start - now)


@dataclass(frozen=True)
class Uploaded:
    etag: str
    sha256: str
    sent_bytes: int
    """Bytes sent in this call: less than the size when a resumed upload skipped parts the server had."""


def _md5(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


def _md5_b64(data: bytes) -> str:
    return base64.b64encode(hashlib.md5(data, usedforsecurity=False).digest()).decode()


def crc32_b64(data: bytes) -> str:
    """A part's x-amz-checksum-crc32: the big-endian CRC32, base64 (zlib's runs at several GB/s)."""
    return base64.b64encode(zlib.crc32(data).to_bytes(4, "big")).decode()


def send_part(client: BaseClient, bucket: str, key: str, upload_id: str, number: int, chunk: bytes,
              checksum: str | None) -> str:
    """One part, with its CRC32 when the upload declared it; returns the part's ETag."""
    extra = {"ChecksumCRC32": checksum} if checksum else {}
    resp = client.upload_part(Bucket=bucket, Key=key, UploadId=upload_id, PartNumber=number, Body=chunk, **extra)
    metrics.BYTES_UPLOADED.inc(len(chunk))
    return str(resp["ETag"])


def complete_upload(client: BaseClient, bucket: str, key: str, upload_id: str, etags: dict[int, str],
                    checksums: dict[int, str] | None) -> str:
    """Complete with every part's ETag (and CRC32 when the upload declared them); returns the object's ETag."""
    parts = [{"PartNumber": n, "ETag": etags[n], **({"ChecksumCRC32": checksums[n]} if checksums else {})}
             for n in sorted(etags)]
    resp = client.complete_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id,
                                            MultipartUpload={"Parts": parts})
    return str(resp["ETag"])


def object_headers(path: Path, name: str) -> dict[str, str]:
    """Stored with the object: servers that ignore a link's response-content-disposition (nanio, s3rver)
    still name the download."""
    return {"ContentType": mimetypes.guess_type(path.name)[0] or "application/octet-stream",
            "ContentDisposition": content_disposition(name)}


class Uploader:
    def __init__(self, client: BaseClient, settings: S3, store: Store, throttle: Throttle,
                 stopping: threading.Event) -> None:
        self.client, self.settings, self.store, self.throttle = client, settings, store, throttle
        self.stopping = stopping
        self.bucket = settings.bucket
        self.part_size = settings.part_size_mb * MiB

    def upload(self, d: Delivery, fence: Callable[[], bool] | None = None) -> Uploaded:
        """`fence`, when given, is asked just before the object would appear (PutObject, or completing the
        multipart upload): False aborts the upload and raises Superseded, so a late attempt never overwrites."""
        path = Path(d.path)
        size = path.stat().st_size
        if size <= self.part_size:
            return self._put(d, path, fence)
        return self._multipart(d, path, fence)

    def _put(self, d: Delivery, path: Path, fence: Callable[[], bool] | None) -> Uploaded:
        data = path.read_bytes()  # at most one part size
        if fence is not None and not fence():
            raise Superseded(d.key)
        self.throttle.take(len(data))
        # Content-MD5 as well as the signed sha256: some servers check only the MD5 (nanio, s3rver).
        resp = self.client.put_object(Bucket=self.bucket, Key=d.key, Body=data, ContentMD5=_md5_b64(data),
                                      **object_headers(path, d.rel))
        metrics.BYTES_UPLOADED.inc(len(data))
        return Uploaded(resp["ETag"], hashlib.sha256(data).hexdigest(), len(data))

    def _multipart(self, d: Delivery, path: Path, fence: Callable[[], bool] | None) -> Uploaded:
        upload_id, held, checksummed = self._resume(d)
        sha = hashlib.sha256()
        parts: dict[int, Part] = {}
        checksums: dict[int, str] = {}
        in_flight: dict[Future[Part], int] = {}
        sent = 0
        # The file is read once, front to back. Parts go out s3.part_concurrency at a time (memory: that many
        # parts); each part's CRC32 is taken as it is read, the whole file's sha256 runs beside the sends in one
        # more thread, in order. Parts that landed together are recorded in one transaction.
        with (open(path, "rb") as fh, ThreadPoolExecutor(self.settings.part_concurrency) as pool,
              ThreadPoolExecutor(1) as hasher):
            hashing: list[Future[None]] = []
            number = 0
            while chunk := fh.read(self.part_size):
                number += 1
                hashing = [f for f in hashing if not f.done()]
                while len(hashing) > self.settings.part_concurrency:
                    hashing.pop(0).result()
                hashing.append(hasher.submit(sha.update, chunk))  # parts the server holds count too
                checksums[number] = crc32_b64(chunk)
                have = held.get(number)
                if have is not None and have.size == len(chunk) and have.md5 == _md5(chunk):
                    parts[number] = have
                    continue
                if self.stopping.is_set():
                    raise Stopping(d.key)
                while len(in_flight) >= self.settings.part_concurrency:
                    parts.update(self._record_parts(d, in_flight))
                self.throttle.take(len(chunk))
                checksum = checksums[number] if checksummed else None
                in_flight[pool.submit(self._send_part, d.key, upload_id, number, chunk, checksum)] = number
                sent += len(chunk)
            while in_flight:
                parts.update(self._record_parts(d, in_flight))
            for f in hashing:
                f.result()
        if fence is not None and not fence():
            abort_quietly(self.client, self.bucket, d.key, upload_id)
            raise Superseded(d.key)
        etag = complete_upload(self.client, self.bucket, d.key, upload_id, {n: p.etag for n, p in parts.items()},
                               checksums if checksummed else None)
        return Uploaded(etag, sha.hexdigest(), sent)

    def _send_part(self, key: str, upload_id: str, number: int, chunk: bytes, checksum: str | None) -> Part:
        etag = send_part(self.client, self.bucket, key, upload_id, number, chunk, checksum)
        # A plain ETag is the part's MD5, what a resume compares; another kind (SSE-KMS) makes a resume re-send.
        return Part(number, etag, len(chunk), etag.strip('"') if _plain_md5(etag) else "", time.time())

    def _record_parts(self, d: Delivery, in_flight: dict[Future[Part], int]) -> dict[int, Part]:
        """Wait for at least one part in flight to land; record all that landed in one write."""
        done, _ = wait(in_flight, return_when=FIRST_COMPLETED)
        for future in done:
            del in_flight[future]
        landed = [future.result() for future in done]
        self.store.deliveries.add_parts(d.id, landed)
        return {part.number: part for part in landed}

    def _resume(self, d: Delivery) -> tuple[str, dict[int, Part], bool]:
        """The upload to continue, the parts the server confirms, and whether its parts carry a CRC32 (one we
        create does; a resumed one when the server lists it so — an upload an earlier version made does not).
        A vanished upload, or a server that cannot list parts (405/501), starts a fresh upload under the same key."""
        if d.upload_id is None:
            return self._create(d), {}, True
        try:
            on_server, checksummed = self._server_parts(d.key, d.upload_id)
        except ClientError as exc:
            if unsupported(exc):
                log.warning("the S3 server cannot list the parts of an upload; starting a fresh upload",
                            key=d.key, reason=describe(exc, self.bucket).reason)
                abort_quietly(self.client, self.bucket, d.key, d.upload_id)
                return self._create(d), {}, True
            if exc.response.get("Error", {}).get("Code") != "NoSuchUpload":
                raise
            log.warning("multipart upload gone from the server; starting over", key=d.key)
            return self._create(d), {}, True
        stored = {p.number: p for p in self.store.deliveries.parts(d.id)}
        held: dict[int, Part] = {}
        for number, (etag, size) in on_server.items():
            mine = stored.get(number)
            if mine is not None and mine.etag == etag:
                held[number] = mine
            elif _plain_md5(etag):
                # Sent just before a crash, before the store heard of it: a plain ETag is the part's MD5.
                held[number] = Part(number, etag, size, etag.strip('"'), time.time())
                self.store.deliveries.add_parts(d.id, [held[number]])
        self.store.deliveries.forget_parts(d.id, [n for n in stored if n not in held])
        log.info("resuming multipart upload", key=d.key, parts_on_server=len(held))
        return d.upload_id, held, checksummed

    def _server_parts(self, key: str, upload_id: str) -> tuple[dict[int, tuple[str, int]], bool]:
        """Each part's (ETag, size), and whether the upload declared CRC32 part checksums."""
        found: dict[int, tuple[str, int]] = {}
        checksummed = False
        for page in self.client.get_paginator("list_parts").paginate(Bucket=self.bucket, Key=key, UploadId=upload_id):
            checksummed = checksummed or page.get("ChecksumAlgorithm") == PART_CHECKSUM
            for p in page.get("Parts", []):
                found[int(p["PartNumber"])] = (p["ETag"], int(p["Size"]))
        return found, checksummed

    def _create(self, d: Delivery) -> str:
        resp = self.client.create_multipart_upload(Bucket=self.bucket, Key=d.key, ChecksumAlgorithm=PART_CHECKSUM,
                                                   **object_headers(Path(d.path), d.rel))
        self.store.deliveries.start_upload(d.id, resp["UploadId"])
        return resp["UploadId"]


def _plain_md5(etag: str) -> bool:
    tag = etag.strip('"')
    return len(tag) == 32 and all(c in "0123456789abcdef" for c in tag.lower())


class StreamUpload:
    """A write-only file object that sends what is written as a multipart upload, `part_concurrency` parts in
    flight while the next one fills (as boto3 streams a pipe: `zip - | aws s3 cp -`).

    Memory stays at part_concurrency + 1 parts whatever the total; nothing touches the disk.
    """

    def __init__(self, client: BaseClient, bucket: str, key: str, part_size: int, throttle: Throttle,
                 stopping: threading.Event, on_started: Callable[[str], None], filename: str,
                 part_concurrency: int) -> None:
        self.client, self.bucket, self.key, self.part_size, self.throttle = client, bucket, key, part_size, throttle
        self.stopping = stopping
        self.upload_id = client.create_multipart_upload(Bucket=bucket, Key=key, ChecksumAlgorithm=PART_CHECKSUM,
                                                        **object_headers(Path(filename), filename))["UploadId"]
        on_started(self.upload_id)
        self._pieces: list[bytes] = []
        self._buffered = 0
        self._limit = part_concurrency
        self._pool = ThreadPoolExecutor(part_concurrency)
        self._in_flight: set[Future[tuple[int, str, str]]] = set()
        self._parts = 0
        self._etags: dict[int, str] = {}
        self._checksums: dict[int, str] = {}
        self.size = 0

    def write(self, data: bytes) -> int:
        data = bytes(data)  # bytes are kept as they are; a buffer the caller may reuse is copied
        written = len(data)
        self.size += written
        while data:
            # Pieces are cut at the part boundary and joined once per part: each byte is copied once here.
            room = self.part_size - self._buffered
            piece, data = (data, b"") if len(data) <= room else (data[:room], data[room:])
            self._pieces.append(piece)
            self._buffered += len(piece)
            if self._buffered == self.part_size:
                self._send(b"".join(self._pieces))
                self._pieces, self._buffered = [], 0
        return written

    def flush(self) -> None:
        """Parts go out only when full: S3 refuses parts under 5 MiB except the last."""

    def _send(self, chunk: bytes) -> None:
        if self.stopping.is_set():
            raise Stopping(self.key)
        while len(self._in_flight) >= self._limit:
            self._collect(FIRST_COMPLETED)
        self.throttle.take(len(chunk))
        self._parts += 1
        self._in_flight.add(self._pool.submit(self._part, self._parts, chunk))

    def _part(self, number: int, chunk: bytes) -> tuple[int, str, str]:
        checksum = crc32_b64(chunk)  # here, beside the other parts, not in the thread writing the zip
        return number, send_part(self.client, self.bucket, self.key, self.upload_id, number, chunk, checksum), checksum

    def _collect(self, until: str) -> None:
        done, self._in_flight = wait(self._in_flight, return_when=until)
        for future in done:
            number, self._etags[number], self._checksums[number] = future.result()  # a failed part raises here

    def finish(self) -> str:
        if self._buffered or not self._parts:
            self._send(b"".join(self._pieces))
            self._pieces, self._buffered = [], 0
        self._collect(ALL_COMPLETED)
        self._pool.shutdown()
        return complete_upload(self.client, self.bucket, self.key, self.upload_id, self._etags, self._checksums)

    def abort(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)  # no part lands after the abort
        abort_quietly(self.client, self.bucket, self.key, self.upload_id)


def abort_upload(client: BaseClient, bucket: str, key: str, upload_id: str) -> None:
    try:
        client.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id)
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") != "NoSuchUpload":
            raise


def abort_quietly(client: BaseClient, bucket: str, key: str, upload_id: str) -> None:
    """Abort an upload nobody will finish; a failure (a server without AbortMultipartUpload, S3 down) is
    logged and never blocks a video or a batch: the lifecycle rule or the stale-upload sweep clears it later."""
    try:
        abort_upload(client, bucket, key, upload_id)
    except Exception as exc:
        failure = describe(exc, bucket)
        log.warning("could not abort an unfinished multipart upload; carrying on", key=key, reason=failure.reason,
                    hint=failure.hint)


def delete_object(client: BaseClient, bucket: str, key: str) -> None:
    client.delete_object(Bucket=bucket, Key=key)


def probe_write(client: BaseClient, bucket: str, key: str) -> None:
    """Put a small object at `key`, read it back and delete it: what a key allowed only under its prefix can
    do (HeadBucket or ListBuckets may be refused to it). Raises what boto3 raises, or S3Failure when the object
    read back is not the one written (another server, or a proxy, answers)."""
    body = f"heygem write check {key}".encode()
    client.put_object(Bucket=bucket, Key=key, Body=body)
    try:
        read = client.get_object(Bucket=bucket, Key=key)["Body"].read()
    finally:
        client.delete_object(Bucket=bucket, Key=key)
    if read != body:
        raise S3Failure(f"the object written to {key!r} read back different", "check s3.endpoint_url", False)


def object_store_name(endpoint_url: str) -> str:
    """The object store as an outage names it: its host, never a signature or a key from a URL."""
    return f"object store {urlsplit(endpoint_url).netloc or endpoint_url}"


def object_size(client: BaseClient, bucket: str, key: str) -> int | None:
    """The size of the object at `key`; None when there is none."""
    try:
        return int(client.head_object(Bucket=bucket, Key=key)["ContentLength"])
    except ClientError as exc:
        if gone(exc):
            return None
        raise


def gone(exc: Exception) -> bool:
    """True when S3 answered that the object is not there (404, NoSuchKey): asking again cannot find it."""
    if not isinstance(exc, ClientError):
        return False
    code, status = _code_status(exc)
    return status == 404 or code == "NoSuchKey"


def put_file(client: BaseClient, bucket: str, key: str, path: Path, stopping: threading.Event) -> None:
    """A file to `key` through boto3's managed transfer (streamed; multipart when large): a remote task's input.
    Raises Stopping (the transfer aborted, nothing at `key`) once `stopping` is set."""

    def check(_sent: int) -> None:
        if stopping.is_set():  # raised inside boto3's transfer, which aborts it and raises this again
            raise Stopping(f"stopping: the upload to {key} is left off")

    client.upload_file(str(path), bucket, key, Callback=check)
    metrics.BYTES_UPLOADED.inc(path.stat().st_size)


def download_file(client: BaseClient, bucket: str, key: str, dest: Path, stopping: threading.Event) -> str:
    """The object at `key` into `dest`, streamed; returns its ETag. Raises Stopping between chunks once
    `stopping` is set (`dest` is left partly written)."""
    resp = client.get_object(Bucket=bucket, Key=key)
    body = resp["Body"]
    try:
        with open(dest, "wb") as out:
            for chunk in body.iter_chunks(MiB):
                if stopping.is_set():
                    raise Stopping(f"stopping: the download of {key} is left off")
                out.write(chunk)
    finally:
        body.close()
    return str(resp["ETag"])


def list_folders(client: BaseClient, bucket: str, prefix: str) -> list[str]:
    """The "folders" right under `prefix` (common prefixes at the next `/`)."""
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix, Delimiter="/")
    return [p["Prefix"] for page in pages for p in page.get("CommonPrefixes", [])]


def delete_prefix(client: BaseClient, bucket: str, prefix: str) -> int:
    """Delete every object under `prefix`, one request each (DeleteObjects needs a checksum some S3-compatible
    servers refuse); returns how many."""
    keys = [o["Key"] for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
            for o in page.get("Contents", [])]
    for key in keys:
        delete_object(client, bucket, key)
    return len(keys)


def abort_stale_uploads(client: BaseClient, bucket: str, prefix: str, known: set[str], older_than_hours: float,
                        now: datetime | None = None) -> list[tuple[str, str]]:
    """Abort multipart uploads under `prefix` older than the limit that the store does not know.

    Parts of an abandoned upload are billed until aborted; uploads the store knows are resumable and kept.
    Returns (key, upload_id) of each upload aborted.
    """
    now = now or datetime.now(timezone.utc)
    aborted: list[tuple[str, str]] = []
    pages = client.get_paginator("list_multipart_uploads").paginate(Bucket=bucket, Prefix=prefix)
    for page in pages:
        for up in page.get("Uploads", []):
            age_hours = (now - up["Initiated"]).total_seconds() / 3600
            if up["UploadId"] in known or age_hours < older_than_hours:
                continue
            abort_upload(client, bucket, up["Key"], up["UploadId"])
            aborted.append((up["Key"], up["UploadId"]))
            log.info("aborted a stale multipart upload", key=up["Key"], age_hours=round(age_hours, 1))
    return aborted


def lifecycle_rule(settings: Lifecycle, prefix: str) -> dict[str, Any]:
    rule: dict[str, Any] = {"ID": LIFECYCLE_RULE_ID, "Status": "Enabled", "Filter": {"Prefix": prefix}}
    if settings.transition_ia_days is not None:
        rule["Transitions"] = [{"Days": settings.transition_ia_days, "StorageClass": "STANDARD_IA"}]
    if settings.expire_days is not None:
        rule["Expiration"] = {"Days": settings.expire_days}
    if settings.abort_incomplete_days is not None:
        rule["AbortIncompleteMultipartUpload"] = {"DaysAfterInitiation": settings.abort_incomplete_days}
    return rule


def _bucket_rules(client: BaseClient, bucket: str) -> list[dict[str, Any]]:
    try:
        return list(client.get_bucket_lifecycle_configuration(Bucket=bucket).get("Rules", []))
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") != "NoSuchLifecycleConfiguration":
            raise
        return []


def _rule_prefix(rule: dict[str, Any]) -> str:
    """The key prefix a rule covers ("" = the whole bucket), in any of the forms S3 answers with."""
    filt = rule.get("Filter") or {}
    return str(filt.get("Prefix", (filt.get("And") or {}).get("Prefix", rule.get("Prefix", ""))))


def apply_lifecycle(client: BaseClient, bucket: str, rule: dict[str, Any]) -> list[dict[str, Any]]:
    """Put our rule on the bucket, replacing only the rule with our ID: the owner's other rules stay."""
    existing = _bucket_rules(client, bucket)
    rules = [r for r in existing if r.get("ID") != rule["ID"]] + [rule]
    client.put_bucket_lifecycle_configuration(Bucket=bucket, LifecycleConfiguration={"Rules": rules})
    log.info("bucket lifecycle rule applied", bucket=bucket, rule=rule["ID"], prefix=_rule_prefix(rule),
             other_rules=len(rules) - 1)
    return rules


def ensure_lifecycle(client: BaseClient, s3: S3) -> dict[str, Any] | None:
    """Our rule over the prefix our keys start with; the rule put on the bucket, or None when refused.

    A rule with an empty prefix expires every object in the bucket, other people's too: it is put only when
    `s3.lifecycle.whole_bucket` says so. Otherwise start-up says why in one line, and a whole-bucket rule of
    ours an earlier version put there is taken off (the bucket's other rules stay)."""
    lc = s3.lifecycle
    prefix = lc.prefix or static_prefix(s3.key_prefix)
    if prefix or lc.whole_bucket:
        rule = lifecycle_rule(lc, prefix)
        apply_lifecycle(client, s3.bucket, rule)
        return rule
    log.warning("bucket lifecycle rule not applied: s3.key_prefix has no fixed start, so the rule would cover "
                "the whole bucket, other people's objects too", bucket=s3.bucket,
                hint="give s3.key_prefix a fixed start (e.g. heygem/{date}/{job}/{token}/{file}) or set "
                     "s3.lifecycle.prefix; set s3.lifecycle.whole_bucket: true only if the bucket holds nothing else")
    rules = _bucket_rules(client, s3.bucket)
    kept = [r for r in rules if r.get("ID") != LIFECYCLE_RULE_ID or _rule_prefix(r)]
    if len(kept) < len(rules):
        if kept:
            client.put_bucket_lifecycle_configuration(Bucket=s3.bucket, LifecycleConfiguration={"Rules": kept})
        else:
            client.delete_bucket_lifecycle(Bucket=s3.bucket)
        log.warning("removed the whole-bucket lifecycle rule an earlier version put on the bucket",
                    bucket=s3.bucket, rule=LIFECYCLE_RULE_ID, other_rules=len(kept))
    return None


def s3_checks(cfg: Config) -> list[Check]:
    """`heygem-daemon doctor` lines: credentials found and the bucket answers (HeadBucket; nothing written).

    The endpoint and region named are the ones boto3 really used: AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL and
    AWS_DEFAULT_REGION / ~/.aws apply when config.yaml leaves them out."""
    s3 = cfg.s3
    if not s3.enabled:
        return [Check("s3", True, "off (s3.bucket is empty): local-only delivery")]
    try:
        client = make_client(s3)
    except Exception as exc:  # e.g. an endpoint botocore cannot parse from the environment
        return [Check("s3", False, f"bucket {s3.bucket!r}: cannot set up the S3 client ({exc})",
                      "fix s3.endpoint_url / AWS_ENDPOINT_URL_S3")]
    region = client.meta.region_name
    where = (f"bucket {s3.bucket!r} at {client.meta.endpoint_url} "
             f"(region {region}{'' if s3.region else ', assumed: s3.region is not set'})")
    try:
        client.head_bucket(Bucket=s3.bucket)
    except Exception as exc:  # every failure becomes a line with its fix
        failure = describe(exc, s3.bucket)
        return [Check("s3", False, f"{where}: {failure.reason}", failure.hint)]
    return [Check("s3", True, f"{where} reachable with the configured credentials")]
