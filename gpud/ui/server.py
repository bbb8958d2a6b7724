"""`gpud ui` (SPEC §15): a small aiohttp server for one web page of the box, and a client of the control API.

    browser ──HTTP (token → cookie)──▶ gpud ui ──HTTP over the Unix socket──▶ control API of the daemon

Routes: `/` and `/static/…` (the page, from the package: nothing from outside this machine), `/api/events`
(the live feed as Server-Sent Events, see gpud.ui.live), `/api/logs` (a replica's log tail, followed),
and `/api/v1/…` (the control-API routes listed in gpud.ui.routes, passed through). Every request passes
the checks of gpud.ui.security first; every answer carries headers that keep the page from loading
anything from elsewhere or being framed by another site.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from importlib import resources
from typing import Any, TextIO

from aiohttp import web

from gpud import __version__
from gpud.config import UiSettings, parse_listen
from gpud.engines import ENGINES
from gpud.errors import GpudError
from gpud.serverlog import ServerLog
from gpud.ui import live
from gpud.ui.control import ControlClient
from gpud.ui.routes import control_path, decorate_show, error_body, sse_frame
from gpud.ui.security import TOKEN_PARAM, decide, new_token

log = logging.getLogger(__name__)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

_TYPES = {".html": "text/html", ".js": "text/javascript", ".css": "text/css", ".svg": "image/svg+xml"}
# The page is ours alone: scripts, styles and connections only from this server, no frames, no referrer
# (the first URL holds the token). Inline scripts and style attributes are refused as well.
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
        "font-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
MAX_BODY_BYTES = 1 << 20


def load_static() -> dict[str, tuple[bytes, str]]:
    """The page's files, read once from the package: name → (bytes, content type)."""
    files: dict[str, tuple[bytes, str]] = {}
    for entry in resources.files("gpud.ui").joinpath("static").iterdir():
        suffix = os.path.splitext(entry.name)[1]
        if entry.is_file() and suffix in _TYPES:
            files[entry.name] = (entry.read_bytes(), _TYPES[suffix])
    return files


def _json(body: Any, status: int = 200) -> web.Response:
    return web.json_response(body, status=status)


class Dashboard:
    """The web app of one `gpud ui` run: its token, its control client, its page."""

    def __init__(self, settings: UiSettings, socket_path: str, token: str | None = None) -> None:
        self.settings = settings
        self.socket_path = socket_path
        self.token = token or new_token()
        self.control = ControlClient(socket_path)
        self.static = load_static()
        self.info = {
            "host": socket.gethostname(),
            "socket": socket_path,
            "version": __version__,
            "engines": list(ENGINES),
            "log_lines": settings.log_lines,
        }

    def make_app(self) -> web.Application:
        app = web.Application(middlewares=[self._guard], client_max_size=MAX_BODY_BYTES)
        app.router.add_get("/", self.index)
        app.router.add_get("/static/{name}", self.static_file)
        app.router.add_get("/api/events", self.events)
        app.router.add_get("/api/logs", self.logs)
        app.router.add_route("*", "/api/v1/{tail:.*}", self.forward)
        app.on_response_prepare.append(self._headers)
        app.on_cleanup.append(lambda _app: self.control.close())
        return app

    # ---- the checks every request passes ------------------------------------------------------------
    async def _headers(self, request: web.Request, response: web.StreamResponse) -> None:
        for key, value in SECURITY_HEADERS.items():
            response.headers.setdefault(key, value)

    @web.middleware
    async def _guard(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        decision = decide(
            self.token,
            method=request.method,
            path=request.path,
            query_token=request.query.get(TOKEN_PARAM),
            cookies=dict(request.cookies),
            origin=request.headers.get("Origin"),
            host=request.headers.get("Host"),
            fetch_site=request.headers.get("Sec-Fetch-Site"),
        )
        if not decision.allowed:
            if request.path.startswith("/api/"):
                code = "unauthorized" if decision.status == 401 else "forbidden"
                return _json(error_body(code, decision.reason), decision.status)
            return web.Response(text=decision.reason + "\n", status=decision.status)
        if decision.redirect is not None:
            response: web.StreamResponse = web.Response(status=303, headers={"Location": decision.redirect})
        else:
            try:
                response = await handler(request)
            except web.HTTPException as exc:
                if not request.path.startswith("/api/"):
                    raise
                response = _json(error_body("not_found" if exc.status == 404 else "invalid", exc.reason), exc.status)
        if decision.set_cookie is not None and not response.prepared:
            response.headers.add("Set-Cookie", decision.set_cookie)
        return response

    # ---- the page -----------------------------------------------------------------------------------
    async def index(self, request: web.Request) -> web.Response:
        return self._file("index.html")

    async def static_file(self, request: web.Request) -> web.Response:
        return self._file(request.match_info["name"])

    def _file(self, name: str) -> web.Response:
        found = self.static.get(name)
        if found is None:
            raise web.HTTPNotFound()
        body, content_type = found
        return web.Response(body=body, content_type=content_type, charset="utf-8")

    # ---- the control API, passed through ------------------------------------------------------------
    async def forward(self, request: web.Request) -> web.Response:
        path = control_path(request.method, request.raw_path)
        if path is None:
            return _json(error_body("not_found", f"gpud ui does not offer {request.method} {request.path}."), 404)
        body = await request.read() if request.can_read_body else None
        try:
            status, raw = await self.control.forward(request.method, path, body)
        except GpudError as exc:
            return _json(error_body("unreachable", exc.message), 503)
        try:
            answer = json.loads(raw) if raw.strip() else None
        except ValueError:
            return _json(error_body("error", f"The daemon answered HTTP {status} with a body that is not JSON."), 502)
        return _json(decorate_show(answer), status)

    # ---- streams ------------------------------------------------------------------------------------
    async def _sse(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "X-Accel-Buffering": "no"})
        await response.prepare(request)
        await response.write(b"retry: 1000\n\n")  # EventSource reconnects after a second if we go away
        return response

    async def events(self, request: web.Request) -> web.StreamResponse:
        response = await self._sse(request)
        feed = live.page_events(self.control, self.info, self.settings.refresh_sec)
        try:
            async with contextlib.aclosing(feed) as pages:
                async for name, data in pages:
                    await response.write(b": ping\n\n" if name == "ping" else sse_frame(name, data))
        except ConnectionResetError:
            pass  # the page was closed (a cancellation, with handler_cancellation, ends the handler as well)
        return response

    async def logs(self, request: web.Request) -> web.StreamResponse:
        name = request.query.get("model", "")
        try:
            replica = int(request.query.get("replica", "0"))
        except ValueError:
            replica = -1
        if not name or replica < 0:
            return _json(error_body("invalid", "Logs need ?model=NAME&replica=INDEX."), 422)
        response = await self._sse(request)
        batches = live.log_batches(self.control, name, replica, self.settings.log_lines, self.settings.log_line_chars)
        try:
            async with contextlib.aclosing(batches) as stream:
                async for lines in stream:
                    await response.write(sse_frame("lines", lines))
            await response.write(sse_frame("end", {"message": "The log stream ended."}))
        except GpudError as exc:
            # EventSource cannot read an HTTP error, so the daemon's refusal comes as an event.
            await response.write(sse_frame("failure", {"message": exc.message}))
        except ConnectionResetError:
            pass
        return response


# ---- the command ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Listening:
    """Where a started dashboard listens, and the URL that opens it."""

    host: str
    port: int
    url: str


def page_url(host: str, port: int, token: str) -> str:
    """The URL to print: the --listen host as given (IPv6 in brackets), the port actually bound."""
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}/?{TOKEN_PARAM}={token}"


async def start(dashboard: Dashboard, host: str, port: int) -> tuple[web.AppRunner, Listening]:
    """Bind and serve; a taken address or a bad host is one sentence (GpudError)."""
    runner = web.AppRunner(dashboard.make_app(), handle_signals=False, access_log=None,
                           handler_cancellation=True, shutdown_timeout=1.0, logger=ServerLog(log))
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise GpudError(f"gpud ui cannot listen on {host}:{port}: {exc.strerror or exc} "
                        "(pass --listen HOST:PORT).") from None
    bound = runner.addresses[0][1] if runner.addresses else port
    return runner, Listening(host, bound, page_url(host, bound, dashboard.token))


def _has_display() -> bool:
    """A graphical session to open a browser in (without one, webbrowser would pick a text browser and
    take over the terminal that shows the URL)."""
    return sys.platform == "darwin" or bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


def _open_browser(url: str) -> None:
    import webbrowser

    try:
        webbrowser.open(url, new=2)
    except webbrowser.Error:
        pass


async def serve(settings: UiSettings, socket_path: str, listen: str | None, open_browser: bool,
                out: TextIO) -> int:
    """Run the dashboard until SIGINT or SIGTERM; print its URL first (flushed: a pipe reads it at once)."""
    host, port = parse_listen(listen, what="--listen") if listen else (settings.listen_host, settings.listen_port)
    dashboard = Dashboard(settings, socket_path)
    runner, where = await start(dashboard, host, port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        out.write(where.url + "\n")
        out.flush()
        try:
            await dashboard.control.get_json("/v1/status")
        except GpudError as exc:
            sys.stderr.write(f"gpud: {exc.message} The page will say so and connect once the daemon is up.\n")
            sys.stderr.flush()
        if host not in ("127.0.0.1", "localhost", "::1"):
            sys.stderr.write(f"gpud: listening on {host}, not on loopback: anyone who can reach it and has "
                             "the URL can control this box.\n")
            sys.stderr.flush()
        if open_browser and _has_display():
            await asyncio.to_thread(_open_browser, where.url)
        await stop.wait()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        await runner.cleanup()
    return 0


def run_ui(socket_path: str, listen: str | None, open_browser: bool) -> int:
    """The `gpud ui` command."""
    return asyncio.run(serve(UiSettings(), socket_path, listen, open_browser, sys.stdout))
