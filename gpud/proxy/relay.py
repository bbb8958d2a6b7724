"""The response half of the proxy: a replica's answer relayed to the client.

Small answers (their body already read whole by the proxy) are written in one go; streams are forwarded chunk
by chunk as they arrive, each client write awaited (backpressure: reading from the replica pauses meanwhile),
under the `Stall` watchdog that cuts a client that stops reading. A stream whose replica fails after bytes
went out must end visibly: an SSE error event when the cut falls between two events, then a connection closed
without the closing chunk, so the client sees an error and never a clean end.
"""

from __future__ import annotations

import logging
import time

from aiohttp import web

from gpud.proxy.guard import Stall
from gpud.proxy.message import response_headers, sse_error_event
from gpud.proxy.metrics import Series
from gpud.proxy.upstream import BrokenResponse, Response, UpstreamTimeout
from gpud.registry import Replica

log = logging.getLogger(__name__)


async def relay(
    request: web.Request,
    upstream: Response,
    first: bytes,
    whole: bool,
    replica: Replica,
    series: Series | NullSeries,
    started: float,
    stall: Stall,
) -> web.StreamResponse:
    """Send the replica's response to the client: `first` is the whole body when `whole`, else its first
    chunk (b"" when it has none); the rest is forwarded chunk by chunk as it arrives."""
    try:
        headers = response_headers(upstream.headers, replica.index)
        if whole:
            series.request(upstream.status, time.perf_counter() - started)
            done = web.Response(status=upstream.status, reason=upstream.reason, body=first, headers=headers)
            await _send(request, done, stall)
            return done

        response = web.StreamResponse(status=upstream.status, reason=upstream.reason, headers=headers)
        if upstream.content_length is not None:
            response.content_length = upstream.content_length
        chunk = first
        if chunk:
            series.ttfb.observe(time.perf_counter() - started)
        last = b""
        try:
            stall.waiting()
            await response.prepare(request)
            while chunk:
                stall.waiting()
                await response.write(chunk)  # waits while the client's socket buffer is full
                last = chunk
                stall.done()
                chunk = await upstream.read()
            stall.waiting()
            await response.write_eof()
            stall.done()
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
            await _cut(request, response, last, replica, stall)
            return response
        series.request(upstream.status, time.perf_counter() - started)
        return response
    finally:
        upstream.release()  # back to the pool if the body was read to its end, else the connection closes

async def _cut(
    request: web.Request, response: web.StreamResponse, last: bytes, replica: Replica, stall: Stall
) -> None:
    """End a response whose replica failed after bytes went out: the client must see an error, not a clean
    end. An SSE stream cut between two events first gets an OpenAI-style error event (what OpenAI's SDKs
    raise as an APIError); then the connection is closed without the closing chunk."""
    content_type = response.headers.get("Content-Type", "")
    if content_type.startswith("text/event-stream") and last.endswith((b"\n\n", b"\r\n\r\n")):
        try:
            stall.waiting()
            await response.write(
                sse_error_event(f"Replica {replica.index} of model '{replica.model}' broke off its response.")
            )
        except ConnectionResetError:
            pass
    # aiohttp's closing write_eof then fails quietly on the closed transport.
    if request.transport is not None:
        request.transport.close()


async def _send(request: web.Request, response: web.Response, stall: Stall) -> None:
    """Write a whole response inside the handler (not after it, as aiohttp would), so that the stall
    watchdog also covers a client that never reads a buffered answer."""
    stall.waiting()
    try:
        await response.prepare(request)
        await response.write_eof()
    except ConnectionResetError:
        pass  # the client went away; aiohttp finishes quietly
    stall.done()


class NullSeries:
    """Stands in for metrics.Series when the proxy runs without metrics."""

    class _NullHistogram:
        def observe(self, amount: float) -> None:
            pass

    ttfb = duration = _NullHistogram()

    def request(self, status: int, seconds: float | None = None) -> None:
        pass

    def error(self, kind: str) -> None:
        pass
