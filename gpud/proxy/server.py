"""The OpenAI-compatible reverse proxy in front of every model's replicas (SPEC §9), as one worker runs it.

A request is routed by its `X-Gpud-Model` header, else by the `"model"` of its JSON body (parsed only when the
header is absent), to the ready replica with the fewest requests in flight over every worker
(gpud.proxy.balancer over gpud.proxy.counters). What the proxy knows of the models is the route table the
daemon pushed (gpud.proxy.table); it never decides a replica's life, it only tells the daemon what it saw
(`Link`: a replica it cannot connect to).

The hot path is lean on purpose (it is benchmarked against nginx and a Rust router): asyncio protocols, a C
HTTP parser, the head to the replica assembled from the raw header bytes and written with the body in one
write, the replica's body relayed as the bytes it sent (gpud.proxy.upstream), flow control by pausing and
resuming the two transports, no per-request objects beyond one task.

Failure rules: nothing is retried once a byte of the response has gone to the client, and everything that
fails before is retried on another ready replica when the replica may simply be gone: the connection could
not be made (the replica is reported, and the supervisor takes it out of rotation until its health check
passes), or it closed before the response head, or before the first bytes of the body (heads are held back
until then, so a replica that dies before its first token costs the client nothing). A replica that stays
silent past `idle_timeout_sec` is not retried (it may still be working on the request): 504. A stream cut
after bytes went out ends with an OpenAI-style error event (for SSE, when the cut falls between events) and
a cut connection, so the client sees an error, never a clean end.

Per-model routes (SPEC §16, the rules in gpud.proxy.paths): `/m/{NAME}/{rest}` is the request `/{rest}` for
model NAME, whatever its header or body say, on the same hot path as every other request; only
`GET /m/{NAME}/health` (no api key: a gateway's first probe carries none) and `/m/{NAME}/v1/models` are
answered by the proxy itself.
"""

from __future__ import annotations

import asyncio
import errno
import hmac
import json
import logging
import time
from collections.abc import Sequence
from typing import Any, Protocol
from urllib.parse import unquote

from gpud.config import ProxySettings
from gpud.errors import GpudError
from gpud.proxy.balancer import choose
from gpud.proxy.connection import ClientConnection, Request
from gpud.proxy.counters import Counters
from gpud.proxy.guard import Refused, auto_max_connections, listen_socket
from gpud.proxy.message import (
    MODEL_HEADER_LOWER,
    NOT_PARSED,
    client_head,
    error_response,
    model_from_body,
    parse_body,
    simple_response,
    sse_error_event,
    upstream_head,
)
from gpud.proxy.metrics import RequestMetrics, Series
from gpud.proxy.paths import PREFIX as PER_MODEL_PREFIX
from gpud.proxy.paths import model_health, split_model_path
from gpud.proxy.routing import (
    SESSION_HEADER,
    PrefixTable,
    SessionTable,
    block_hashes,
    prompt_text,
    session_key,
)
from gpud.proxy.table import ModelRoute, RouteTable
from gpud.proxy.upstream import (
    BrokenResponse,
    ConnectFailed,
    NoResponse,
    Pool,
    ResponseCut,
    ResponseHead,
    UpstreamConnection,
    UpstreamTimeout,
)
from gpud.proxy.wake import WakeError, WakeGate
from gpud.spec import DEFAULT_ROUTING

log = logging.getLogger(__name__)

_GET, _HEAD, _POST = b"GET", b"HEAD", b"POST"
_MODELS_PREFIX = b"/v1/models/"
_PER_MODEL = PER_MODEL_PREFIX.encode()


class Link(Protocol):
    """What a worker tells the daemon."""

    def connect_failed(self, model: str, index: int) -> None:
        """A connection to this replica could not be made: the supervisor should check it now."""

    def wake(self, model: str) -> None:
        """Requests wait for this idle model: wake it (the answer comes as a route table or a failure)."""


class _NoLink:
    def connect_failed(self, model: str, index: int) -> None:
        pass

    def wake(self, model: str) -> None:
        raise RuntimeError("no daemon to wake it")


class Proxy:
    """Routes OpenAI-style requests to the replicas of the route table; see the module docstring."""

    def __init__(self, settings: ProxySettings = ProxySettings(), *,  # noqa: B008 - frozen
                 counters: Counters | None = None, link: Link | None = None,
                 metrics: RequestMetrics | None = None) -> None:
        self.settings = settings
        self.client_timeout = settings.client_timeout_sec
        self.max_body = settings.max_body_bytes
        self.counters = counters or Counters.local()
        self.link: Link = link or _NoLink()
        self.metrics = metrics or RequestMetrics()
        self.table = RouteTable()
        self._keys = tuple(k.encode() for k in settings.api_keys if k)
        # SPEC §13: this worker's tables (each worker keeps its own).
        self.sessions = SessionTable()
        self.prefixes = PrefixTable(settings.prefix_table_blocks)
        # SPEC §12: requests for an idle model wait here for its wake (one wake asked of the daemon per model).
        self.gate = WakeGate(self.link.wake, timeout_sec=settings.wake_timeout_sec, max_waiting=settings.wake_queue)
        self._unrouted = self.metrics.series("")
        self._pool: Pool | None = None
        self._server: asyncio.Server | None = None
        self._connections: set[ClientConnection] = set()
        self.max_connections = 0

    # -- lifecycle ---------------------------------------------------------------------------------------

    def set_table(self, table: RouteTable) -> None:
        if set(table.models) != set(self.table.models):
            self.metrics.forget(table.models)
        self.table = table
        for name in self.gate.waking():  # a woken model's first ready replica lets its requests through
            route = table.models.get(name)
            if route is None:
                self.gate.changed(name, ready=False, failure=f"Model '{name}' was stopped.")
            elif route.ready:
                self.gate.changed(name, ready=True)

    async def start(self, host: str, port: int, *, reuse_port: bool = False) -> None:
        """Listen on host:port; a GpudError says why when the address cannot be bound."""
        loop = asyncio.get_running_loop()
        self._pool = Pool(idle_timeout=self.settings.idle_timeout_sec)
        self.max_connections = self.settings.max_connections or auto_max_connections()
        try:
            sock = listen_socket(host, port, reuse_port=reuse_port)
        except OSError as exc:
            raise bind_error(host, port, exc) from None
        self._server = await loop.create_server(self._accept, sock=sock)

    async def stop_accepting(self) -> None:
        """Shutdown begins: no new connections; the open ones are served until they close."""
        if self._server is not None:
            self._server.close()

    async def close(self) -> None:
        """Stop listening, close the client connections and the connections to the replicas."""
        if self._server is not None:
            self._server.close()
            self._server = None
        for conn in list(self._connections):
            conn.abort()
        if self._pool is not None:
            pool, self._pool = self._pool, None
            await pool.close()

    @property
    def address(self) -> tuple[str, int]:
        if self._server is None or not self._server.sockets:
            raise GpudError("The proxy is not listening.")
        host, port = self._server.sockets[0].getsockname()[:2]
        return host, port

    def _accept(self) -> ClientConnection | Refused:
        if len(self._connections) >= self.max_connections:
            return Refused(lambda: self._unrouted.error("too_many_connections"))
        conn = ClientConnection(self)
        self._connections.add(conn)
        return conn

    # -- connection hooks --------------------------------------------------------------------------------

    def closed(self, conn: ClientConnection) -> None:
        self._connections.discard(conn)

    def client_timed_out(self) -> None:
        self._unrouted.error("client_timeout")

    def rejected(self, status: int, kind: str) -> None:
        """The connection answered a request it could not read (or would not read whole) itself."""
        self._unrouted.error(kind)
        self._unrouted.request(status)

    async def handle(self, conn: ClientConnection, request: Request) -> None:
        started = time.perf_counter()
        method, path = request.method, request.target.partition(b"?")[0]
        keep = request.keep_alive
        if path.startswith(_PER_MODEL):
            await self._per_model(conn, request, started)
            return
        if method in (_GET, _HEAD):
            local = self._local(request, path)
            if local is not None:
                conn.write(local if method == _GET else _head_of(local))
                conn.finish(keep)
                return
        if self._keys and not self._authorized(request):
            self._refuse(conn, request, self._unauthorized())
            return
        name, doc = self._model_name(request)
        if name is None:  # the request names no model: `doc` is the error answer
            self._unrouted.error("bad_request")
            self._unrouted.request(400)
            self._refuse(conn, request, doc)
            return
        route = self.table.models.get(name)
        if route is None:
            self._unrouted.error("model_not_found")
            self._unrouted.request(404)
            self._refuse(conn, request, _model_not_found(name))
            return
        await self._forward(conn, request, route, started, doc)

    async def _per_model(self, conn: ClientConnection, request: Request, started: float) -> None:
        """`/m/{NAME}/{rest}`: the model's health and model list here, anything else forwarded as `/{rest}`."""
        routed = split_model_path(request.target.decode("latin-1"))
        assert routed is not None  # the caller saw the prefix
        name, rest = routed
        route = self.table.models.get(name)
        if request.method in (_GET, _HEAD):
            bare = rest.partition("?")[0]
            if bare == "/health":
                health = model_health(name, route.state if route is not None else None,
                                      len(route.ready) if route is not None else 0)
                answer = simple_response(health.status, json.dumps(health.body).encode(),
                                         keep_alive=request.keep_alive)
                self._refuse(conn, request, answer if request.method == _GET else _head_of(answer))
                return
            if bare == "/v1/models":
                if self._keys and not self._authorized(request):
                    self._refuse(conn, request, self._unauthorized())
                    return
                body = {"object": "list", "data": [_model_object(route)] if route is not None else []}
                answer = simple_response(200, json.dumps(body).encode(), keep_alive=request.keep_alive) \
                    if route is not None else _model_not_found(name)
                self._refuse(conn, request, answer if request.method != _HEAD else _head_of(answer))
                return
        if self._keys and not self._authorized(request):
            self._refuse(conn, request, self._unauthorized())
            return
        if route is None:
            self._unrouted.error("model_not_found")
            self._unrouted.request(404)
            self._refuse(conn, request, _model_not_found(name))
            return
        await self._forward(conn, request, route, started, NOT_PARSED, rest.encode("latin-1"))

    # -- local routes ------------------------------------------------------------------------------------

    def _local(self, request: Request, path: bytes) -> bytes | None:
        """The answer to a GET the proxy makes itself, or None to forward it."""
        if path == b"/health":
            return simple_response(200, b'{"status":"ok"}', keep_alive=request.keep_alive)
        if path not in (b"/metrics", b"/v1/models") and not (
                path.startswith(_MODELS_PREFIX) and request.header(MODEL_HEADER_LOWER) is None):
            return None
        if self._keys and not self._authorized(request):
            return self._unauthorized()
        if path == b"/metrics":
            body, content_type = self.metrics.render(self.table, self.counters)
            return simple_response(200, body, content_type=content_type.encode(), keep_alive=request.keep_alive)
        if path == b"/v1/models":  # SPEC §12: idle models are listed too (a request wakes them)
            data = [_model_object(m) for m in self.table.models.values() if m.ready or m.waits]
            return simple_response(200, json.dumps({"object": "list", "data": data}).encode(),
                                   keep_alive=request.keep_alive)
        name = unquote(path[len(_MODELS_PREFIX):].decode("utf-8", "replace"))
        route = self.table.models.get(name)
        if route is None or not (route.ready or route.waits):
            return _model_not_found(name)
        return simple_response(200, json.dumps(_model_object(route)).encode(), keep_alive=request.keep_alive)

    def _model_name(self, request: Request) -> tuple[str, Any] | tuple[None, bytes]:
        """(the model a request is for, its parsed body when it had to be parsed for that, else NOT_PARSED),
        or (None, the error answer that says why there is none)."""
        header = request.header(MODEL_HEADER_LOWER)
        if header is not None:
            return header.decode("utf-8", "replace"), NOT_PARSED
        name, problem, doc = model_from_body(request.body, request.header(b"content-encoding"))
        if name is not None:
            return name, doc
        code = "invalid_json" if problem.startswith("The request body is not") else "model_required"
        return None, error_response(400, problem, "invalid_request_error", code)

    def _route_key(self, request: Request, route: ModelRoute, doc: Any) -> Any:
        """What the model's policy routes by: a session key, the prompt's block hashes, or None (least-conn).
        The body is parsed here only for a policy that needs it and was not parsed for the model's name."""
        policy = route.routing
        if policy == "session":
            header = request.header(SESSION_HEADER)
            if header is None and doc is NOT_PARSED:
                doc = parse_body(request.body, request.header(b"content-encoding"))
            key = session_key(header, doc)
            return None if key is None else (route.name, key)
        if policy == "prefix":
            if doc is NOT_PARSED:
                doc = parse_body(request.body, request.header(b"content-encoding"))
            text = prompt_text(doc)
            return block_hashes(route.name, text) if text else []
        return None

    def _authorized(self, request: Request) -> bool:
        scheme, _, token = (request.header(b"authorization") or b"").partition(b" ")
        given = token.strip() if scheme.lower() == b"bearer" else b""
        ok = False
        for key in self._keys:  # every key is compared, so timing does not tell which one almost matched
            ok |= hmac.compare_digest(given, key)
        return ok

    def _unauthorized(self) -> bytes:
        self._unrouted.error("unauthorized")
        return error_response(401, "Missing or invalid API key: send Authorization: Bearer KEY.",
                              "invalid_request_error", "invalid_api_key", ((b"WWW-Authenticate", b"Bearer"),))

    @staticmethod
    def _refuse(conn: ClientConnection, request: Request, answer: bytes) -> None:
        conn.write(answer)
        conn.finish(request.keep_alive)

    # -- forwarding --------------------------------------------------------------------------------------

    async def _forward(self, conn: ClientConnection, request: Request, route: ModelRoute, started: float,
                       doc: Any, target: bytes | None = None) -> None:
        """Send the request (as `target`, else as it came) to the best ready replica; retry others while no
        byte went to the client. A POST for a model that is idle (or waking) waits for its wake first."""
        if not route.ready and route.waits and request.method == _POST:
            woken = await self._wait_for_wake(conn, request, route)
            if woken is None:
                return
            route = woken
        pool = self._pool
        assert pool is not None, "the proxy was not started"
        counters = self.counters
        demand = request.method == _POST  # SPEC §12: only POSTs keep a model awake
        start, rest = upstream_head(request.method, target or request.target, 0, request.headers, remote=conn.remote,
                                    body_length=len(request.body), drop_authorization=bool(self._keys))
        head_only = request.method == _HEAD
        decode = not request.http11  # an HTTP/1.0 client cannot take a chunked body
        excluded: set[int] = set()
        failures: list[str] = []
        policy = route.routing
        table: SessionTable | PrefixTable | None = None
        key = None
        if policy != DEFAULT_ROUTING and route.ready:
            table = self.sessions if policy == "session" else self.prefixes
            key = self._route_key(request, route, doc)
        while True:
            if excluded:  # a retry goes by the table as it is now: a replica withdrawn meanwhile is not tried
                current = self.table.models.get(route.name)
                if current is None:
                    self._no_replica(conn, request, route.name, failures)
                    return
                route = current
            if table is not None and not excluded:  # the policy's choice; a retry goes by least connections
                replica, cursor, outcome = table.choose(key, route.ready, counters.inflight,  # type: ignore[arg-type]
                                                        counters.cursor(route.slot))
                self.metrics.route(route.name, policy, outcome.value)
            else:
                replica, cursor = choose(route.ready, counters.inflight, counters.cursor(route.slot), excluded)
            if replica is None:
                self._no_replica(conn, request, route.name, failures)
                return
            counters.set_cursor(route.slot, cursor)
            series = self.metrics.series(route.name, replica.index)
            counters.started(replica.slot)
            if demand:
                counters.requested(route.slot, time.time())
            try:
                try:
                    upstream, head = await pool.request(replica.port, b"%s%d%s" % (start, replica.port, rest),
                                                        request.body, head_only=head_only, decode=decode)
                except ConnectFailed as exc:
                    # Nothing reached the replica: it is down or not listening. Take it out and try another.
                    series.error("connect")
                    failures.append(f"replica {replica.index}: {exc}")
                    excluded.add(replica.index)
                    log.warning("Model %s replica %d: %s Trying another replica.", route.name, replica.index, exc)
                    self.link.connect_failed(route.name, replica.index)
                    continue
                except (NoResponse, ResponseCut) as exc:
                    # The connection broke before the client got anything (the replica died with the request in
                    # flight): retry elsewhere. Not reported: the next connection attempt tells whether it is gone.
                    series.error("connect")
                    failures.append(f"replica {replica.index}: {exc}")
                    excluded.add(replica.index)
                    continue
                except UpstreamTimeout:
                    # It accepted the request but sent nothing: it may still be working on it, so a retry
                    # elsewhere could run it twice.
                    series.error("timeout")
                    series.request(504, time.perf_counter() - started)
                    self._refuse(conn, request, error_response(
                        504, f"Replica {replica.index} of model '{route.name}' sent no response before the proxy's "
                        "idle timeout.", "server_error", "upstream_timeout"))
                    return
                except BrokenResponse as exc:
                    series.error("upstream")
                    series.request(502, time.perf_counter() - started)
                    self._refuse(conn, request, error_response(
                        502, f"Replica {replica.index} of model '{route.name}' sent an invalid response: {exc}",
                        "server_error", "upstream_error"))
                    return
                if table is not None:
                    table.served(key, replica.index)  # type: ignore[arg-type]  # the key follows the replica
                await self._relay(conn, request, upstream, head, replica.index, route.name, series, started, decode)
                return
            except asyncio.CancelledError:
                series.error("client_disconnect")
                raise
            finally:
                counters.finished(replica.slot)
                if demand:
                    counters.requested(route.slot, time.time())

    async def _relay(self, conn: ClientConnection, request: Request, upstream: UpstreamConnection,
                     head: ResponseHead, index: int, model: str, series: Series, started: float,
                     decode: bool) -> None:
        """The replica's answer to the client: the head and the first bytes at once, the rest as it arrives."""
        client, keep = client_head(head.status, head.reason, head.headers, index, head.framing, head.content_length,
                                   decoded=decode, keep_alive=request.keep_alive)
        first = upstream.first
        if upstream.complete:  # the usual small JSON answer: one write
            conn.write(client + first)
            upstream.release()
            series.request(head.status, time.perf_counter() - started)
            conn.finish(keep)
            return
        # The relay's source is known before the first write: a client that cannot take even that pauses it.
        conn.upstream = upstream
        conn.write(client + first if first else client)
        if first:
            series.ttfb.observe(time.perf_counter() - started)
        upstream.last = first
        try:
            await upstream.relay(conn)
        except (BrokenResponse, UpstreamTimeout) as exc:
            series.error("timeout" if isinstance(exc, UpstreamTimeout) else "upstream")
            series.request(head.status, time.perf_counter() - started)
            log.warning("Model %s replica %d broke off a streamed response: %s", model, index, exc)
            self._cut(conn, upstream, head.headers, index, model, decode)
            return
        except BaseException:
            upstream.abort()  # the client went away: the replica sees the connection close and stops
            raise
        if decode:
            conn.finish(False)  # the body's end is the connection's close
        else:
            conn.finish(keep)
        upstream.release()
        series.request(head.status, time.perf_counter() - started)

    def _cut(self, conn: ClientConnection, upstream: UpstreamConnection, headers: Sequence[tuple[bytes, bytes]],
             index: int, model: str, decode: bool) -> None:
        """End a response whose replica failed after bytes went out: the client must see an error, not a clean
        end. An SSE stream cut between two events first gets an OpenAI-style error event (what OpenAI's SDKs
        raise as an APIError); then the connection is closed without the closing chunk."""
        content_type = next((v for n, v in headers if n.lower() == b"content-type"), b"")
        last = upstream.last
        between = not upstream.in_chunk and last.endswith(b"\n\n" if decode else b"\n\n\r\n")
        if content_type.startswith(b"text/event-stream") and between:
            event = sse_error_event(f"Replica {index} of model '{model}' broke off its response.")
            conn.write(event if decode else b"%x\r\n%s\r\n" % (len(event), event))
        upstream.abort()
        conn.finish(False)

    async def _wait_for_wake(self, conn: ClientConnection, request: Request, route: ModelRoute) -> ModelRoute | None:
        """Hold the request until the model has a ready replica (SPEC §12); None when it was answered (503)."""
        try:
            await self.gate.wait(route.name)
        except WakeError as exc:
            series = self.metrics.series(route.name)
            series.error("wake")
            series.request(503)
            self._refuse(conn, request, error_response(
                503, exc.message, "server_error", exc.code, ((b"Retry-After", b"%d" % exc.retry_after_sec),)))
            return None
        woken = self.table.models.get(route.name)
        if woken is None:
            self._refuse(conn, request, _model_not_found(route.name))
        return woken

    def _no_replica(self, conn: ClientConnection, request: Request, name: str, failures: list[str]) -> None:
        series = self.metrics.series(name)
        if failures:
            series.request(502)
            answer = error_response(502, f"No replica of model '{name}' could be reached ({'; '.join(failures)}).",
                                    "server_error", "upstream_unavailable")
        else:
            series.error("no_ready_replica")
            series.request(503)
            answer = error_response(503, f"Model '{name}' has no ready replica right now; retry shortly.",
                                    "server_error", "no_ready_replica", ((b"Retry-After", b"1"),))
        self._refuse(conn, request, answer)


def bind_error(host: str, port: int, exc: OSError) -> GpudError:
    if exc.errno == errno.EADDRINUSE:
        return GpudError(f"Cannot listen on {host}:{port} for the proxy: the address is already in use "
                         "(another gpud or server?); choose another with --listen.")
    return GpudError(f"Cannot listen on {host}:{port} for the proxy: {exc.strerror or exc}.")


def _head_of(answer: bytes) -> bytes:
    """A whole answer without its body (for HEAD)."""
    return answer.partition(b"\r\n\r\n")[0] + b"\r\n\r\n"


def _model_object(route: ModelRoute) -> dict[str, object]:
    return {"id": route.name, "object": "model", "created": int(route.created), "owned_by": "gpud"}


def _model_not_found(name: str) -> bytes:
    shown = name if len(name) <= 200 else name[:200] + "…"
    return error_response(404, f"The model '{shown}' does not exist or is not running on this gpud.",
                          "invalid_request_error", "model_not_found")
