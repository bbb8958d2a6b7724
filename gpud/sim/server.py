"""A simulated OpenAI-compatible inference server: gpud's `sim` engine, for tests, demos and benchmarks.

    python -m gpud.sim.server --host 127.0.0.1 --port PORT [--startup-s 0.5] [--ttft-ms 20] [--itl-ms 5]
                             [--max-num-seqs 256] [--prefill-ms-per-1k-tokens 0] [--prefix-cache-tokens 0]
                             [--served-model-name NAME]

It uses no GPU and behaves like a vLLM server from the outside:

- `GET /health` answers 503 until `--startup-s` has passed (the port listens at once), then 200.
- `POST /v1/completions` and `POST /v1/chat/completions`, streamed (SSE) or not, in OpenAI's formats.
  Each request produces `max_tokens` tokens (default 16; chat also reads `max_completion_tokens`): the
  first after `--ttft-ms` plus the prefill of its uncached prompt tokens, each next after `--itl-ms`. At
  most `--max-num-seqs` requests run at once; the others wait in FIFO order. A client that disconnects
  cancels its request, queued or running.
- Prefill and the prefix cache (gpud.sim.prefix, SPEC §13): `--prefill-ms-per-1k-tokens X` adds
  `X × uncached_prompt_tokens / 1000` ms before the first token; `--prefix-cache-tokens N` keeps an LRU
  cache of 256-character prompt blocks of at most N tokens (0: none, every prompt token is uncached).
  A completion's list of prompts is prefilled prompt by prompt; `n` samples of a prompt share its prefill.
- `POST /v1/embeddings`: deterministic unit vectors derived from a hash of each input (16 dimensions,
  or `dimensions`).
- `GET /v1/models`: the served model name. Any `model` in a request body (or none) is accepted, since
  gpud's proxy may route by header.
- `GET /metrics`: Prometheus text with vLLM's names (`vllm:num_requests_running`, `…_waiting`,
  `vllm:prompt_tokens_total`, `vllm:generation_tokens_total`, `vllm:request_success_total`, and
  `vllm:prefix_cache_queries_total` / `vllm:prefix_cache_hits_total` in tokens, as vLLM counts them).
- Every response carries `X-Sim-Pid: <pid>`, so a test can see which replica answered.
- SIGTERM or SIGINT: stop listening, give in-flight requests a short grace, exit 0.

Fault injection for gpud's own tests, read from the environment at startup:

- `GPUD_SIM_FAIL_AT_START=1`: print a message to stderr and exit with code 3 at once.
- `GPUD_SIM_HANG=1`: listen and accept connections but never answer any request, `/health` included.

It prints one line to stdout once listening ("simserver listening on HOST:PORT", the real port when
`--port 0`) and logs nothing per request: its output goes to a per-replica log file.

The wire formats (request parsing, response bodies) live in gpud.sim.api, pure and testable alone; this
module is the aiohttp shell around them.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import math
import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler

from gpud.sim.api import (
    Generation,
    RequestError,
    StreamFrames,
    dumps,
    embeddings_response,
    error_body,
    escape_label,
    full_response,
    models_response,
    parse_embeddings,
    parse_generation,
)
from gpud.sim.prefix import Prefill

EXIT_FAIL_AT_START = 3
SHUTDOWN_GRACE_S = 0.5  # in-flight requests get this long after SIGTERM before they are cancelled
PID_HEADER = "X-Sim-Pid"
# The series /metrics exposes, under vLLM's names so that dashboards and gpud read both alike.
_METRICS = (
    ("num_requests_running", "gauge", "Number of requests currently running."),
    ("num_requests_waiting", "gauge", "Number of requests waiting to be processed."),
    ("prompt_tokens_total", "counter", "Number of prefill tokens processed."),
    ("generation_tokens_total", "counter", "Number of generation tokens processed."),
    ("request_success_total", "counter", "Count of successfully processed requests."),
    ("prefix_cache_queries_total", "counter", "Prefix cache queries, in terms of number of queried tokens."),
    ("prefix_cache_hits_total", "counter", "Prefix cache hits, in terms of number of cached tokens."),
)


class FifoGate:
    """A counting gate whose waiters are served strictly in arrival order.

    asyncio.Semaphore is only strictly FIFO from Python 3.11.1 on; gpud supports 3.10, and queue order
    is what a client of a loaded vLLM server observes.
    """

    def __init__(self, slots: int) -> None:
        self._free = slots
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()

    async def acquire(self) -> None:
        if self._free > 0 and not self._waiters:
            self._free -= 1
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self.release()  # cancelled just after the slot was handed over: pass it on
            else:
                self._waiters.remove(fut)
            raise

    def release(self) -> None:
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(None)
                return
        self._free += 1


class SimEngine:
    """One simulated engine: its timing knobs, its queue, and the counters /metrics reports."""

    def __init__(
        self,
        name: str,
        startup_s: float,
        ttft_ms: float,
        itl_ms: float,
        max_num_seqs: int,
        prefill_ms_per_1k_tokens: float = 0.0,
        prefix_cache_tokens: int = 0,
    ) -> None:
        self.name = name
        self.prefill = Prefill(prefill_ms_per_1k_tokens, prefix_cache_tokens)
        self.ttft = ttft_ms / 1000.0
        self.itl = itl_ms / 1000.0
        self.ready_at = time.monotonic() + startup_s
        self.created = int(time.time())
        self.gate = FifoGate(max_num_seqs)
        self.running = 0
        self.waiting = 0
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.finished = 0
        self._label = escape_label(name)

    def ready(self) -> bool:
        return time.monotonic() >= self.ready_at

    async def admit(self) -> None:
        """Wait for a sequence slot in FIFO order; the caller must call `done` afterwards."""
        self.waiting += 1
        try:
            await self.gate.acquire()
        finally:
            self.waiting -= 1
        self.running += 1

    def done(self) -> None:
        self.running -= 1
        self.gate.release()

    def metrics_text(self) -> bytes:
        """Prometheus text format 0.0.4, written by hand: seven samples do not need a registry."""
        values = (
            self.running,
            self.waiting,
            self.prompt_tokens,
            self.generation_tokens,
            self.finished,
            self.prefill.queries,
            self.prefill.hits,
        )
        lines = []
        for (name, kind, help_text), value in zip(_METRICS, values, strict=True):
            labels = f'model_name="{self._label}"'
            if name == "request_success_total":  # every simulated request stops at max_tokens
                labels = 'finished_reason="length",' + labels
            lines += [
                f"# HELP vllm:{name} {help_text}",
                f"# TYPE vllm:{name} {kind}",
                f"vllm:{name}{{{labels}}} {float(value)}",
            ]
        return ("\n".join(lines) + "\n").encode()

    def first_token_at(self, start: float, prompts: tuple[str, ...]) -> float:
        """Loop time of the first token of a request admitted at `start`: ttft plus its prefill.

        Looks the prompts up in the prefix cache and holds them there, so call it once per request.
        """
        return start + self.ttft + self.prefill.run(prompts)

    def due(self, first: float, token: int) -> float:
        """Loop time at which token `token` (0-based) of a request whose first token is at `first` is due."""
        return first + token * self.itl


def _error(status: int, message: str, kind: str = "BadRequestError") -> web.Response:
    return web.json_response(error_body(message, kind, status), status=status, dumps=dumps)


_NOT_READY = "The model is still loading; retry once /health answers 200."


async def _body(request: web.Request) -> dict[str, Any]:
    """The request body as a JSON object; raise RequestError otherwise."""
    try:
        body = json.loads(await request.read())
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError are both ValueErrors
        raise RequestError(f"The request body is not valid JSON: {exc}.") from None
    if not isinstance(body, dict):
        raise RequestError("The request body must be a JSON object.")
    return body


async def _sleep_until(when: float) -> None:
    delay = when - asyncio.get_running_loop().time()
    if delay > 0:
        await asyncio.sleep(delay)


async def _generate(engine: SimEngine, request: web.Request, chat: bool) -> web.StreamResponse:
    if not engine.ready():
        return _error(503, _NOT_READY, "ServiceUnavailableError")
    try:
        job = parse_generation(await _body(request), chat, engine.name, time.time())
    except RequestError as exc:
        return _error(400, str(exc))
    await engine.admit()
    try:
        first = engine.first_token_at(asyncio.get_running_loop().time(), job.prompts)
        engine.prompt_tokens += job.prompt_tokens
        if job.stream:
            return await _stream(engine, request, job, first)
        await _sleep_until(engine.due(first, job.max_tokens - 1))
        engine.generation_tokens += job.max_tokens * job.choices
        engine.finished += 1
        return web.Response(body=full_response(job), content_type="application/json")
    finally:
        engine.done()


async def _stream(
    engine: SimEngine, request: web.Request, job: Generation, first: float
) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await response.prepare(request)
    frames = StreamFrames(job)
    head = frames.head()
    if head:
        await response.write(head)
    loop = asyncio.get_running_loop()
    sent = 0
    while sent < job.max_tokens:
        await _sleep_until(engine.due(first, sent))
        # Every token already due goes out in one write: under load the loop wakes late, and a real
        # engine also sends what one scheduler step produced together.
        if engine.itl > 0:
            due = int((loop.time() - first) / engine.itl) + 1
        else:
            due = job.max_tokens
        upto = min(job.max_tokens, max(due, sent + 1))
        await response.write(frames.tokens(sent, upto))
        engine.generation_tokens += (upto - sent) * job.choices
        sent = upto
    engine.finished += 1
    await response.write(frames.tail())
    await response.write_eof()
    return response


async def _embeddings(engine: SimEngine, request: web.Request) -> web.Response:
    if not engine.ready():
        return _error(503, _NOT_READY, "ServiceUnavailableError")
    try:
        job = parse_embeddings(await _body(request), engine.name)
    except RequestError as exc:
        return _error(400, str(exc))
    await engine.admit()
    try:
        # One forward pass: an embedding costs a first token's ttft (no prefill cost, no prefix cache).
        await _sleep_until(asyncio.get_running_loop().time() + engine.ttft)
        engine.prompt_tokens += job.prompt_tokens
        engine.finished += 1
        return web.Response(body=embeddings_response(job), content_type="application/json")
    finally:
        engine.done()


def build_app(engine: SimEngine, hang: bool = False) -> web.Application:
    """The aiohttp application serving `engine`; with `hang`, no request is ever answered."""
    pid = str(os.getpid())

    @web.middleware
    async def never_answer(request: web.Request, handler: Handler) -> web.StreamResponse:
        await asyncio.get_running_loop().create_future()  # never resolved: the fault being simulated
        raise AssertionError("unreachable")

    async def add_pid(request: web.Request, response: web.StreamResponse) -> None:
        response.headers[PID_HEADER] = pid

    async def health(request: web.Request) -> web.Response:
        return web.Response(status=200) if engine.ready() else web.Response(status=503, text="starting")

    async def models(request: web.Request) -> web.Response:
        return web.Response(
            body=models_response(engine.name, engine.created), content_type="application/json"
        )

    async def metrics(request: web.Request) -> web.Response:
        content_type = "text/plain; version=0.0.4; charset=utf-8"
        return web.Response(body=engine.metrics_text(), headers={"Content-Type": content_type})

    async def completions(request: web.Request) -> web.StreamResponse:
        return await _generate(engine, request, chat=False)

    async def chat(request: web.Request) -> web.StreamResponse:
        return await _generate(engine, request, chat=True)

    async def embeddings(request: web.Request) -> web.Response:
        return await _embeddings(engine, request)

    app = web.Application(middlewares=[never_answer] if hang else [], client_max_size=64 * 1024 * 1024)
    app.on_response_prepare.append(add_pid)
    app.router.add_get("/health", health)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/metrics", metrics)
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_post("/v1/embeddings", embeddings)
    return app


def _listen_socket(host: str, port: int) -> socket.socket:
    # Bound here rather than by aiohttp so that `--port 0` can announce the port the kernel picked.
    family, kind, proto, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(address)
    sock.listen(1024)
    sock.setblocking(False)
    return sock


async def serve(args: argparse.Namespace, hang: bool) -> None:
    """Listen, announce, and serve until SIGTERM or SIGINT."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    engine = SimEngine(
        args.served_model_name,
        args.startup_s,
        args.ttft_ms,
        args.itl_ms,
        args.max_num_seqs,
        args.prefill_ms_per_1k_tokens,
        args.prefix_cache_tokens,
    )
    # handler_cancellation: a client that goes away cancels its handler, so a queued or running request
    # stops at once, as vLLM aborts a request whose connection closed.
    runner = web.AppRunner(
        build_app(engine, hang), access_log=None, handler_cancellation=True, shutdown_timeout=SHUTDOWN_GRACE_S
    )
    await runner.setup()
    sock = _listen_socket(args.host, args.port)
    try:
        await web.SockSite(runner, sock).start()
        host, port = sock.getsockname()[:2]
        print(f"simserver listening on {host}:{port}", flush=True)
        await stop.wait()
    finally:
        await runner.cleanup()
        sock.close()


def _non_negative(kind: Callable[[str], float]) -> Callable[[str], float]:
    def parse(text: str) -> float:
        value = kind(text)
        if not (0 <= value < math.inf):
            raise argparse.ArgumentTypeError(f"needs a finite value of 0 or more, got {text!r}")
        return value

    return parse


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m gpud.sim.server", description="Simulated OpenAI server.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000, help="0 lets the kernel pick (it is printed)")
    parser.add_argument("--startup-s", type=_non_negative(float), default=0.5)
    parser.add_argument("--ttft-ms", type=_non_negative(float), default=20.0)
    parser.add_argument("--itl-ms", type=_non_negative(float), default=5.0)
    parser.add_argument("--max-num-seqs", type=_non_negative(int), default=256)
    parser.add_argument("--prefill-ms-per-1k-tokens", type=_non_negative(float), default=0.0)
    parser.add_argument("--prefix-cache-tokens", type=_non_negative(int), default=0, help="0: no cache")
    parser.add_argument("--served-model-name", default="sim")
    args = parser.parse_args(argv)
    if args.max_num_seqs < 1:
        parser.error("--max-num-seqs needs at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if os.environ.get("GPUD_SIM_FAIL_AT_START") == "1":
        print("simserver: failing at start as asked by GPUD_SIM_FAIL_AT_START=1", file=sys.stderr, flush=True)
        return EXIT_FAIL_AT_START
    hang = os.environ.get("GPUD_SIM_HANG") == "1"
    try:
        import uvloop
    except ImportError:  # optional: the default loop works, only slower
        asyncio.run(serve(args, hang))
    else:
        uvloop.run(serve(args, hang))
    return 0


if __name__ == "__main__":
    sys.exit(main())
