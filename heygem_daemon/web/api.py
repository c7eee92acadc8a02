"""The HTTP API (/api/v1): FastAPI routes mounted in the console's Starlette app, so its OpenAPI document
comes from the models below. It writes only what the console writes (a hand-over into the inbox, cancel and
retry requests) and reads through the read model (views.py). Bearer tokens only (web/tokens.py); every error
is {reason, hint}, as the console and intake say it."""

# No `from __future__ import annotations`: FastAPI reads the routes' annotations, some of them local aliases.

import base64
import binascii
import hashlib
import json
import shutil
from typing import Annotated, Any, Callable, Literal

from fastapi import Depends, FastAPI, File, Form, Header, Query, Request, Security, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, Field, ValidationError
from starlette.exceptions import HTTPException

from heygem_daemon.generation.lifecycle import JobState
from heygem_daemon.state import ApiToken, Job
from heygem_daemon.views import condition, job_resource, links_doc
from heygem_daemon.web.handover import JobForm
from heygem_daemon.web.tokens import Refused
from heygem_daemon.web.uploads import UploadRefused

TITLE = "heygem-daemon API"
PAGE_LIMIT = 200
RECEIVED = "received"
"""A job handed over into the inbox that the daemon has not taken yet."""
States = Literal[tuple(s.value for s in JobState)]  # type: ignore[valid-type]
ApiStates = Literal[(RECEIVED, *(s.value for s in JobState))]  # type: ignore[valid-type]
KEY_CHARS = 255
DOCS_HINT = "see /api/v1/docs"


class Problem(BaseModel):
    reason: str
    hint: str


class Pair(BaseModel):
    audio: str = Field(description="file name of an audio in this job")
    portrait: str = Field(description="file name of a portrait (image or video) in this job")
    name: str | None = Field(None, description="the video's name (default: portrait-audio)")


class JobOptions(BaseModel):
    """job.yaml's keys; intake checks them as it checks a job.yaml."""

    name: str | None = Field(None, max_length=200, description="the job's name (default: the first file's)")
    engine: str | None = Field(None, max_length=100, description="default: engine.name of the config")
    preset: str | None = Field(None, max_length=100, description="default: engine.preset of the config")
    priority: Literal["high", "normal", "low"] = "normal"
    upload: bool = Field(True, description="false: the videos stay in outputs/, even with S3 configured")
    pairs: list[Pair] | None = Field(None, max_length=1000, description="which audio goes with which portrait "
                                     "(default: intake's rule, one audio with N portraits or N audios with one)")
    notify: list[str] | Literal[False] | None = Field(None, description="apprise URLs for this job's messages; "
                                                      "false: none; default: notify.urls")
    face_box: tuple[int, int, int, int] | None = Field(None, description="[top, bottom, left, right] in pixels")


class JobCreate(JobOptions):
    uploads: list[str] = Field([], max_length=1000, description="ids of finished tus uploads (the last part of "
                               "the Location /tus/ answered)")
    s3_keys: list[str] = Field([], max_length=1000, description="object keys under web.api_s3_input_prefix of "
                               "the bucket, relative to it (when the operator set one)")


class Video(BaseModel):
    name: str
    state: str
    progress: float
    attempts: int
    error: str | None
    file: str


class Link(BaseModel):
    file: str
    size: int
    sha256: str | None = None
    link: str | None = Field(None, description="presigned link; none when the videos stay local")
    expires_at: str | None = Field(None, description="when the link stops working (UTC, ISO 8601)")


class JobProblem(BaseModel):
    kind: str | None = Field(None, description="bad_input, engine, service, ... (failures.py)")
    reason: str | None
    hint: str | None


class JobOut(BaseModel):
    ref: str = Field(description="the job's name: /api/v1/jobs/{ref}")
    id: str | None = Field(description="the daemon's id; none while the job waits in the inbox")
    state: ApiStates  # type: ignore[valid-type]
    progress: float = Field(description="0 to 1 over its videos")
    priority: str | None = None
    engine: str | None = None
    preset: str | None = None
    owner: str | None = Field(None, description="who handed it over from the web or the API")
    created: float | None = Field(None, description="Unix time the daemon took it")
    videos: list[Video] = []
    links: list[Link] = []
    zip: Link | None = None
    problem: JobProblem | None = None
    duplicate_of: str | None = Field(None, description="the earlier job with the same inputs and options whose "
                                     "videos this one delivers (no videos of its own)")


class Links(BaseModel):
    """links.json as delivery wrote it."""

    job: str
    written_at: str
    files: list[Link]
    zip: Link | None = None


class JobPage(BaseModel):
    jobs: list[JobOut]
    next_cursor: str | None = Field(description="pass as cursor for the next page; none on the last")


class Answer(BaseModel):
    message: str
    job: JobOut


class Health(BaseModel):
    daemon: dict[str, Any] | None = Field(description="the daemon's state file (none before its first start)")
    jobs: dict[str, int]
    tasks: dict[str, int]
    waiting_for: Any = None


def _problems(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {s: {"model": Problem} for s in (401, 403, 429, *statuses)}


def _cursor(created_at: float, rowid: int) -> str:
    return base64.urlsafe_b64encode(f"{created_at!r}:{rowid}".encode()).decode().rstrip("=")


def _parse_cursor(text: str) -> tuple[float, int]:
    try:
        created, _, rowid = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)).decode().partition(":")
        return float(created), int(rowid)
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise Refused(422, "cursor is not one this API gave", "pass next_cursor from the previous page") from None


def _digest(*parts: str | bytes) -> str:
    h = hashlib.sha256()
    for part in parts:
        data = part.encode() if isinstance(part, str) else part
        h.update(len(data).to_bytes(8, "big") + data)
    return h.hexdigest()


def create_api(console: Any) -> FastAPI:
    """The API over the console's store, uploads, audit log and hand-over (a web.app.Console)."""
    cfg, store = console.cfg, console.store
    bearer = HTTPBearer(auto_error=False, description="a token from `heygem-daemon web token create`")
    api = FastAPI(title=TITLE, version="1", openapi_url="/openapi.json", docs_url=None, redoc_url=None,
                  description="Send work from your own systems. Errors are {reason, hint}. README \"API\".")

    @api.exception_handler(Refused)
    async def _api_error(request: Request, exc: Refused) -> JSONResponse:
        return JSONResponse({"reason": exc.reason, "hint": exc.hint}, exc.status, headers=exc.headers)

    @api.exception_handler(UploadRefused)
    async def _refused(request: Request, exc: UploadRefused) -> JSONResponse:
        return JSONResponse({"reason": exc.reason, "hint": exc.hint}, exc.status)

    @api.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        return JSONResponse({"reason": f"{where}: {err['msg']}", "hint": DOCS_HINT}, 422)

    @api.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException) -> JSONResponse:
        return JSONResponse({"reason": str(exc.detail), "hint": DOCS_HINT}, exc.status_code, headers=exc.headers)

    def caller(scope: str) -> Callable[..., ApiToken]:
        def check(credentials: Annotated[HTTPAuthorizationCredentials | None, Security(bearer)]) -> ApiToken:
            return console.tokens.check(credentials.credentials if credentials else None, scope)
        return check

    Reader = Annotated[ApiToken, Depends(caller("jobs:read"))]
    Writer = Annotated[ApiToken, Depends(caller("jobs:write"))]
    IdempotencyKey = Annotated[str | None, Header(alias="Idempotency-Key", max_length=KEY_CHARS, description=(
        "the same key and body within 24 h return the first job; the same key with another body is 409"))]

    def job_out(job: Job) -> JobOut:
        return JobOut.model_validate(job_resource(cfg, store, job))

    def find(ref: str) -> JobOut:
        job = store.jobs.find(ref)
        if job is not None:
            return job_out(job)
        if "/" not in ref and not ref.startswith(".") and (cfg.folder("inbox") / ref).is_dir():
            return JobOut(ref=ref, id=None, state=RECEIVED, progress=0.0)
        raise Refused(404, f"no job called {ref!r}", "list jobs with GET /api/v1/jobs")

    def create(token: ApiToken, key: str | None, body: str, make: Callable[[], str]) -> JSONResponse:
        """The job `make` hands over, once per Idempotency-Key and body."""
        if key is None:
            return JSONResponse(find(make()).model_dump(mode="json"), 201)
        if not key or not key.isascii() or not key.isprintable():
            raise Refused(422, "Idempotency-Key must be printable ASCII", "use a UUID per logical request")
        earlier = store.api.claim_key(token.name, key, body)
        if earlier is not None:
            if earlier.body_sha256 != body:
                raise Refused(409, "this Idempotency-Key came with another body", "use a new key per new job")
            if earlier.job_name is None:
                raise Refused(409, "the first request with this Idempotency-Key is still being answered",
                               "retry in a few seconds", {"Retry-After": "5"})
            console.audit.action("api upload replayed", user=token.user, job=earlier.job_name, token=token.name)
            return JSONResponse(find(earlier.job_name).model_dump(mode="json"), 201,
                                headers={"Idempotent-Replayed": "true"})
        made = None
        try:
            made = make()
        finally:
            store.api.settle_key(token.name, key, made)
        return JSONResponse(find(made).model_dump(mode="json"), 201)

    def hand_over(token: ApiToken, ids: list[str], options: JobOptions) -> str:
        extra = options.model_dump(include={"pairs", "notify", "face_box"}, exclude_none=True)
        form = JobForm(ids=ids, name=(options.name or "").strip(), engine=options.engine or cfg.engine.name,
                       preset=options.preset or cfg.engine.preset, priority=options.priority, upload=options.upload,
                       extra=extra)
        return str(console.hand_over(token.user, form, "api", token=token.name))

    created: dict[int | str, dict[str, Any]] = {
        201: {"model": JobOut, "description": "the job (201 also for a replayed Idempotency-Key)"}}

    @api.post("/jobs", status_code=201, response_model=JobOut, tags=["jobs"],
              summary="Create a job from tus uploads or objects in the bucket",
              responses={**created, **_problems(400, 409, 413, 415, 422, 502, 507)})
    def create_job(body: JobCreate, token: Writer, key: IdempotencyKey = None) -> JSONResponse:
        """Uploads made through /tus/ (with the same token) and objects under the input prefix become one job,
        checked as intake checks a drop."""
        def make() -> str:
            from heygem_daemon.web import s3_inputs  # boto3 loads when a job names objects, not at start

            fetched = s3_inputs.fetch(cfg, console.uploads, token.user, body.s3_keys) if body.s3_keys else []
            try:
                return hand_over(token, body.uploads + [u.id for u in fetched], body)
            except UploadRefused:
                for upload in fetched:  # refused: the copies go; tus uploads stay for another try
                    console.uploads.remove(upload)
                raise
        return create(token, key, _digest(body.model_dump_json()), make)

    @api.post("/jobs/multipart", status_code=201, response_model=JobOut, tags=["jobs"],
              summary="Create a job from files in this request",
              responses={**created, **_problems(400, 409, 411, 413, 415, 422, 507)})
    def create_job_multipart(token: Writer, files: Annotated[list[UploadFile], File(description="the job's files")],
                             options: Annotated[str, Form(description="JobOptions as JSON")] = "{}",
                             key: IdempotencyKey = None) -> JSONResponse:
        """Small jobs in one request (at most web.api_multipart_mb); larger files go through tus first."""
        try:
            parsed = JobOptions.model_validate_json(options)
        except ValidationError as exc:
            err = exc.errors()[0]
            raise Refused(422, f"options.{'.'.join(str(p) for p in err['loc'])}: {err['msg']}", DOCS_HINT) from None
        digests = [_digest(f.filename or "", _sha256(f)) for f in files]

        def make() -> str:
            ids = _store_files(console.uploads, token.user, files)
            try:
                return hand_over(token, ids, parsed)
            except UploadRefused:
                for upload_id in ids:  # refused: nothing of it stays
                    console.uploads.remove_id(upload_id, token.user)
                raise
        return create(token, key, _digest(parsed.model_dump_json(), *digests), make)

    @api.get("/jobs", response_model=JobPage, tags=["jobs"], summary="List jobs, newest first",
             responses=_problems(422))
    def list_jobs(token: Reader, state: Annotated[States | None, Query()] = None,  # type: ignore[valid-type]
                  limit: Annotated[int, Query(ge=1, le=PAGE_LIMIT)] = 50,
                  cursor: Annotated[str | None, Query(max_length=100)] = None) -> JobPage:
        found = store.jobs.after(state, _parse_cursor(cursor) if cursor else None, limit + 1)
        more = len(found) > limit
        page = found[:limit]
        return JobPage(jobs=[job_out(j) for j, _ in page], next_cursor=_cursor(*page[-1][1]) if more else None)

    @api.get("/jobs/{ref}", response_model=JobOut, tags=["jobs"], summary="One job", responses=_problems(404))
    def get_job(ref: str, token: Reader) -> JobOut:
        return find(ref)

    @api.get("/jobs/{ref}/links", response_model=Links, tags=["jobs"], summary="The job's links.json",
             responses=_problems(404))
    def get_links(ref: str, token: Reader) -> Links:
        job = store.jobs.find(ref)
        doc = links_doc(cfg, job.name) if job else None
        if doc is None:
            raise Refused(404, f"no links for {ref!r} (yet)", "links.json is written when the job's videos are "
                          "delivered; GET /api/v1/jobs/{ref} shows its state")
        return Links.model_validate(doc)

    def ask(ref: str, action: str, token: ApiToken) -> Answer:
        if store.jobs.find(ref) is None:
            raise Refused(404, f"no job called {ref!r}", "list jobs with GET /api/v1/jobs")
        done, said = console.ask(ref, action, token.user, "api", token=token.name)
        if done is None:
            raise Refused(403, said, "ask an admin")
        if not done:
            raise Refused(409, said, f"GET /api/v1/jobs/{ref} shows its state")
        return Answer(message=said, job=find(ref))

    @api.post("/jobs/{ref}/cancel", response_model=Answer, tags=["jobs"], summary="Stop a queued or running job",
              responses=_problems(404, 409))
    def cancel_job(ref: str, token: Writer) -> Answer:
        return ask(ref, "cancel", token)

    @api.post("/jobs/{ref}/retry", response_model=Answer, tags=["jobs"], summary="Run a failed job again",
              responses=_problems(404, 409))
    def retry_job(ref: str, token: Writer) -> Answer:
        return ask(ref, "retry", token)

    @api.get("/health", response_model=Health, tags=["health"], summary="The daemon's condition",
             responses=_problems())
    def health(token: Reader) -> Health:
        state = condition(cfg, store)
        return Health(daemon=state["daemon"], jobs=store.jobs.counts(), tasks=state["tasks"],
                      waiting_for=state["waiting_for"])

    @api.get("/docs", include_in_schema=False)
    def docs() -> HTMLResponse:
        # Rendered here from the OpenAPI document: no script or CDN asset, so it works on a closed network.
        return HTMLResponse(console.templates.get_template("api_docs.html").render(
            spec=api.openapi(), schemas=lambda s: json.dumps(s, indent=2)))

    return api


def _sha256(upload: UploadFile) -> str:
    h = hashlib.sha256()
    for chunk in iter(lambda: upload.file.read(2**20), b""):
        h.update(chunk)
    upload.file.seek(0)
    return h.hexdigest()


def _store_files(uploads: Any, user: str, files: list[UploadFile]) -> list[str]:
    """Each file as a finished upload of `user` (the tus uploads' checks: type, size, free space)."""
    made = []
    try:
        for f in files:
            length = f.size if f.size is not None else f.file.seek(0, 2)
            f.file.seek(0)
            upload = uploads.create(user, length, f.filename or "")
            made.append(upload)
            with open(upload.data, "wb") as out:
                shutil.copyfileobj(f.file, out)
    except UploadRefused:
        for upload in made:
            uploads.remove(upload)
        raise
    return [u.id for u in made]


