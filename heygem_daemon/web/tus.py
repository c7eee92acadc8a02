"""tus 1.0.0 resumable uploads (https://tus.io/protocols/resumable-upload): core, creation, termination
and expiration. No Python tus server fits here (the user binding, our limits and our folder), and the core
is small: POST makes an upload, HEAD says how far it got, PATCH appends at that offset, DELETE drops it.

The request body is written to disk as it arrives (memory stays flat for any size); a connection cut
mid-PATCH keeps every byte written, and HEAD then reports that offset for the client to resume from.

A client can vanish without closing its socket (a laptop lid, a lost Wi-Fi): its PATCH would wait for bytes
forever and hold the upload. So a body that sends nothing for web.upload_idle_seconds is ended, and a new
PATCH or DELETE from the owner stops the one still running first (between two writes, so every byte it took
is on disk and the offset is the file's size), then goes on from there.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import enum
from email.utils import formatdate

from starlette.requests import Request
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


class Body(enum.Enum):
    """How a PATCH body ended."""
    WHOLE = "whole"
    CUT = "cut"        # the client closed the connection
    IDLE = "idle"      # nothing arrived for web.upload_idle_seconds
    OVER = "over"      # more bytes than Upload-Length (cut there)


def _refused(exc: UploadRefused) -> Response:
    return JSONResponse({"reason": exc.reason, "hint": exc.hint}, exc.status, headers=_headers())


class TusServer:
    def __init__(self, uploads: Uploads) -> None:
        self.uploads = uploads
        self._busy: dict[str, asyncio.Task[Body]] = {}  # upload id -> the PATCH writing it now

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
            await self._stop_writer(upload.id)
            self.uploads.remove(upload)
            return Response(status_code=204, headers=_headers())
        return await self._patch(request, upload)

    async def _stop_writer(self, upload_id: str) -> None:
        """End the PATCH still writing this upload, if any; the bytes it wrote stay."""
        while (writer := self._busy.get(upload_id)) is not None and not writer.done():
            writer.cancel()
            await asyncio.wait({writer})  # a third request may have taken over meanwhile: look again

    async def _patch(self, request: Request, upload: Upload) -> Response:
        if request.headers.get("Content-Type") != OCTETS:
            return Response(status_code=415, headers=_headers())
        await self._stop_writer(upload.id)  # its client is gone, or gave up on it and came back: this one wins
        if not upload.data.exists():  # deleted, or handed over as a job, meanwhile
            return Response(status_code=404, headers=_headers())
        if request.headers.get("Upload-Offset") != str(upload.offset):
            return Response(status_code=409, headers=_headers({"Upload-Offset": str(upload.offset)}))
        try:
            self.uploads.check_patch_room(upload)
        except UploadRefused as exc:
            return _refused(exc)
        # No await between the check above and this line: no other PATCH can slip in as a second writer.
        writer = self._busy[upload.id] = asyncio.ensure_future(self._append(request, upload))
        try:
            await asyncio.wait({writer})
        except asyncio.CancelledError:
            writer.cancel()
            raise
        finally:
            if self._busy.get(upload.id) is writer:
                del self._busy[upload.id]
        # A body not read to its end leaves the connection unusable for another request: close it.
        offset = {"Upload-Offset": str(upload.offset), "Connection": "close"}
        if writer.cancelled():
            return JSONResponse({"reason": "another request took this upload over",
                                 "hint": "ask HEAD for the offset and go on from there"}, 409, headers=_headers(offset))
        if isinstance(failed := writer.exception(), OSError):  # the disk filled or failed under the reservation
            return JSONResponse({"reason": f"the upload could not be written: {failed.strerror or failed}",
                                 "hint": "try again later; if it keeps failing, tell the operator"}, 507,
                                headers=_headers(offset))
        if writer.result() is Body.OVER:
            return JSONResponse({"reason": "more bytes than Upload-Length", "hint": "upload the file again"}, 413,
                                headers=_headers(offset))
        if writer.result() is Body.IDLE:
            return JSONResponse({"reason": f"no bytes for {self.uploads.cfg.web.upload_idle_seconds:g} s",
                                 "hint": "ask HEAD for the offset and go on from there"}, 408,
                                headers=_headers(offset))
        return Response(status_code=204, headers=_headers({"Upload-Offset": offset["Upload-Offset"],
                                                           "Upload-Expires": self._expires(upload)}))

    async def _append(self, request: Request, upload: Upload) -> Body:
        """Write the body at the end of the data as it arrives; how it ended. Cancelled only while waiting for
        bytes, never inside a write: by a PATCH taking over, or by the idle watch below."""
        loop = asyncio.get_running_loop()
        writer = asyncio.current_task()
        idle = self.uploads.cfg.web.upload_idle_seconds
        last = loop.time()
        stalled = False
        timer: asyncio.TimerHandle

        # One timer per PATCH that looks at when the last bytes came (wait_for on every chunk would cost
        # ~25 µs each: a quarter of a core at 1 GB/s).
        def watch() -> None:
            nonlocal timer, stalled
            quiet = loop.time() - last
            if quiet < idle:
                timer = loop.call_later(idle - quiet, watch)
            elif writer is not None:
                stalled = True
                writer.cancel()
        timer = loop.call_later(idle, watch)
        room = upload.length - upload.offset
        try:
            with open(upload.data, "ab", buffering=0) as out:
                while True:
                    message = await request.receive()
                    last = loop.time()
                    if message["type"] == "http.disconnect":
                        return Body.CUT  # what arrived stays; the client asks HEAD for the offset
                    chunk = message.get("body", b"")
                    if len(chunk) > room:
                        out.write(chunk[:room])
                        return Body.OVER
                    out.write(chunk)
                    room -= len(chunk)
                    if not message.get("more_body", False):
                        return Body.WHOLE
        except asyncio.CancelledError:
            if stalled:
                return Body.IDLE
            raise
        finally:
            timer.cancel()
