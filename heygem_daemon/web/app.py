"""The web console's pages and endpoints (Starlette). Reads go through the read model (views.py) and the
store; the only writes are a finished upload handed to the inbox and cancel/retry requests."""

from __future__ import annotations

import asyncio
import json
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
from heygem_daemon.views import condition, job_view, jobs_page, local_time
from heygem_daemon.web.auth import LoginLimit, check_password, csrf_token
from heygem_daemon.web.guard import Gate, SecurityHeaders, SessionCookies, content_security_policy
from heygem_daemon.engines.registry import engine_names
from heygem_daemon.web.handover import JobForm, hand_over
from heygem_daemon.web.health import LiveChecks
from heygem_daemon.web.tus import TusServer
from heygem_daemon.web.uploads import UploadRefused, Uploads

STATIC = Path(__file__).parent / "static"
LIVE_SECONDS = 1.0
KEEPALIVE_SECONDS = 15.0
STATES = tuple(s.value for s in JobState)


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
        self.logins = LoginLimit(cfg.web.login_attempts, cfg.web.login_window_seconds)
        self.checks = LiveChecks(config_path)
        self.templates = Environment(loader=PackageLoader("heygem_daemon.web", "templates"),
                                     autoescape=select_autoescape(default=True))
        self.templates.filters["when"] = local_time
        self.live_streams = 0  # server-sent event streams open now

    def render(self, request: Request | None, template: str, status: int = 200, **context: Any) -> HTMLResponse:
        return HTMLResponse(self.fragment(request, template, **context), status)

    def fragment(self, request: Request | None, template: str, **context: Any) -> str:
        if request is not None:
            context |= {"user": request.state.user, "csrf": csrf_token(request.session),
                        "auth": self.cfg.web.auth, "path": request.url.path}
        return self.templates.get_template(template).render(**context)

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
        key = f"{request.client.host if request.client else '-'}|{user}"
        if self.logins.blocked(key):
            return self.render(request, "login.html", 429, error="Too many failed logins; wait a few minutes.")
        if not await run_in_threadpool(check_password, self.cfg.web.users, user, password):
            self.logins.failed(key)
            return self.render(request, "login.html", 401, error="Wrong user name or password.")
        self.logins.succeeded(key)
        request.session.clear()  # a fresh session (and CSRF token) for the logged-in user
        request.session["user"] = user
        return RedirectResponse("/jobs", 303)

    async def logout(self, request: Request) -> Response:
        request.session.clear()
        return RedirectResponse("/login", 303)

    # --- jobs ----------------------------------------------------------------------------------------

    def _jobs_context(self, request: Request) -> dict[str, Any]:
        state = request.query_params.get("state", "")
        query = request.query_params.get("q", "").strip()
        try:
            page = max(1, int(request.query_params.get("page", "1")))
        except ValueError:
            page = 1
        data = jobs_page(self.cfg, self.store, (state,) if state in STATES else None, query, page,
                         self.cfg.web.page_size)
        params = {k: v for k, v in (("state", state), ("q", query)) if v}
        return {**data, "state": state, "q": query, "states": STATES,
                "query": lambda p: "?" + urlencode({**params, "page": p})}

    async def jobs(self, request: Request) -> Response:
        context = await run_in_threadpool(self._jobs_context, request)
        return self.render(request, "jobs.html", **context, live="/jobs/live?" + request.url.query)

    async def jobs_live(self, request: Request) -> Response:
        return self._live(request, lambda: self.fragment(None, "jobs_table.html", **self._jobs_context(request)))

    def _job_context(self, ref: str) -> dict[str, Any] | None:
        job = self.store.jobs.find(ref)
        if job is None:
            return None
        view = _with_job_outputs(self.cfg, job_view(self.cfg, self.store, job))
        return {"job": view, "links": _links(self.cfg, view["name"]), "folder_ref": ref}

    async def job(self, request: Request) -> Response:
        ref = request.path_params["ref"]
        context = await run_in_threadpool(self._job_context, ref)
        if context is None:
            waiting = (self.cfg.folder("inbox") / ref).is_dir()
            return self.render(request, "job_missing.html", 200 if waiting else 404, ref=ref, waiting=waiting,
                               live=f"/jobs/{ref}/live")
        return self.render(request, "job.html", **context, message=request.session.pop("message", None),
                           live=f"/jobs/{ref}/live")

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
        ask = {"cancel": request_cancel, "retry": request_retry}.get(action)
        if ask is None:
            return Response(status_code=404)
        try:
            said = await run_in_threadpool(ask, self.store, ref)
        except JobError as exc:
            said = f"Not done: {exc}"
        else:
            self.audit.action(f"web {action}", user=request.state.user, job=ref)
        request.session["message"] = said
        return RedirectResponse(f"/jobs/{ref}", 303)

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
        user = request.state.user

        def known(name: str) -> bool:
            return self.store.jobs.find(name) is not None
        try:
            folder, files, size = await run_in_threadpool(hand_over, self.cfg, self.uploads, user, form, known)
        except UploadRefused as exc:
            self.audit.action("web upload refused", user=user, job=form.name, reason=exc.reason)
            return JSONResponse({"reason": exc.reason, "hint": exc.hint}, exc.status)
        self.audit.action("web upload", user=user, job=folder, files=files, bytes=size)
        return JSONResponse({"job": folder, "url": f"/jobs/{folder}"})

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
            while not await request.is_disconnected():
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


def _with_job_outputs(cfg: Config, view: dict[str, Any]) -> dict[str, Any]:
    """The job's videos as file names in outputs/<job>/ (the player's local source)."""
    folder = cfg.folder("outputs") / view["name"]
    view["files"] = sorted(p.name for p in folder.iterdir() if p.is_file()) if folder.is_dir() else []
    return view


def _links(cfg: Config, job_name: str) -> dict[str, Any] | None:
    path = cfg.folder("outputs") / job_name / LINKS_JSON
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, ValueError):
        return None
    doc["by_file"] = {f["file"]: f for f in doc.get("files", [])}
    return doc


def create_app(cfg: Config, config_path: Path | None, session_key: str) -> Starlette:
    console = Console(cfg, config_path)
    tus = TusServer(console.uploads)
    routes = [
        Route("/", lambda r: RedirectResponse("/jobs", 303)),
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
    ]
    middleware = [
        Middleware(SecurityHeaders, csp=content_security_policy(_media_origin(cfg))),
        Middleware(SessionCookies, secure=cfg.web.secure_cookies, secret_key=session_key,
                   session_cookie="heygem_session", same_site="strict", max_age=12 * 3600),
        Middleware(Gate, web=cfg.web),
    ]
    app = Starlette(routes=routes, middleware=middleware)
    app.state.console = console
    return app
