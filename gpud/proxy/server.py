"""The OpenAI-compatible reverse proxy in front of every model's replicas (SPEC §9).

A request is routed by its `X-Gpud-Model` header, else by the `"model"` of its JSON body (parsed only when the
header is absent), to the ready replica with the fewest in-flight requests (`gpud.proxy.balancer.choose`). The
registry is read directly on every request: same process, no polling, no second copy of the state.

Performance matters (it is benchmarked against nginx): the hop to the replicas goes through one shared
keep-alive pool of gpud.proxy.upstream (a lean HTTP/1.1 client: aiohttp's generic ClientSession cost ~40 % of the
proxy's CPU), the request head is assembled from the raw header bytes, small responses are sent in one
write, and nothing is decoded that does not have to be. Streams (SSE, chunked) are forwarded chunk by chunk
as they arrive, awaiting each client write (backpressure), with an idle read timeout instead of a total
one (gpud.proxy.relay; the HTTP message rules are in gpud.proxy.message). `start()` runs the server with handler
cancellation on, so a client that goes away cancels its handler at once, which closes the connection to the
replica, which then stops generating.

Slow and stuck clients (gpud.proxy.guard): a request head must arrive within `client_timeout_sec`, a body
must keep coming, and a client must keep reading what it asked for, else its connection is cut; above
`max_connections` new connections get a 503.

Failure rules: nothing is retried once a byte of the response has gone to the client, and everything that
fails before is retried on another ready replica when the replica may simply be gone: the connection could
not be made (the replica is reported through `on_connect_failure`, which the supervisor uses to take it out
of rotation until its health check passes), or it closed before the response head, or before the first
chunk of a body (response heads are held back until then, so a replica that dies before its first token
costs the client nothing). A replica that stays silent past `idle_timeout_sec` is not retried (it may still
be working on the request): 504. A stream cut after bytes went out ends with an OpenAI-style error event (for
SSE, when the cut falls between events) and a cut connection, so the client sees an error, never a clean end.
"""

from __future__ import annotations

import asyncio
import errno
import hmac
import logging
import time
from collections.abc import Callable

from aiohttp import web

from gpud.config import ProxySettings
from gpud.errors import GpudError
from gpud.proxy.balancer import choose
from gpud.proxy.guard import Listener, Stall
from gpud.proxy.message import (
    MODEL_HEADER,
    error_response,
    model_from_body,
    upstream_head_tail,
)
from gpud.proxy.metrics import Metrics
from gpud.proxy.relay import NullSeries, relay
from gpud.proxy.upstream import (
    BrokenResponse,
    ConnectFailed,
    NoResponse,
    Pool,
    ResponseCut,
    UpstreamTimeout,
)
from gpud.proxy.wake import WakeError, WakeGate
from gpud.registry import Model, Operation, Registry, Replica
from gpud.serverlog import ServerLog

log = logging.getLogger(__name__)

# Responses up to this size with a Content-Length are read whole and sent in one write (fewer syscalls and
# task switches for the common small JSON answer); anything else is streamed.
_BUFFER_LIMIT = 256 * 1024


class Proxy:
    """Routes OpenAI-style requests to the replicas in the registry; see the module docstring."""

    def __init__(
        self,
        registry: Registry,
        settings: ProxySettings = ProxySettings(),  # noqa: B008 - frozen, so one shared default is safe
        *,
        metrics: Metrics | None = None,
        on_connect_failure: Callable[[Replica], None] = lambda r: None,
        waker: WakeGate | None = None,
    ) -> None:
        """settings.idle_timeout_sec: how long a replica may send nothing; client_timeout_sec: how long a client
        may take to send a request head, pause while sending a body, or leave response bytes unread;
        max_connections: open client connections at most (0: derived from the file descriptor limit)."""
        self._registry = registry
        self._keys = tuple(k.encode() for k in settings.api_keys if k)
        self._max_body = settings.max_body_bytes
        self._metrics = metrics
        self._on_connect_failure = on_connect_failure
        self._waker = waker  # SPEC §12: holds requests for idle models while they wake (None: no waking)
        self._idle_timeout = settings.idle_timeout_sec
        self._client_timeout = settings.client_timeout_sec
        self._max_connections = settings.max_connections
        self._pool: Pool | None = None
        self._runner: web.AppRunner | None = None
        self._listener: Listener | None = None
        # Used when no Metrics object is given, so the hot path never branches on it.
        self._null_series = NullSeries()

    # -- lifecycle ---------------------------------------------------------------------------------------

    def make_app(self) -> web.Application:
        app = web.Application(client_max_size=self._max_body)
        # One catch-all route, dispatched below by plain string comparisons: cheaper on the hot path than
        # letting the router try a regex per resource on every proxied request.
        app.router.add_route("*", "/{tail:.*}", self._dispatch)
        app.on_startup.append(self._open_pool)
        app.on_cleanup.append(self._close_pool)
        return app

    async def start(self, host: str, port: int) -> None:
        """Listen on host:port; a GpudError says why when the address cannot be bound."""
        # keepalive_timeout: aiohttp closes a connection that sends no complete request head for this long
        # after its previous response. Header sizes keep aiohttp's limits (8190-byte lines, 128 fields: 4xx).
        runner = web.AppRunner(
            self.make_app(),
            access_log=None,
            handler_cancellation=True,
            keepalive_timeout=self._client_timeout,
            logger=ServerLog(log),
            auto_decompress=False,  # bodies pass unchanged: a gzipped body reaches the replica gzipped
        )
        await runner.setup()
        assert runner.server is not None
        unrouted = self._metrics.series("") if self._metrics is not None else self._null_series
        listener = Listener(
            runner.server,
            max_connections=self._max_connections,
            head_timeout=self._client_timeout,
            on_refused=lambda: unrouted.error("too_many_connections"),
            on_head_timeout=lambda: unrouted.error("client_timeout"),
        )
        try:
            await listener.listen(host, port, backlog=1024)
        except OSError as exc:
            await runner.cleanup()
            if exc.errno == errno.EADDRINUSE:
                raise GpudError(
                    f"Cannot listen on {host}:{port} for the proxy: the address is already in use "
                    "(another gpud or server?); choose another with --listen."
                ) from None
            raise GpudError(f"Cannot listen on {host}:{port} for the proxy: {exc.strerror or exc}.") from None
        self._runner = runner
        self._listener = listener

    async def close(self) -> None:
        """Stop listening and close the connections to the replicas."""
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()
        await self._close_pool()

    @property
    def address(self) -> tuple[str, int]:
        address = self._listener.address if self._listener is not None else None
        if address is None:
            raise GpudError("The proxy is not listening.")
        return address

    @property
    def max_connections(self) -> int:
        """The connection limit in force (after `start()`; 0 before)."""
        return self._listener.max_connections if self._listener is not None else 0

    async def _open_pool(self, app: web.Application | None = None) -> None:
        if self._pool is None:
            self._pool = Pool(idle_timeout=self._idle_timeout)

    async def _close_pool(self, app: web.Application | None = None) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            await pool.close()

    # -- local routes ------------------------------------------------------------------------------------

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        if self._listener is not None:
            self._listener.request_seen(request)
        if request.method in ("GET", "HEAD"):
            path = request.path
            if path == "/health":
                return await self._health(request)
            if path == "/metrics":
                return await self._metrics_route(request)
            if path == "/v1/models":
                return await self._list_models(request)
            if path.startswith("/v1/models/") and MODEL_HEADER not in request.headers:
                return await self._get_model(request, path[len("/v1/models/") :])
        return await self._proxy(request)

    async def _health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def _metrics_route(self, request: web.Request) -> web.Response:
        if self._keys and not self._authorized(request):
            return self._unauthorized()
        if self._metrics is None:
            return web.Response(status=404, text="Metrics are not enabled.\n")
        body, content_type = self._metrics.render()
        return web.Response(body=body, headers={"Content-Type": content_type})

    async def _list_models(self, request: web.Request) -> web.Response:
        if self._keys and not self._authorized(request):
            return self._unauthorized()
        data = [self._model_object(m.name, m.created_at) for m in self._registry if _listed(m)]
        return web.json_response({"object": "list", "data": data})

    async def _get_model(self, request: web.Request, name: str) -> web.StreamResponse:
        if self._keys and not self._authorized(request):
            return self._unauthorized()
        model = self._registry.get(name)
        if model is None or not _listed(model):
            return self._model_not_found(name)
        return web.json_response(self._model_object(model.name, model.created_at))

    @staticmethod
    def _model_object(name: str, created: float) -> dict[str, object]:
        return {"id": name, "object": "model", "created": int(created), "owned_by": "gpud"}

    # -- auth --------------------------------------------------------------------------------------------

    def _authorized(self, request: web.Request) -> bool:
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        given = token.strip().encode("utf-8", "replace") if scheme.lower() == "bearer" else b""
        ok = False
        for key in self._keys:  # every key is compared, so timing does not tell which one almost matched
            ok |= hmac.compare_digest(given, key)
        return ok

    def _unauthorized(self) -> web.Response:
        if self._metrics is not None:
            self._metrics.series("").error("unauthorized")
        return error_response(
            401,
            "Missing or invalid API key: send Authorization: Bearer KEY.",
            "invalid_request_error",
            "invalid_api_key",
            {"WWW-Authenticate": "Bearer"},
        )

    def _model_not_found(self, name: str) -> web.Response:
        shown = name if len(name) <= 200 else name[:200] + "…"
        return error_response(
            404,
            f"The model '{shown}' does not exist or is not running on this gpud.",
            "invalid_request_error",
            "model_not_found",
        )

    # -- proxying ----------------------------------------------------------------------------------------

    async def _proxy(self, request: web.Request) -> web.StreamResponse:
        started = time.perf_counter()
        if self._keys and not self._authorized(request):
            return self._unauthorized()
        metrics = self._metrics
        unrouted = metrics.series("") if metrics is not None else self._null_series
        transport = request.transport
        if transport is None:  # the client is already gone
            return error_response(400, "The client closed the connection.", "invalid_request_error", "client_closed")
        stall = Stall(asyncio.get_running_loop(), transport, self._client_timeout)
        try:
            try:
                body = await self._read_body(request, stall)
            except _TooLarge:
                unrouted.error("too_large")
                unrouted.request(413)
                return error_response(
                    413,
                    f"The request body is larger than the proxy's limit of {self._max_body} bytes.",
                    "invalid_request_error",
                    "request_too_large",
                )
            except (web.RequestPayloadError, ConnectionResetError):
                # A malformed body (bad chunked encoding, short of its Content-Length) or a client that left
                # mid-body: nothing to forward. A 400, never a 500 (aiohttp would log one as a server error).
                unrouted.error("bad_request")
                unrouted.request(400)
                return error_response(
                    400, "The request body could not be read.", "invalid_request_error", "invalid_body"
                )

            name = request.headers.get(MODEL_HEADER)
            if name is None:
                name, problem = model_from_body(body, request.headers.get("Content-Encoding", "identity"))
                if name is None:
                    unrouted.error("bad_request")
                    unrouted.request(400)
                    return error_response(
                        400,
                        problem,
                        "invalid_request_error",
                        "invalid_json" if problem.startswith("The request body is not") else "model_required",
                    )
            model = self._registry.get(name)
            if model is None:
                unrouted.error("model_not_found")
                unrouted.request(404)
                return self._model_not_found(name)
            if request.method != "POST":  # SPEC §12: only a POST is demand; GETs never wake a model
                return await self._forward(request, model, body, started, stall)
            model.last_request_at = time.time()
            try:
                if self._waker is not None and not model.ready_replicas() and _wakes_on_request(model):
                    try:
                        await self._waker.wait(name)
                    except WakeError as exc:
                        return self._wake_refused(name, exc)
                    model = self._registry.get(name) or model
                    model.last_request_at = time.time()  # it begins on the model now
                return await self._forward(request, model, body, started, stall)
            finally:
                model.last_request_at = time.time()  # the idle clock starts again when the last one ends
        finally:
            stall.cancel()
            if stall.fired:
                unrouted.error("client_timeout")

    async def _read_body(self, request: web.Request, stall: Stall) -> bytes:
        """The whole request body, within max_body; the stall watchdog cuts a client that stops sending."""
        length = request.content_length
        if length is not None and length > self._max_body:
            raise _TooLarge
        if not request.body_exists:
            return b""
        content = request.content
        chunks: list[bytes] = []
        size = 0
        while True:
            stall.waiting()
            chunk = await content.readany()
            if not chunk:
                break
            size += len(chunk)
            if size > self._max_body:  # no Content-Length (chunked): the limit applies while reading
                raise _TooLarge
            chunks.append(chunk)
        stall.done()
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    async def _forward(
        self, request: web.Request, model: Model, body: bytes, started: float, stall: Stall
    ) -> web.StreamResponse:
        """Send the request to the best ready replica; retry others while no byte went to the client."""
        metrics = self._metrics
        pool = self._pool
        assert pool is not None, "the proxy's app was not started"
        # The head is built once; only the Host line differs between attempts.
        start_line = f"{request.method} {request.rel_url.raw_path_qs} HTTP/1.1\r\nHost: 127.0.0.1:".encode(
            "utf-8", "surrogateescape"
        )
        rest = upstream_head_tail(
            request.raw_headers,
            request.headers.getall("Connection", ()),
            method=request.method,
            remote=request.remote,
            scheme=request.scheme,
            body=body,
            drop_authorization=bool(self._keys),
        )
        head_only = request.method == "HEAD"
        excluded: set[int] = set()
        failures: list[str] = []
        while True:
            replica = choose(model, excluded)
            if replica is None:
                return self._no_replica(model.name, failures, metrics)
            series = metrics.series(model.name, replica.index) if metrics is not None else self._null_series
            replica.inflight += 1
            try:
                try:
                    head = b"%s%d\r\n%s" % (start_line, replica.port, rest)
                    upstream = await pool.request(replica.port, head, body, head_only=head_only)
                    # Small answers are read whole, streams up to their first chunk, before anything is sent
                    # to the client: a replica that fails until then costs the client nothing.
                    length = upstream.content_length
                    whole = length is not None and length <= _BUFFER_LIMIT and not head_only
                    try:
                        first = await (upstream.read_all() if whole else upstream.read())
                    except BaseException:
                        upstream.close()
                        raise
                except ConnectFailed as exc:
                    # Nothing reached the replica: it is down or not listening. Take it out and try another.
                    series.error("connect")
                    failures.append(f"replica {replica.index}: {exc}")
                    excluded.add(replica.index)
                    log.warning(
                        "Model %s replica %d: %s Trying another replica.", model.name, replica.index, exc
                    )
                    self._on_connect_failure(replica)
                    continue
                except (NoResponse, ResponseCut) as exc:
                    # The connection broke before the client got anything (e.g. the replica died with the
                    # request in flight): retry elsewhere. Not reported as a connect failure: the next
                    # connection attempt tells whether the replica is really gone.
                    series.error("connect")
                    failures.append(f"replica {replica.index}: {exc}")
                    excluded.add(replica.index)
                    continue
                except UpstreamTimeout:
                    # The replica accepted the request but sent nothing for idle_timeout_sec: it may still be
                    # working on it, so a retry elsewhere could run it twice.
                    series.error("timeout")
                    series.request(504, time.perf_counter() - started)
                    return error_response(
                        504,
                        f"Replica {replica.index} of model '{model.name}' sent no response "
                        "before the proxy's idle timeout.",
                        "server_error",
                        "upstream_timeout",
                    )
                except BrokenResponse as exc:
                    series.error("upstream")
                    series.request(502, time.perf_counter() - started)
                    return error_response(
                        502,
                        f"Replica {replica.index} of model '{model.name}' sent an invalid response: {exc}",
                        "server_error",
                        "upstream_error",
                    )
                return await relay(request, upstream, first, whole, replica, series, started, stall)
            except asyncio.CancelledError:
                series.error("client_disconnect")
                raise
            finally:
                replica.inflight -= 1

    def _wake_refused(self, name: str, exc: WakeError) -> web.Response:
        series = self._metrics.series(name) if self._metrics is not None else self._null_series
        series.error("wake")
        series.request(503)
        return error_response(503, exc.message, "server_error", exc.code, {"Retry-After": str(exc.retry_after_sec)})

    def _no_replica(self, name: str, failures: list[str], metrics: Metrics | None) -> web.Response:
        series = metrics.series(name) if metrics is not None else self._null_series
        if failures:
            series.request(502)
            return error_response(
                502,
                f"No replica of model '{name}' could be reached ({'; '.join(failures)}).",
                "server_error",
                "upstream_unavailable",
            )
        series.error("no_ready_replica")
        series.request(503)
        return error_response(
            503,
            f"Model '{name}' has no ready replica right now; retry shortly.",
            "server_error",
            "no_ready_replica",
            {"Retry-After": "1"},
        )


def _wakes_on_request(model: Model) -> bool:
    """SPEC §12: a request for an idle model (or one going idle, or waking) waits for it to wake."""
    return model.idle or model.operation in (Operation.LOAD, Operation.UNLOAD)


def _listed(model: Model) -> bool:
    """`GET /v1/models` lists models that serve now and idle ones (a request wakes them)."""
    return bool(model.ready_replicas()) or _wakes_on_request(model)


class _TooLarge(Exception):
    """The request body is over max_body."""
