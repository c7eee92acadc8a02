"""The web console's pages and endpoints (Starlette). Reads go through the read model (views.py) and the
store; the only writes are a finished upload handed to the inbox and cancel/retry requests."""

from __future__ import annotations

import asyncio
import math
import threading
import time
from pathlib import Path
from typing import Any, AsyncIterator, Callable
from urllib.parse import urlencode, urlsplit

from jinja2 import Environment, PackageLoader, select_autoescape
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from heygem_daemon.config import Config
from heygem_daemon.delivery.audit import AuditLog
from heygem_daemon.delivery.links import LINKS_JSON
from heygem_daemon.generation.lifecycle import JobError, JobState, request_cancel, request_retry
from heygem_daemon.ops.daemon_state import STALE_SECONDS
from heygem_daemon.state import Store, db_path
from heygem_daemon.views import condition, job_view, jobs_page, links_doc, local_time
from heygem_daemon.log import get_logger
from heygem_daemon.web.auth import MAX_PASSWORD_CHARS, MAX_USER_CHARS, check_password, csrf_token
from heygem_daemon.web.api import create_api
from heygem_daemon.web.guard import Door, Gate, SecurityHeaders, SessionCookies, content_security_policy
from heygem_daemon.web.sessions import SESSION_SECONDS, Sessions
from heygem_daemon.web.throttle import LoginThrottle
from heygem_daemon.web.values import BadValue, whole_number
from heygem_daemon.engines.registry import engine_names
from heygem_daemon.web.handover import JobForm, hand_over
from heygem_daemon.web.health import LiveChecks
from heygem_daemon.web.tokens import Tokens
from heygem_daemon.web.tus import TusServer
from heygem_daemon.web.uploads import UploadRefused, Uploads

STATIC = Path(__file__).parent / "static"
FAVICON = STATIC / "favicon.ico"
MAX_PAGE = 10**9
MAX_QUERY_CHARS = 200
log = get_logger("heygem.web")
LIVE_SECONDS = 1.0
KEEPALIVE_SECONDS = 15.0
STATES = tuple(s.value for s in JobState)
ACTIONS = {"cancel": request_cancel, "retry": request_retry}


def _media_origin(cfg: Config) -> str | None:
    """Where presigned links point, for the CSP's media-src (players load videos from the bucket)."""
    if not cfg.s3.enabled:
        return None
    if cfg.s3.endpoint_url:
        parts = urlsplit(cfg.s3.endpoint_url)
        # Path-style links stay on the endpoint's host; virtual-hosted ones put the bucket in front of it.
        return f"{parts.scheme}://{parts.netloc} {parts.scheme}://*.{parts.netloc}"
    return "https://*.amazonaws.com"


class Console:
    def __init__(self, cfg: Config, config_path: Path | None) -> None:
        self.cfg = cfg
        self.config_path = config_path
        self.store = Store(db_path(cfg.folder("state")))
        self.uploads = Uploads(cfg)
        self.audit = AuditLog(cfg.folder("logs"))
        self.sessions = Sessions(cfg.web, self.store)
        self.tokens = Tokens(self.store, lambda user: cfg.web.auth == "proxy" or user in cfg.web.users,
                             cfg.web.api_requests_per_minute)
        self.sessions.tidy()
        self._alerted: dict[str, int] = {}
        self.logins = LoginThrottle(cfg.web, self._alert)
        self.checks = LiveChecks(config_path)
        self.templates = Environment(loader=PackageLoader("heygem_daemon.web", "templates"),
                                     autoescape=select_autoescape(default=True))
        self.templates.filters["when"] = local_time
        self.live_streams = 0  # server-sent event streams open now

    def render(self, request: Request | None, template: str, status: int = 200,
               headers: dict[str, str] | None = None, **context: Any) -> HTMLResponse:
        return HTMLResponse(self.fragment(request, template, **context), status, headers)

    def fragment(self, request: Request | None, template: str, **context: Any) -> str:
        if request is not None:
            context |= {"user": request.state.user, "csrf": csrf_token(request.session),
                        "auth": self.cfg.web.auth, "path": request.url.path}
        return self.templates.get_template(template).render(**context)

    def _alert(self, key: str, text: str) -> None:
        """The daemon's alert path: a line in the store's outbox, which the daemon's notifier sends to the
        operator's chat (one per key per notify.alert_repeat_hours). Recorded on a thread of its own: the
        login answering it never waits for apprise's import or the store."""
        log.error("operator alert", alert=key, message=text)
        window = int(time.time() // (self.cfg.notify.alert_repeat_hours * 3600))
        if self._alerted.get(key) != window:  # keys: one for addresses, one per configured user
            self._alerted[key] = window
            threading.Thread(target=self._enqueue_alert, args=(key, text), name="web-alert", daemon=True).start()

    def _enqueue_alert(self, key: str, text: str) -> None:
        from heygem_daemon.notify.outbox import Outbox  # apprise loads only when there is something to say

        try:
            Outbox(self.cfg, self.store).enqueue_alert(key, text)
        except Exception:  # a broken notify section is the daemon's to report; the console goes on
            log.exception("could not record an operator alert", alert=key)

    # --- login ---------------------------------------------------------------------------------------

    async def login_page(self, request: Request) -> Response:
        if self.cfg.web.auth == "proxy":
            if request.state.user:
                return RedirectResponse("/jobs", 303)
            return self.render(request, "login.html", 401, header=self.cfg.web.proxy_header,
                               error=f"The reverse proxy named no user (header {self.cfg.web.proxy_header}).")
        return self.render(request, "login.html", error=None)

    async def login(self, request: Request) -> Response:
        form = await request.form()
        user, password = str(form.get("user", "")), str(form.get("password", ""))
        address = request.client.host if request.client else "-"
        # A name longer than any configured one is never kept (the throttle counts it by address only).
        name = user if len(user) <= MAX_USER_CHARS else None
        wait = self.logins.wait(name, address)
        if wait > 0:
            seconds = str(math.ceil(wait))
            return self.render(request, "login.html", 429, error=f"Too many failed logins; try again in {seconds} s.",
                               headers={"Retry-After": seconds})
        if name is None or len(password) > MAX_PASSWORD_CHARS or not await run_in_threadpool(
                check_password, self.cfg.web.password_hashes(), user, password):
            self.logins.failed(name, address)
            return self.render(request, "login.html", 401, error="Wrong user name or password.")
        self.logins.succeeded(user, address)
        await run_in_threadpool(self.sessions.open, request.session, user, address)
        return RedirectResponse("/jobs", 303)

    async def logout(self, request: Request) -> Response:
        await run_in_threadpool(self.sessions.end, request.session)
        return RedirectResponse("/login", 303)

    def _signed_in(self, request: Request) -> bool:
        """Whether the request's session still holds (a live stream ends with its session)."""
        return self.cfg.web.auth == "proxy" or self.sessions.user(request.session) is not None

    # --- jobs ----------------------------------------------------------------------------------------

    def _jobs_context(self, request: Request) -> dict[str, Any]:
        """Raises BadValue for a query value no page link makes."""
        state = request.query_params.get("state", "")
        query = request.query_params.get("q", "").strip()
        page = whole_number("page", request.query_params.get("page", "1"), 1, MAX_PAGE)
        if state and state not in STATES:
            raise BadValue("state", state, f"one of {', '.join(STATES)}")
        if len(query) > MAX_QUERY_CHARS:
            raise BadValue("q", query, f"at most {MAX_QUERY_CHARS} characters")
        data = jobs_page(self.cfg, self.store, (state,) if state else None, query, page, self.cfg.web.page_size)
        params = {k: v for k, v in (("state", state), ("q", query)) if v}
        return {**data, "state": state, "q": query, "states": STATES,
                "query": lambda p: "?" + urlencode({**params, "page": p})}

    async def jobs(self, request: Request) -> Response:
        try:
            context = await run_in_threadpool(self._jobs_context, request)
        except BadValue as exc:
            return _bad_value(exc)
        return self.render(request, "jobs.html", **context, live="/jobs/live?" + request.url.query)

    async def jobs_live(self, request: Request) -> Response:
        try:
            await run_in_threadpool(self._jobs_context, request)
        except BadValue as exc:
            return _bad_value(exc)
        return self._live(request, lambda: self.fragment(None, "jobs_table.html", **self._jobs_context(request)))

    def _job_context(self, ref: str) -> dict[str, Any] | None:
        job = self.store.jobs.find(ref)
        if job is None:
            return None
        view = _with_job_outputs(self.cfg, job_view(self.cfg, self.store, job))
        return {"job": view, "links": _links(self.cfg, view["name"]), "folder_ref": ref}

    async def job(self, request: Request, status: int = 200, message: str | None = None) -> Response:
        ref = request.path_params["ref"]
        context = await run_in_threadpool(self._job_context, ref)
        if context is None:
            waiting = (self.cfg.folder("inbox") / ref).is_dir()
            return self.render(request, "job_missing.html", 200 if waiting else 404, ref=ref, waiting=waiting,
                               live=f"/jobs/{ref}/live")
        return self.render(request, "job.html", status, **context,
                           message=message or request.session.pop("message", None), live=f"/jobs/{ref}/live")

    async def job_live(self, request: Request) -> Response:
        ref = request.path_params["ref"]
        # The page's token, for the Retry and Cancel forms in each fragment (the page made it).
        csrf = str(request.session.get("csrf", ""))

        def render() -> str:
            context = self._job_context(ref)
            return self.fragment(None, "job_body.html", **context, csrf=csrf) if context else ""
        return self._live(request, render)

    async def job_file(self, request: Request) -> Response:
        """A video or links.json from outputs/<job>/, with HTTP Range (players seek)."""
        job = await run_in_threadpool(self.store.jobs.find, request.path_params["ref"])
        name = request.path_params["name"]
        if job is None or "/" in name or name.startswith("."):
            return Response(status_code=404)
        folder = self.cfg.folder("outputs") / job.name
        path = folder / name
        if path.is_symlink() or not path.is_file() or path.parent != folder:
            return Response(status_code=404)
        download = name == LINKS_JSON
        return FileResponse(path, filename=name if download else None,
                            content_disposition_type="attachment" if download else "inline")

    async def job_request(self, request: Request) -> Response:
        """Cancel or retry: a request written to the store, as the CLI writes it; the daemon carries it out."""
        ref, action = request.path_params["ref"], request.path_params["action"]
        if action not in ACTIONS:
            return Response(status_code=404)
        done, said = await run_in_threadpool(self.ask, ref, action, request.state.user, "web")
        if done is None:
            return await self.job(request, 403, said)
        request.session["message"] = said if done else f"Not done: {said}"
        return RedirectResponse(f"/jobs/{ref}", 303)

    def ask(self, ref: str, action: str, user: str, via: str, **audit: str) -> tuple[bool | None, str]:
        """Cancel or retry for `user` (an admin, or whoever handed the job over): (True, what happens),
        (False, why not), or (None, who may) when she may not. Audited as `<via> <action>`."""
        admin = self.cfg.web.is_admin(user)
        owner = self._owner(ref)
        if not admin and owner != user:
            self.audit.action(f"{via} {action} refused", user=user, job=ref, owner=owner, **audit)
            return None, (f"Not done: only {owner + ' (who uploaded it) or ' if owner else ''}"
                          f"an admin may {action} this job.")
        try:
            said = ACTIONS[action](self.store, ref)
        except JobError as exc:
            return False, str(exc)
        self.audit.action(f"{via} {action}", user=user, job=ref, owner=owner, admin=admin, **audit)
        return True, said

    def _owner(self, ref: str) -> str | None:
        """Who handed the job over from the web (None: it came another way, or no such job)."""
        job = self.store.jobs.find(ref)
        return self.store.web.owner(job.name, job.created_at) if job else None

    # --- upload --------------------------------------------------------------------------------------

    async def upload_page(self, request: Request) -> Response:
        web = self.cfg.web
        return self.render(request, "upload.html", engines=engine_names(self.cfg), engine=self.cfg.engine.name,
                           presets=sorted(self.cfg.presets), preset=self.cfg.engine.preset,
                           s3=self.cfg.s3.enabled, max_mb=web.max_upload_mb, max_files=web.max_files)

    async def submit(self, request: Request) -> Response:
        try:
            body = await request.json()
            form = JobForm(ids=[str(i) for i in body["ids"]], name=str(body.get("name", "")).strip(),
                           engine=str(body.get("engine", self.cfg.engine.name)),
                           preset=str(body.get("preset", self.cfg.engine.preset)),
                           priority=str(body.get("priority", "normal")), upload=bool(body.get("upload", True)))
        except (ValueError, KeyError, TypeError):
            return JSONResponse({"reason": "the form could not be read", "hint": "reload the page"}, 400)
        try:
            folder = await run_in_threadpool(self.hand_over, request.state.user, form, "web")
        except UploadRefused as exc:
            return JSONResponse({"reason": exc.reason, "hint": exc.hint}, exc.status)
        return JSONResponse({"job": folder, "url": f"/jobs/{folder}"})

    def hand_over(self, user: str, form: JobForm, via: str, **audit: str) -> str:
        """The uploads as a job in the inbox, owned by `user`; raises UploadRefused (nothing moved).
        Audited as `<via> upload` (or `... refused`)."""
        def known(name: str) -> bool:
            return self.store.jobs.find(name) is not None
        handed_at = time.time()  # before the job exists: its owner row applies to jobs made after it
        try:
            folder, files, size = hand_over(self.cfg, self.uploads, user, form, known)
        except UploadRefused as exc:
            self.audit.action(f"{via} upload refused", user=user, job=form.name, reason=exc.reason, **audit)
            raise
        self.store.web.record_owner(folder, user, handed_at, audit.get("token"))
        self.audit.action(f"{via} upload", user=user, job=folder, files=files, bytes=size, **audit)
        return folder

    # --- health --------------------------------------------------------------------------------------

    def _health_context(self) -> dict[str, Any]:
        """The daemon's own view (its state file and the store): cheap, and asks no service."""
        return {**condition(self.cfg, self.store), "jobs": self.store.jobs.counts(),
                "devices": self.cfg.workers.devices, "per_device": self.cfg.workers.per_device,
                "min_free_gb": self.cfg.disk_guard.min_free_gb, "running": self.store.tasks.select(states=("running",)),
                "doctor": self.checks.last, "fresh_seconds": self.checks.fresh, "now": time.time(),
                "stale_seconds": STALE_SECONDS}

    async def health(self, request: Request) -> Response:
        context = await run_in_threadpool(self._health_context)
        return self.render(request, "health.html", **context, message=request.session.pop("message", None))

    async def health_checks(self, request: Request) -> Response:
        """The live checks, only on the page's button (LiveChecks: one at a time, a fresh result kept)."""
        request.session["message"] = await run_in_threadpool(self.checks.run)
        return RedirectResponse("/health", 303)

    # --- live updates --------------------------------------------------------------------------------

    def _live(self, request: Request, render: Callable[[], str]) -> Response:
        """Server-sent events: the fragment again whenever it changed, a comment now and then to keep
        proxies from closing the stream."""
        async def events() -> AsyncIterator[str]:
            last, quiet = None, 0.0
            while not await request.is_disconnected() and await run_in_threadpool(self._signed_in, request):
                html = await run_in_threadpool(render)
                if html != last:
                    last, quiet = html, 0.0
                    yield "".join(f"data: {line}\n" for line in html.splitlines() or [""]) + "\n"
                elif quiet >= KEEPALIVE_SECONDS:
                    quiet = 0.0
                    yield ": keep-alive\n\n"
                await asyncio.sleep(LIVE_SECONDS)
                quiet += LIVE_SECONDS
        return StreamingResponse(self._counted(events()), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})

    async def _counted(self, stream: AsyncIterator[str]) -> AsyncIterator[str]:
        """A live stream, counted in live_streams while it is open (each holds one of the browser's
        connections to this host)."""
        self.live_streams += 1
        try:
            async for chunk in stream:
                yield chunk
        finally:
            self.live_streams -= 1


def _bad_value(exc: BadValue) -> Response:
    return JSONResponse({"reason": str(exc), "hint": "use the page's own links and filters"}, 400)


def _with_job_outputs(cfg: Config, view: dict[str, Any]) -> dict[str, Any]:
    """The job's videos as file names in outputs/<job>/ (the player's local source)."""
    folder = cfg.folder("outputs") / view["name"]
    view["files"] = sorted(p.name for p in folder.iterdir() if p.is_file()) if folder.is_dir() else []
    return view


def _links(cfg: Config, job_name: str) -> dict[str, Any] | None:
    doc = links_doc(cfg, job_name)
    if doc is None:
        return None
    doc["by_file"] = {f["file"]: f for f in doc.get("files", [])}
    return doc


def create_app(cfg: Config, config_path: Path | None, session_key: str) -> Starlette:
    console = Console(cfg, config_path)
    tus = TusServer(console.uploads)
    routes = [
        Route("/", lambda r: RedirectResponse("/jobs", 303)),
        Route("/favicon.ico", lambda r: FileResponse(FAVICON, headers={"Cache-Control": "max-age=86400"})),
        Route("/login", console.login_page, methods=["GET"]),
        Route("/login", console.login, methods=["POST"]),
        Route("/logout", console.logout, methods=["POST"]),
        Route("/jobs", console.jobs),
        Route("/jobs/live", console.jobs_live),
        Route("/jobs/{ref}", console.job),
        Route("/jobs/{ref}/live", console.job_live),
        Route("/jobs/{ref}/files/{name}", console.job_file),
        Route("/jobs/{ref}/{action}", console.job_request, methods=["POST"]),
        Route("/upload", console.upload_page),
        Route("/upload/submit", console.submit, methods=["POST"]),
        Route("/health", console.health),
        Route("/health/checks", console.health_checks, methods=["POST"]),
        *tus.routes(),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
        Mount("/api/v1", app=create_api(console)),
    ]
    middleware = [
        Middleware(SecurityHeaders, csp=content_security_policy(_media_origin(cfg))),
        Middleware(Door, multipart_bytes=int(cfg.web.api_multipart_mb * 2**20)),
        Middleware(SessionCookies, secure=cfg.web.secure_cookies, secret_key=session_key,
                   session_cookie="heygem_session", same_site="strict", max_age=SESSION_SECONDS),
        Middleware(Gate, web=cfg.web, sessions=console.sessions, tokens=console.tokens),
    ]
    app = Starlette(routes=routes, middleware=middleware)
    app.state.console = console
    return app
