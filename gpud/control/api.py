"""The control API: HTTP/1.1 + JSON over the daemon's Unix socket (SPEC §8).

Routes map to ModelService calls; every GpudError becomes {"error": {"code", "message"}} with its status,
and no bad input ever yields a 500. Peers are checked with SO_PEERCRED: root, the daemon's own user, or a
member of `daemon.socket_group`; anybody else gets 403.
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import json
import logging
import os
import pwd
import socket
import struct
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from aiohttp import web

from gpud import __version__
from gpud.control.service import ModelService
from gpud.errors import Forbidden, GpudError, InvalidInput, NotFound
from gpud.registry import SHUTDOWN_EVENT, Registry
from gpud.serverlog import ServerLog
from gpud.spec import ModelSpec
from gpud.supervise.logs import follow, log_path, tail
from gpud.venv.store import VenvStore

log = logging.getLogger(__name__)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
MAX_LOG_LINES = 100_000


def error_response(exc: GpudError) -> web.Response:
    return web.json_response(exc.to_json(), status=exc.http_status)


def peer_allowed(uid: int, gid: int, group: str | None) -> bool:
    if uid in (0, os.geteuid()):
        return True
    if not group:
        return False
    try:
        target = grp.getgrnam(group).gr_gid
    except KeyError:
        return False
    if gid == target:
        return True
    try:
        user = pwd.getpwuid(uid).pw_name
    except KeyError:
        return False
    return target in os.getgrouplist(user, gid)


def _peer(request: web.Request) -> tuple[int, int] | None:
    sock = request.transport.get_extra_info("socket") if request.transport else None
    if sock is None or sock.family != socket.AF_UNIX:
        return None
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, gid = struct.unpack("3i", raw)
    return uid, gid


async def _json_body(request: web.Request) -> Any:
    raw = await request.read()
    if not raw:
        return {}
    try:
        return json.loads(raw)
    except ValueError:
        raise InvalidInput("The request body is not valid JSON.") from None


class ControlAPI:
    def __init__(self, service: ModelService, registry: Registry, *, started: float, socket_group: str | None,
                 venvs: VenvStore | None = None, extra_status: Callable[[], dict[str, Any]] = dict) -> None:
        self.service = service
        self.registry = registry
        self.started = started
        self.socket_group = socket_group
        self.venvs = venvs
        self.extra_status = extra_status
        self._closing = asyncio.Event()  # set when shutdown begins: streams (events, logs -f) end at once

    def close_streams(self) -> None:
        """Shutdown begins: end every event stream and followed log now, so no client holds up the exit."""
        self._closing.set()
        self.registry.close()

    def make_app(self) -> web.Application:
        app = web.Application(middlewares=[self._errors], client_max_size=4 * 2**20)
        app.router.add_get("/v1/status", self.status)
        app.router.add_get("/v1/gpus", self.gpus)
        app.router.add_get("/v1/models", self.list_models)
        app.router.add_post("/v1/models", self.start_model)
        app.router.add_route("*", "/v1/models/{tail:.+}", self.model_route)
        app.router.add_post("/v1/plan", self.plan)
        app.router.add_get("/v1/events", self.events)
        app.router.add_get("/v1/venvs", self.list_venvs)
        app.router.add_post("/v1/venvs/prune", self.prune_venvs)
        return app

    @web.middleware
    async def _errors(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        peer = _peer(request)
        if peer is not None and not peer_allowed(*peer, self.socket_group):
            return error_response(Forbidden("This user may not control gpud (ask for the gpud socket group)."))
        try:
            return await handler(request)
        except GpudError as exc:
            return error_response(exc)
        except web.HTTPRequestEntityTooLarge:
            return error_response(InvalidInput("The request body is too large."))
        except web.HTTPNotFound:
            return error_response(NotFound(f"No such route: {request.method} {request.path}."))
        except web.HTTPMethodNotAllowed:
            return error_response(NotFound(f"No such route: {request.method} {request.path}."))
        except (asyncio.CancelledError, ConnectionResetError):
            raise
        except Exception:
            log.exception("unexpected error in %s %s", request.method, request.path)
            return error_response(GpudError("gpud hit an internal error; the daemon log has the details."))

    # ---- routes -------------------------------------------------------------------------------------
    async def status(self, request: web.Request) -> web.Response:
        counts = self.registry.counts()
        return web.json_response({
            "version": __version__,
            "uptime_sec": round(time.time() - self.started, 3),
            "pid": os.getpid(),
            "proxy": self.service.settings.proxy.listen,
            "endpoint": self.service.endpoint,
            "socket": self.service.settings.socket,
            "state_dir": str(self.service.settings.state_dir),
            "gpus_spec": self.service.settings.gpus,
            **counts,
            **self.extra_status(),
        })

    async def gpus(self, request: web.Request) -> web.Response:
        self.service.ledger.refresh()
        return web.json_response(self.service.ledger.to_json())

    async def list_models(self, request: web.Request) -> web.Response:
        return web.json_response({"models": [self.service.show(m) for m in self.registry]})

    async def start_model(self, request: web.Request) -> web.Response:
        spec = ModelSpec.from_json(await _json_body(request))
        model = await self.service.start_model(spec)
        return web.json_response(self.service.show(model), status=201)

    async def plan(self, request: web.Request) -> web.Response:
        return web.json_response(await self.service.plan(await _json_body(request)))

    async def model_route(self, request: web.Request) -> web.StreamResponse:
        # Names may hold "/" (Hugging Face ids), URL-encoded as %2F: split the raw path, then decode.
        # A raw "/" separates the action; a "/" inside a name arrives as %2F (SPEC §8). A client that did not
        # encode it still reaches GET/PATCH/DELETE of the model: the raw segments are joined back.
        raw = request.raw_path.split("?", 1)[0][len("/v1/models/"):].split("/")
        action = raw.pop() if len(raw) > 1 and raw[-1] in ("restart", "logs", "load", "unload") else None
        name = unquote("/".join(raw))
        method = request.method
        if action is None and method == "GET":
            return web.json_response(self.service.show(self.service.get(name)))
        if action is None and method == "PATCH":
            body = await _json_body(request)
            if not isinstance(body, dict) or set(body) != {"replicas"}:
                raise InvalidInput('PATCH takes {"replicas": N}.')
            model = await self.service.scale(name, body["replicas"])
            return web.json_response(self.service.show(model))
        if action is None and method == "DELETE":
            model = await self.service.stop_model(name)
            return web.json_response(self.service.show(model), status=202)
        if action == "restart" and method == "POST":
            body = await _json_body(request)
            rolling = body.get("rolling", False) if isinstance(body, dict) and set(body) <= {"rolling"} else None
            if not isinstance(rolling, bool):  # unknown fields too: an invalid request must not restart anything
                raise InvalidInput('restart takes {"rolling": true|false}.')
            model = await self.service.restart(name, rolling)
            return web.json_response(self.service.show(model), status=202)
        if action in ("load", "unload") and method == "POST":
            body = await _json_body(request)
            if body not in ({}, None):  # an invalid request must not load or unload anything
                raise InvalidInput(f"{action} takes no fields.")
            model = await (self.service.load(name) if action == "load" else self.service.unload(name))
            return web.json_response(self.service.show(model), status=202)
        if action == "logs" and method == "GET":
            return await self.logs(request, name)
        raise NotFound(f"No such route: {method} {request.path}.")

    async def logs(self, request: web.Request, name: str) -> web.StreamResponse:
        model = self.service.get(name)
        replica = _int_query(request, "replica", 0)
        lines = _int_query(request, "lines", 100)
        if replica not in model.replicas:
            raise NotFound(f"Model {name!r} has no replica {replica}.")
        if not 0 <= lines <= MAX_LOG_LINES:
            raise InvalidInput(f"Invalid lines {lines}: expected 0 to {MAX_LOG_LINES}.")
        path = log_path(self.service.settings.state_dir, name, replica)
        if request.query.get("follow") not in ("1", "true"):
            text = "".join(line + "\n" for line in (tail(path, lines) if path.exists() else []))
            return web.Response(text=text, content_type="text/plain")
        resp = web.StreamResponse(headers={"Content-Type": "text/plain; charset=utf-8"})
        await resp.prepare(request)
        try:
            async with contextlib.aclosing(follow(path, from_lines=lines, until=self._closing)) as stream:
                async for line in stream:
                    await resp.write((line + "\n").encode())
        except ConnectionResetError:
            pass
        return resp

    async def events(self, request: web.Request) -> web.StreamResponse:
        only = request.query.get("model")
        queue = self.registry.subscribe()
        resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await resp.prepare(request)

        async def send(event: dict[str, Any]) -> None:
            await resp.write(json.dumps(event).encode() + b"\n")

        try:
            names = [only] if only else [m.name for m in self.registry]
            for name in names:
                await send(self._model_event(name))
            while True:
                event = await queue.get()
                if event is SHUTDOWN_EVENT:
                    await send(event)
                    break
                changed_name = str(event.get("name", ""))
                # An eviction also concerns the model that needed the room (its start or load shows it).
                if only and only not in (changed_name, event.get("by")):
                    continue
                if event["type"] == "changed":
                    # Coalesce a burst of changes of one model into one event with its latest state.
                    while not queue.empty():
                        upcoming = queue._queue[0]  # type: ignore[attr-defined]
                        if upcoming.get("type") != "changed" or upcoming.get("name") != changed_name:
                            break
                        queue.get_nowait()
                    event = self._model_event(changed_name)
                await send(event)
        except ConnectionResetError:  # the client went away: that ends the stream, it is not an error
            pass
        finally:
            self.registry.unsubscribe(queue)
        return resp

    def _model_event(self, name: str) -> dict[str, Any]:
        model = self.registry.get(name)
        if model is None:
            return {"type": "removed", "name": name}
        return {"type": "model", "name": name, "model": self.service.show(model)}

    async def list_venvs(self, request: web.Request) -> web.Response:
        if self.venvs is None:
            return web.json_response({"venvs": []})
        # Reads a few small files per venv (or measures one built a moment ago): off the event loop.
        # Who uses which venv is read here, on the loop; the file reads (and a first size measurement) run in a
        # thread, which must not touch the registry while the loop changes it.
        users = self.venvs.users(self.registry)
        return web.json_response({"venvs": await asyncio.to_thread(self.venvs.list_json, users)})

    async def prune_venvs(self, request: web.Request) -> web.Response:
        if self.venvs is None:
            return web.json_response({"removed": []})
        return web.json_response({"removed": await self.venvs.prune(self.registry)})


def _int_query(request: web.Request, key: str, default: int) -> int:
    value = request.query.get(key)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise InvalidInput(f"Invalid {key} {value!r}: expected a whole number.") from None


async def serve_unix(app: web.Application, path: str, group: str | None) -> web.AppRunner:
    """Bind the control socket: parent dir created, stale socket replaced, mode 0660, group applied."""
    sock_path = Path(path)
    sock_path.parent.mkdir(parents=True, exist_ok=True)
    if sock_path.exists() or sock_path.is_symlink():
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(sock_path))
        except OSError:
            sock_path.unlink()  # stale: nobody listens
        else:
            raise GpudError(f"Another gpud daemon is already listening on {sock_path}.")
        finally:
            probe.close()
    # handler_cancellation: a client that leaves an event or log stream ends its handler; without it the
    # handler waits forever for events that never come, and holds up the daemon's shutdown.
    runner = web.AppRunner(app, handle_signals=False, access_log=None, handler_cancellation=True,
                           logger=ServerLog(log))
    await runner.setup()
    old_umask = os.umask(0o117)  # the socket is born 0660: no window where others could connect
    try:
        site = web.UnixSite(runner, str(sock_path))
        await site.start()
    finally:
        os.umask(old_umask)
    os.chmod(sock_path, 0o660)
    if group:
        try:
            os.chown(sock_path, -1, grp.getgrnam(group).gr_gid)
        except (KeyError, PermissionError) as exc:
            log.warning("cannot give %s to group %s: %s", sock_path, group, exc)
    return runner
