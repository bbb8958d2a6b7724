"""The OpenAI-compatible reverse proxy in front of every model's replicas (SPEC §9).

A request is routed by its `X-Gpud-Model` header, else by the `"model"` of its JSON body (parsed only when the
header is absent), to the ready replica with the fewest in-flight requests (`gpud.balancer.choose`). The
registry is read directly on every request: same process, no polling, no second copy of the state.

Performance matters (it is benchmarked against nginx): the hop to the replicas goes through one shared
keep-alive pool of gpud.upstream (a lean HTTP/1.1 client: aiohttp's generic ClientSession cost ~40 % of the
proxy's CPU), the request head is assembled from the raw header bytes, small responses are sent in one
write, and nothing is decoded that does not have to be. Streams (SSE, chunked) are forwarded chunk by chunk
as they arrive, awaiting each client write (backpressure), with an idle read timeout instead of a total
one. `start()` runs the server with handler cancellation on, so a client that goes away cancels its handler
at once, which closes the connection to the replica, which then stops generating.

Failure rules: a connection failure before any response byte is retried on another ready replica (the
failed one is reported through `on_connect_failure`, which the supervisor uses to take it out of rotation
until its health check passes); once the response has started, nothing is retried: the client connection
is cut so the client sees a truncated response instead of a clean end.
"""

from __future__ import annotations

import asyncio
import errno
import hmac
import json
import logging
import time
from collections.abc import Callable, Sequence

from aiohttp import web
from multidict import CIMultiDict

from gpud.balancer import choose
from gpud.errors import GpudError
from gpud.metrics import Metrics, Series
from gpud.registry import Model, Registry, Replica
from gpud.upstream import BrokenResponse, ConnectFailed, NoResponse, Pool, Response, UpstreamTimeout

log = logging.getLogger(__name__)

MODEL_HEADER = "X-Gpud-Model"
REPLICA_HEADER = "X-Gpud-Replica"
# RFC 9110 §7.6.1 hop-by-hop fields (plus the non-standard Proxy-Connection); the ones named by a
# Connection header are dropped as well, per message.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "proxy-authorization",
        "proxy-authenticate",
    }
)
# Host is rewritten for the replica, Content-Length recomputed from the buffered body, and Expect was already
# answered by this server; X-Forwarded-* are set below. Request headers are filtered as raw bytes.
_REQUEST_DROP = frozenset(
    h.encode()
    for h in HOP_BY_HOP | {"host", "content-length", "expect", "x-forwarded-for", "x-forwarded-proto"}
)
_RESPONSE_DROP = HOP_BY_HOP | {"content-length"}
# Responses up to this size with a Content-Length are read whole and sent in one write (fewer syscalls and
# task switches for the common small JSON answer); anything else is streamed.
_BUFFER_LIMIT = 256 * 1024
_BODYLESS_METHODS = frozenset({"GET", "HEAD", "DELETE", "OPTIONS", "TRACE"})


def _error(
    status: int, message: str, type_: str, code: str, headers: dict[str, str] | None = None
) -> web.Response:
    """An OpenAI-style error answer."""
    body = json.dumps({"error": {"message": message, "type": type_, "param": None, "code": code}})
    return web.Response(status=status, body=body.encode(), content_type="application/json", headers=headers)


def _connection_tokens(values: Sequence[str]) -> frozenset[str]:
    """The field names a Connection header lists: hop-by-hop for this message too."""
    return frozenset(t.strip().lower() for v in values for t in v.split(",") if t.strip())


class Proxy:
    """Routes OpenAI-style requests to the replicas in the registry; see the module docstring."""

    def __init__(
        self,
        registry: Registry,
        *,
        api_keys: Sequence[str] = (),
        max_body_bytes: int = 32 * 2**20,
        metrics: Metrics | None = None,
        on_connect_failure: Callable[[Replica], None] = lambda r: None,
        idle_timeout_sec: float = 300.0,
    ) -> None:
        self._registry = registry
        self._keys = tuple(k.encode() for k in api_keys if k)
        self._max_body = max_body_bytes
        self._metrics = metrics
        self._on_connect_failure = on_connect_failure
        self._idle_timeout = idle_timeout_sec
        self._pool: Pool | None = None
        self._runner: web.AppRunner | None = None
        # Used when no Metrics object is given, so the hot path never branches on it.
        self._null_series = _NullSeries()

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
        runner = web.AppRunner(self.make_app(), access_log=None, handler_cancellation=True)
        await runner.setup()
        try:
            await web.TCPSite(runner, host, port, backlog=1024).start()
        except OSError as exc:
            await runner.cleanup()
            if exc.errno == errno.EADDRINUSE:
                raise GpudError(
                    f"Cannot listen on {host}:{port} for the proxy: the address is already in use "
                    "(another gpud or server?); choose another with --listen."
                ) from None
            raise GpudError(f"Cannot listen on {host}:{port} for the proxy: {exc.strerror or exc}.") from None
        self._runner = runner

    async def close(self) -> None:
        """Stop listening and close the connections to the replicas."""
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()
        await self._close_pool()

    @property
    def address(self) -> tuple[str, int]:
        if self._runner is None or not self._runner.addresses:
            raise GpudError("The proxy is not listening.")
        host, port = self._runner.addresses[0][:2]
        return host, port

    async def _open_pool(self, app: web.Application | None = None) -> None:
        if self._pool is None:
            self._pool = Pool(idle_timeout=self._idle_timeout)

    async def _close_pool(self, app: web.Application | None = None) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            await pool.close()

    # -- local routes ------------------------------------------------------------------------------------

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
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
        data = [self._model_object(m.name, m.created_at) for m in self._registry if m.ready_replicas()]
        return web.json_response({"object": "list", "data": data})

    async def _get_model(self, request: web.Request, name: str) -> web.StreamResponse:
        if self._keys and not self._authorized(request):
            return self._unauthorized()
        model = self._registry.get(name)
        if model is None or not model.ready_replicas():
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
        return _error(
            401,
            "Missing or invalid API key: send Authorization: Bearer KEY.",
            "invalid_request_error",
            "invalid_api_key",
            {"WWW-Authenticate": "Bearer"},
        )

    def _model_not_found(self, name: str) -> web.Response:
        shown = name if len(name) <= 200 else name[:200] + "…"
        return _error(
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
        length = request.content_length
        try:
            if length is not None and length > self._max_body:
                raise web.HTTPRequestEntityTooLarge(max_size=self._max_body, actual_size=length)
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            unrouted.error("too_large")
            unrouted.request(413)
            return _error(
                413,
                f"The request body is larger than the proxy's limit of {self._max_body} bytes.",
                "invalid_request_error",
                "request_too_large",
            )

        name = request.headers.get(MODEL_HEADER)
        if name is None:
            name, problem = _model_from_body(body)
            if name is None:
                unrouted.error("bad_request")
                unrouted.request(400)
                return _error(
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
        return await self._forward(request, model, body, started)

    async def _forward(
        self, request: web.Request, model: Model, body: bytes, started: float
    ) -> web.StreamResponse:
        """Send the request to the best ready replica; retry others while no response byte came back."""
        metrics = self._metrics
        pool = self._pool
        assert pool is not None, "the proxy's app was not started"
        # The head is built once; only the Host line differs between attempts.
        start_line = f"{request.method} {request.rel_url.raw_path_qs} HTTP/1.1\r\nHost: 127.0.0.1:".encode(
            "utf-8", "surrogateescape"
        )
        rest = self._upstream_head_tail(request, body)
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
                except NoResponse as exc:
                    # The connection broke before any response byte (e.g. the replica died with the request
                    # in flight): retry elsewhere. Not reported as a connect failure: the next connection
                    # attempt tells whether the replica is really gone.
                    series.error("connect")
                    failures.append(f"replica {replica.index}: {exc}")
                    excluded.add(replica.index)
                    continue
                except UpstreamTimeout:
                    # The replica accepted the request but sent nothing for idle_timeout_sec: it may still be
                    # working on it, so a retry elsewhere could run it twice.
                    series.error("timeout")
                    series.request(504, time.perf_counter() - started)
                    return _error(
                        504,
                        f"Replica {replica.index} of model '{model.name}' sent no response "
                        "before the proxy's idle timeout.",
                        "server_error",
                        "upstream_timeout",
                    )
                except BrokenResponse as exc:
                    series.error("upstream")
                    series.request(502, time.perf_counter() - started)
                    return _error(
                        502,
                        f"Replica {replica.index} of model '{model.name}' sent an invalid response: {exc}",
                        "server_error",
                        "upstream_error",
                    )
                return await self._respond(request, upstream, replica, series, started)
            except asyncio.CancelledError:
                series.error("client_disconnect")
                raise
            finally:
                replica.inflight -= 1

    def _no_replica(self, name: str, failures: list[str], metrics: Metrics | None) -> web.Response:
        series = metrics.series(name) if metrics is not None else self._null_series
        if failures:
            series.request(502)
            return _error(
                502,
                f"No replica of model '{name}' could be reached ({'; '.join(failures)}).",
                "server_error",
                "upstream_unavailable",
            )
        series.error("no_ready_replica")
        series.request(503)
        return _error(
            503,
            f"Model '{name}' has no ready replica right now; retry shortly.",
            "server_error",
            "no_ready_replica",
            {"Retry-After": "1"},
        )

    def _upstream_head_tail(self, request: web.Request, body: bytes) -> bytes:
        """The request head after the Host line: the client's end-to-end fields as raw bytes, X-Forwarded-*,
        Content-Length, and the blank line."""
        drop = _REQUEST_DROP
        connection = request.headers.getall("Connection", ())
        if connection:
            drop = drop | {t.encode("latin-1", "replace") for t in _connection_tokens(connection)}
        if self._keys:  # the bearer key is gpud's own; the replica must not see it
            drop = drop | {b"authorization"}
        parts: list[bytes] = []
        for name, value in request.raw_headers:
            if name.lower() not in drop:
                parts += (name, b": ", value, b"\r\n")
        remote = (request.remote or "").encode()
        prior = b", ".join(v for n, v in request.raw_headers if n.lower() == b"x-forwarded-for")
        parts += (
            b"X-Forwarded-For: ",
            prior + b", " + remote if prior else remote,
            b"\r\n",
            b"X-Forwarded-Proto: ",
            request.scheme.encode(),
            b"\r\n",
        )
        if body or request.method not in _BODYLESS_METHODS:
            parts.append(b"Content-Length: %d\r\n" % len(body))
        parts.append(b"\r\n")
        return b"".join(parts)

    async def _respond(
        self,
        request: web.Request,
        upstream: Response,
        replica: Replica,
        series: Series | _NullSeries,
        started: float,
    ) -> web.StreamResponse:
        """Send the replica's response to the client: small ones whole, the rest chunk by chunk."""
        try:
            headers = _response_headers(upstream, replica.index)
            length = upstream.content_length
            if length is not None and length <= _BUFFER_LIMIT and request.method != "HEAD":
                try:
                    payload = await upstream.read_all()
                except (BrokenResponse, UpstreamTimeout) as exc:
                    # The replica started answering then failed; it may have acted on the request: no retry.
                    series.error("timeout" if isinstance(exc, UpstreamTimeout) else "upstream")
                    series.request(502, time.perf_counter() - started)
                    return _error(
                        502,
                        f"Replica {replica.index} of model '{replica.model}' broke off its response: {exc}",
                        "server_error",
                        "upstream_error",
                    )
                series.request(upstream.status, time.perf_counter() - started)
                return web.Response(
                    status=upstream.status, reason=upstream.reason, body=payload, headers=headers
                )

            response = web.StreamResponse(status=upstream.status, reason=upstream.reason, headers=headers)
            if length is not None:
                response.content_length = length
            await response.prepare(request)
            first = True
            try:
                while chunk := await upstream.read():
                    if first:
                        series.ttfb.observe(time.perf_counter() - started)
                        first = False
                    await response.write(chunk)  # waits while the client's socket buffer is full
            except ConnectionResetError:  # the client went away mid-stream (includes aiohttp's own subclass)
                series.error("client_disconnect")
                series.request(upstream.status)
                return response
            except (BrokenResponse, UpstreamTimeout) as exc:
                series.error("timeout" if isinstance(exc, UpstreamTimeout) else "upstream")
                series.request(upstream.status, time.perf_counter() - started)
                log.warning(
                    "Model %s replica %d broke off a streamed response: %s", replica.model, replica.index, exc
                )
                # Bytes already reached the client: cut its connection so it sees a truncated response
                # rather than a clean end; aiohttp's closing write_eof then fails quietly.
                if request.transport is not None:
                    request.transport.close()
                return response
            await response.write_eof()
            series.request(upstream.status, time.perf_counter() - started)
            return response
        finally:
            upstream.release()  # back to the pool if the body was read to its end, else the connection closes


def _response_headers(upstream: Response, index: int) -> CIMultiDict[str]:
    drop = _RESPONSE_DROP
    connection = [v for k, v in upstream.headers if k.lower() == "connection"]
    if connection:
        drop = drop | _connection_tokens(connection)
    out: CIMultiDict[str] = CIMultiDict()
    for key, value in upstream.headers:
        if key.lower() not in drop:
            out.add(key, value)
    out[REPLICA_HEADER] = str(index)
    return out


def _model_from_body(body: bytes) -> tuple[str | None, str]:
    """The JSON body's "model", or None and the sentence that says what is wrong with the request."""
    if not body:
        return (
            None,
            f'No model given: set the {MODEL_HEADER} header or send a JSON body with a "model" field.',
        )
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError; deep nesting a RecursionError
        return None, "The request body is not valid JSON."
    model = doc.get("model") if isinstance(doc, dict) else None
    if not isinstance(model, str) or not model:
        return (
            None,
            f'No model given: the JSON body needs a "model" string (or set the {MODEL_HEADER} header).',
        )
    return model, ""


class _NullSeries:
    """Stands in for metrics.Series when the proxy runs without metrics."""

    class _NullHistogram:
        def observe(self, amount: float) -> None:
            pass

    ttfb = duration = _NullHistogram()

    def request(self, status: int, seconds: float | None = None) -> None:
        pass

    def error(self, kind: str) -> None:
        pass
