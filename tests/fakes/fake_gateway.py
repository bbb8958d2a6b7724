"""An in-process stand-in for a Shepherd Model Gateway's control plane, for the registrar's unit tests.

It behaves as SMG 1.13 was seen to: POST /workers → 202 and the worker listed (at once, or never when
`list_new` is off, as when the gateway cannot reach the worker), 409 for a URL it already has; DELETE → 202,
the worker listed as "draining" until `drain()`; 401 without the control-plane key. `mode` makes it misbehave:
"ok", "401", "500", "garbage" (a 200 that is not JSON), "shape" (JSON without a workers list). `stop()` and
`start()` take it down and bring it back on the same port. The end-to-end tests use the real SMG.
"""

from __future__ import annotations

import itertools
import json
from typing import Any

from aiohttp import web


class FakeGateway:
    def __init__(self, api_key: str | None = None) -> None:
        self.api_key = api_key
        self.workers: dict[str, dict[str, Any]] = {}
        self.calls: list[tuple[str, str]] = []
        self.posted: list[dict[str, Any]] = []
        self.mode = "ok"
        self.list_new = True
        self.port = 0
        self._ids = itertools.count(1)
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> FakeGateway:
        app = web.Application()
        app.router.add_get("/workers", self._list)
        app.router.add_post("/workers", self._add)
        app.router.add_delete("/workers/{id}", self._remove)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", self.port, reuse_address=True)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self._runner = runner
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()

    def restart_empty(self) -> None:
        """What a restarted gateway knows: nothing."""
        self.workers.clear()

    def drain(self) -> None:
        """Draining workers are gone (SMG takes ~5 s)."""
        self.workers = {k: w for k, w in self.workers.items() if w["status"] != "draining"}

    def live(self) -> dict[str, dict[str, Any]]:
        """URL → worker, for the workers not draining."""
        return {w["url"]: w for w in self.workers.values() if w["status"] != "draining"}

    def count(self, method: str) -> int:
        return sum(1 for m, _ in self.calls if m == method)

    def _refusal(self, request: web.Request) -> web.Response | None:
        self.calls.append((request.method, request.path))
        if self.api_key is not None and request.headers.get("Authorization") != f"Bearer {self.api_key}":
            return web.Response(status=401, text="Missing or invalid Authorization header")
        if self.mode == "401":
            return web.Response(status=401, text="Invalid authentication token")
        if self.mode == "500":
            return web.json_response({"error": "database on fire", "code": "INTERNAL"}, status=500)
        if self.mode == "garbage":
            return web.Response(status=200 if request.method == "GET" else 202, text="<html>hello</html>")
        return None

    async def _list(self, request: web.Request) -> web.Response:
        refused = self._refusal(request)
        if refused is not None:
            return refused
        if self.mode == "shape":
            return web.json_response({"items": []})
        return web.json_response({"workers": list(self.workers.values()), "total": len(self.workers)})

    async def _add(self, request: web.Request) -> web.Response:
        refused = self._refusal(request)
        if refused is not None:
            return refused
        body = json.loads(await request.read())
        self.posted.append(body)
        for worker in self.workers.values():
            if worker["url"] == body["url"]:
                return web.json_response({"error": f"Worker already exists at URL '{body['url']}'",
                                          "code": "WORKER_ALREADY_EXISTS"}, status=409)
        worker_id = f"00000000-0000-0000-0000-{next(self._ids):012d}"
        if self.list_new:
            self.workers[worker_id] = {
                "id": worker_id,
                "url": body["url"],
                "model_id": body["models"][0]["id"],
                "labels": {**body.get("labels", {}), "served_model_name": body["models"][0]["id"]},
                "health": body.get("health", {}),
                "status": "ready",
                "is_healthy": True,
            }
        return web.json_response({"status": "accepted", "worker_id": worker_id}, status=202)

    async def _remove(self, request: web.Request) -> web.Response:
        refused = self._refusal(request)
        if refused is not None:
            return refused
        worker = self.workers.get(request.match_info["id"])
        if worker is None:
            return web.json_response({"error": "Worker not found", "code": "WORKER_NOT_FOUND"}, status=404)
        worker["status"] = "draining"
        return web.json_response({"status": "accepted", "worker_id": worker["id"]}, status=202)
