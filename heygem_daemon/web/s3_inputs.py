"""A job's inputs named as object keys under web.api_s3_input_prefix of the bucket: each fetched into an
upload of the caller (the uploads' own checks: type, size, free space) before the hand-over takes them."""

from __future__ import annotations

import threading
import unicodedata
from pathlib import PurePosixPath

from botocore.exceptions import BotoCoreError, ClientError

from heygem_daemon.config import Config
from heygem_daemon.delivery.s3 import describe, download_file, make_client, object_size
from heygem_daemon.web.uploads import Upload, UploadRefused, Uploads


def _checked(key: str) -> str:
    """A key relative to the prefix: no way above it (`..`, a leading `/`), no control characters."""
    parts = PurePosixPath(key).parts
    if not key or key.startswith("/") or ".." in parts or any(unicodedata.category(c) == "Cc" for c in key):
        raise UploadRefused(422, f"s3 key {key!r} is not a key under the input prefix",
                            "name objects relative to the input prefix, without .. or a leading /")
    return key


def fetch(cfg: Config, uploads: Uploads, user: str, keys: list[str]) -> list[Upload]:
    """Each object as a finished upload of `user`; UploadRefused (nothing kept) when one cannot be."""
    prefix = cfg.web.api_s3_input_prefix
    if not (cfg.s3.enabled and prefix):
        raise UploadRefused(422, "s3_keys are off here", "upload the files, or ask the operator to set "
                            "web.api_s3_input_prefix (and s3.bucket)")
    names = [_checked(k) for k in keys]
    made: list[Upload] = []
    try:
        client = make_client(cfg.s3)
        for key in names:
            size = object_size(client, cfg.s3.bucket, prefix + key)
            if size is None:
                raise UploadRefused(422, f"no object {key!r} under the input prefix", "check the key and that the "
                                    "upload to the bucket finished")
            made.append(uploads.create(user, size, PurePosixPath(key).name))
            download_file(client, cfg.s3.bucket, prefix + key, made[-1].data, threading.Event())
    except (ClientError, BotoCoreError) as exc:
        failure = describe(exc, cfg.s3.bucket)
        _drop(uploads, made)
        raise UploadRefused(502, failure.reason, failure.hint) from None
    except UploadRefused:
        _drop(uploads, made)
        raise
    return made


def _drop(uploads: Uploads, made: list[Upload]) -> None:
    for upload in made:
        uploads.remove(upload)
