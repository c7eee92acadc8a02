"""tus 1.0.0 resumable uploads (https://tus.io/protocols/resumable-upload): core, creation, termination
and expiration. No Python tus server fits here (the user binding, our limits and our folder), and the core
is small: POST makes an upload, HEAD says how far it got, PATCH appends at that offset, DELETE drops it.

The request body is written to disk as it arrives (memory stays flat for any size); a connection cut
mid-PATCH keeps every byte written, and HEAD then reports that offset for the client to resume from.
"""

from __future__ import annotations

import base64
import binascii
from email.utils import formatdate

from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from heygem_daemon.web.uploads import Upload, UploadRefused, Uploads
from heygem_daemon.web.values import BadValue, whole_number

VERSION = "1.0.0"
EXTENSIONS = "creation,termination,expiration"
OCTETS = "application/offset+octet-stream"
PREFIX = "/tus/"


def _headers(extra: dict[str, str] | None = None) -> dict[str, str]:
    return {"Tus-Resumable": VERSION, "Cache-Control": "no-store", **(extra or {})}


def _metadata(header: str) -> dict[str, str]:
    """`key base64,key base64`: the creation extension's Upload-Metadata."""
    out = {}
    for pair in filter(None, (p.strip() for p in header.split(","))):
        key, _, value = pair.partition(" ")
        try:
            out[key] = base64.b64decode(value, validate=True).decode("utf-8") if value else ""
        except (binascii.Error, UnicodeDecodeError):
            raise UploadRefused(400, f"Upload-Metadata {key!r} is not base64 of UTF-8 text",
                                "send metadata as the tus protocol says") from None
    return out


def _refused(exc: UploadRefused) -> Response:
    return JSONResponse({"reason": exc.reason, "hint": exc.hint}, exc.status, headers=_headers())


class TusServer:
    def __init__(self, uploads: Uploads) -> None:
        self.uploads = uploads
        self._busy: set[str] = set()

    def routes(self) -> list[Route]:
        return [Route(PREFIX, self.options, methods=["OPTIONS"]), Route(PREFIX, self.create, methods=["POST"]),
                Route(PREFIX + "{upload_id}", self.resource, methods=["HEAD", "PATCH", "DELETE", "OPTIONS"])]

    def _limits(self) -> dict[str, str]:
        return {"Tus-Version": VERSION, "Tus-Extension": EXTENSIONS,
                "Tus-Max-Size": str(int(self.uploads.cfg.web.max_upload_mb * 2**20))}

    def _expires(self, upload: Upload) -> str:
        return formatdate(self.uploads.expires_at(upload), usegmt=True)

    async def options(self, request: Request) -> Response:
        return Response(status_code=204, headers=_headers(self._limits()))

    async def create(self, request: Request) -> Response:
        if request.headers.get("Tus-Resumable") != VERSION:
            return Response(status_code=412, headers=_headers({"Tus-Version": VERSION}))
        try:
            length = whole_number("Upload-Length", request.headers.get("Upload-Length", ""))
        except BadValue as exc:
            reason = str(exc) if "Upload-Length" in request.headers else "Upload-Length is missing"
            return JSONResponse({"reason": reason, "hint": "send the file's size in bytes"}, 400, headers=_headers())
        try:
            meta = _metadata(request.headers.get("Upload-Metadata", ""))
            upload = self.uploads.create(request.state.user, length, meta.get("filename", ""))
        except UploadRefused as exc:
            return _refused(exc)
        return Response(status_code=201, headers=_headers({
            "Location": PREFIX + upload.id,
            "Upload-Expires": self._expires(upload), "Upload-Offset": "0"}))

    async def resource(self, request: Request) -> Response:
        if request.method == "OPTIONS":
            return await self.options(request)
        if request.headers.get("Tus-Resumable") != VERSION:
            return Response(status_code=412, headers=_headers({"Tus-Version": VERSION}))
        # Someone else's upload, an expired one and a made-up id all look the same: not found.
        upload = self.uploads.get(request.path_params["upload_id"], request.state.user)
        if upload is None:
            return Response(status_code=404, headers=_headers())
        if request.method == "HEAD":
            return Response(status_code=200, headers=_headers({
                "Upload-Offset": str(upload.offset), "Upload-Length": str(upload.length),
                "Upload-Expires": self._expires(upload)}))
        if request.method == "DELETE":
            if upload.id in self._busy:
                return Response(status_code=423, headers=_headers())
            self.uploads.remove(upload)
            return Response(status_code=204, headers=_headers())
        return await self._patch(request, upload)

    async def _patch(self, request: Request, upload: Upload) -> Response:
        if request.headers.get("Content-Type") != OCTETS:
            return Response(status_code=415, headers=_headers())
        if request.headers.get("Upload-Offset") != str(upload.offset):
            return Response(status_code=409, headers=_headers({"Upload-Offset": str(upload.offset)}))
        if upload.id in self._busy:  # the request a dropped connection left behind is still draining
            return Response(status_code=423, headers=_headers())
        self._busy.add(upload.id)
        try:
            over = await self._append(request, upload)
        finally:
            self._busy.discard(upload.id)
        if over:
            return JSONResponse({"reason": "more bytes than Upload-Length", "hint": "upload the file again"}, 413,
                                headers=_headers({"Upload-Offset": str(upload.offset)}))
        return Response(status_code=204, headers=_headers({
            "Upload-Offset": str(upload.offset), "Upload-Expires": self._expires(upload)}))

    async def _append(self, request: Request, upload: Upload) -> bool:
        """Write the body at the end of the data; True when it ran past the declared length (cut there)."""
        room = upload.length - upload.offset
        with open(upload.data, "ab", buffering=0) as out:
            try:
                async for chunk in request.stream():
                    if len(chunk) > room:
                        out.write(chunk[:room])
                        return True
                    out.write(chunk)
                    room -= len(chunk)
            except ClientDisconnect:
                pass  # what arrived stays; the client asks HEAD for the offset and goes on from there
        return False
