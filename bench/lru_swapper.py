"""The baseline of bench/demand_bench.py: a one-model-at-a-time LRU swapper, as llama-swap runs models.

    python bench/lru_swapper.py --port PORT --startup-s S

An OpenAI-style proxy that runs at most one sim engine (`python -m gpud.sim.server`) at a time. A request
for the model that runs goes to it. A request for another model waits until the requests in flight on the
current one have finished, stops it (SIGTERM, then waits for it to exit), starts the requested one and
waits until its /health answers 200 — the least recently used model is always the one unloaded, because
only one is ever loaded. Requests that arrive during a swap wait for it. It knows nothing about GPU
memory; that is the point of the comparison. `GET /stats` gives {"loads", "unloads"}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import socket
import subprocess
import sys
from pathlib import Path

import aiohttp
from aiohttp import web

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Swapper:
    def __init__(self, startup_s: float) -> None:
        self.startup_s = startup_s
        self.current: str | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.inflight = 0
        self.drained = asyncio.Event()
        self.drained.set()
        self.switch = asyncio.Lock()
        self.switching = False
        self.loads = 0
        self.unloads = 0
        self.session: aiohttp.ClientSession | None = None

    async def acquire(self, model: str) -> int:
        """The port of a running engine for `model`, counted in flight (release() when done)."""
        while True:
            if self.current == model and not self.switching:
                self.inflight += 1
                self.drained.clear()
                return self.port
            async with self.switch:
                if self.current == model:
                    continue
                self.switching = True
                try:
                    await self.drained.wait()
                    await self._stop()
                    await self._start(model)
                finally:
                    self.switching = False

    def release(self) -> None:
        self.inflight -= 1
        if self.inflight == 0:
            self.drained.set()

    async def _stop(self) -> None:
        if self.proc is None:
            return
        self.proc.terminate()
        await asyncio.to_thread(self.proc.wait)
        self.proc, self.current = None, None
        self.unloads += 1

    async def _start(self, model: str) -> None:
        self.port = free_port()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gpud.sim.server", "--port", str(self.port), "--startup-s", str(self.startup_s),
             "--served-model-name", model], cwd=ROOT, stdout=subprocess.DEVNULL,
        )
        assert self.session is not None
        while True:
            try:
                async with self.session.get(f"http://127.0.0.1:{self.port}/health") as resp:
                    if resp.status == 200:
                        break
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.02)  # llama-swap polls its upstream's health about this often
        self.current = model
        self.loads += 1

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if request.path == "/stats":
            return web.json_response({"loads": self.loads, "unloads": self.unloads})
        body = await request.read()
        model = json.loads(body).get("model")
        port = await self.acquire(str(model))
        assert self.session is not None
        try:
            async with self.session.post(f"http://127.0.0.1:{port}{request.path_qs}", data=body,
                                         headers={"Content-Type": "application/json"}) as upstream:
                resp = web.StreamResponse(status=upstream.status,
                                          headers={"Content-Type": upstream.headers.get("Content-Type", "")})
                await resp.prepare(request)
                async for chunk in upstream.content.iter_any():
                    await resp.write(chunk)
                await resp.write_eof()
                return resp
        finally:
            self.release()


async def serve(port: int, startup_s: float) -> None:
    swapper = Swapper(startup_s)
    swapper.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None),
                                            connector=aiohttp.TCPConnector(limit=0))
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", swapper.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    print(f"swapper listening on 127.0.0.1:{port}", flush=True)
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(signum, stop.set)
    try:
        await stop.wait()
    finally:
        await swapper._stop()
        await swapper.session.close()
        await runner.cleanup()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--startup-s", type=float, default=2.0)
    args = parser.parse_args()
    asyncio.run(serve(args.port, args.startup_s))
    return 0


if __name__ == "__main__":
    sys.exit(main())
