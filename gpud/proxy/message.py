"""The proxy's HTTP message rules, apart from any I/O: which header fields cross the proxy, the heads sent to a
replica and to a client, the OpenAI-style error answers, and how the model is found in a request body.

Everything works on bytes as they came off the wire, so that no field is decoded that does not have to be.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import Any

from gpud.proxy.upstream import Framing

MODEL_HEADER = "X-Gpud-Model"
REPLICA_HEADER = "X-Gpud-Replica"
MODEL_HEADER_LOWER = MODEL_HEADER.lower().encode()
# RFC 9110 §7.6.1 hop-by-hop fields (plus the non-standard Proxy-Connection); the ones named by a
# Connection header are dropped as well, per message.
HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer", b"transfer-encoding", b"upgrade",
    b"proxy-authorization", b"proxy-authenticate",
})
# Host is rewritten for the replica, Content-Length recomputed from the buffered body, and Expect was already
# answered by the proxy; X-Forwarded-* are set below.
_REQUEST_DROP = HOP_BY_HOP | {b"host", b"content-length", b"expect", b"x-forwarded-for", b"x-forwarded-proto"}
_RESPONSE_DROP = HOP_BY_HOP | {b"content-length"}
_BODYLESS_METHODS = frozenset({b"GET", b"HEAD", b"DELETE", b"OPTIONS", b"TRACE"})
_REASONS = {200: b"OK", 400: b"Bad Request", 401: b"Unauthorized", 404: b"Not Found", 405: b"Method Not Allowed",
            413: b"Payload Too Large", 431: b"Request Header Fields Too Large", 500: b"Internal Server Error",
            502: b"Bad Gateway", 503: b"Service Unavailable", 504: b"Gateway Timeout"}


def connection_tokens(values: Iterable[bytes]) -> frozenset[bytes]:
    """The field names a Connection header lists: hop-by-hop for this message too."""
    return frozenset(t.strip().lower() for v in values for t in v.split(b",") if t.strip())


def upstream_head(
    method: bytes,
    target: bytes,
    port: int,
    headers: Sequence[tuple[bytes, bytes]],
    *,
    remote: bytes,
    body_length: int,
    drop_authorization: bool,
) -> tuple[bytes, bytes]:
    """The request head for a replica, as (start line and Host up to the port, the rest): only the port
    differs between attempts, so the caller joins `start + b"%d" % port + rest`.

    The client's end-to-end fields pass as raw bytes; X-Forwarded-For/Proto and Content-Length are added.
    `drop_authorization`: the bearer key is gpud's own, and the replica must not see it."""
    drop = _REQUEST_DROP
    connection = [v for n, v in headers if n.lower() == b"connection"]
    if connection:
        drop = drop | connection_tokens(connection)
    if drop_authorization:
        drop = drop | {b"authorization"}
    parts: list[bytes] = [b"\r\n"]
    prior: list[bytes] = []
    for name, value in headers:
        lower = name.lower()
        if lower not in drop:
            parts += (name, b": ", value, b"\r\n")
        elif lower == b"x-forwarded-for":
            prior.append(value)
    parts += (b"X-Forwarded-For: ", b", ".join(prior) + b", " + remote if prior else remote,
              b"\r\nX-Forwarded-Proto: http\r\n")
    if body_length or method not in _BODYLESS_METHODS:
        parts.append(b"Content-Length: %d\r\n" % body_length)
    parts.append(b"\r\n")
    return b"%s %s HTTP/1.1\r\nHost: 127.0.0.1:" % (method, target), b"".join(parts)


def client_head(
    status: int,
    reason: bytes,
    headers: Iterable[tuple[bytes, bytes]],
    replica: int,
    framing: Framing,
    content_length: int | None,
    *,
    decoded: bool,
    keep_alive: bool,
) -> tuple[bytes, bool]:
    """The response head for the client, and whether the client connection can stay open after it.

    The body goes on as the replica framed it: a chunked body stays chunked (unless `decoded`: an HTTP/1.0
    client gets the decoded data, ended by closing the connection), a Content-Length stays, a body ended by
    the replica's close ends with ours."""
    headers = list(headers)
    drop = _RESPONSE_DROP
    connection = [v for n, v in headers if n.lower() == b"connection"]
    if connection:
        drop = drop | connection_tokens(connection)
    parts = [b"HTTP/1.1 %d %s\r\n" % (status, reason or _REASONS.get(status, b"Unknown"))]
    for name, value in headers:
        if name.lower() not in drop:
            parts += (name, b": ", value, b"\r\n")
    parts.append(b"%s: %d\r\n" % (REPLICA_HEADER.encode(), replica))
    if framing is Framing.CHUNKED and not decoded:
        parts.append(b"Transfer-Encoding: chunked\r\n")
    elif content_length is not None and framing in (Framing.LENGTH, Framing.NONE):
        parts.append(b"Content-Length: %d\r\n" % content_length)
    elif framing is Framing.NONE and status not in (204, 304):  # RFC 9110 §8.6: never on a 204 (or a 304's own)
        parts.append(b"Content-Length: 0\r\n")
    else:
        keep_alive = False  # the body ends when the connection does
    if not keep_alive:
        parts.append(b"Connection: close\r\n")
    parts.append(b"\r\n")
    return b"".join(parts), keep_alive


def error_body(message: str, type_: str, code: str) -> bytes:
    """OpenAI's error object, as JSON."""
    return json.dumps({"error": {"message": message, "type": type_, "param": None, "code": code}}).encode()


def simple_response(status: int, body: bytes, *, content_type: bytes = b"application/json",
                    extra: Sequence[tuple[bytes, bytes]] = (), keep_alive: bool = True) -> bytes:
    """A whole response from the proxy itself (errors, /health, /v1/models, /metrics)."""
    parts = [b"HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n"
             % (status, _REASONS.get(status, b"Unknown"), content_type, len(body))]
    for name, value in extra:
        parts += (name, b": ", value, b"\r\n")
    if not keep_alive:
        parts.append(b"Connection: close\r\n")
    parts.append(b"\r\n")
    parts.append(body)
    return b"".join(parts)


def error_response(status: int, message: str, type_: str, code: str,
                   extra: Sequence[tuple[bytes, bytes]] = (), *, keep_alive: bool = True) -> bytes:
    """An OpenAI-style error answer, whole."""
    return simple_response(status, error_body(message, type_, code), extra=extra, keep_alive=keep_alive)


def sse_error_event(message: str) -> bytes:
    """An SSE event carrying an OpenAI-style error (what vLLM sends, and OpenAI's SDKs raise as APIError)."""
    return b"data: %s\n\n" % error_body(message, "server_error", "upstream_error")


NOT_PARSED = object()  # a body nobody needed to parse (routed by the header)


def _compressed(encoding: bytes | None) -> bool:
    return encoding is not None and encoding.strip().lower() not in (b"", b"identity")


def parse_body(body: bytes, encoding: bytes | None) -> Any:
    """The JSON body, or None when it is compressed, empty or not JSON (routing then falls back)."""
    if not body or _compressed(encoding):
        return None
    try:
        return json.loads(body)
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError; deep nesting a RecursionError
        return None


def model_from_body(body: bytes, encoding: bytes | None) -> tuple[str | None, str, Any]:
    """The JSON body's "model" (and the parsed body), or None and the sentence that says what is wrong."""
    if not body:
        return None, f'No model given: set the {MODEL_HEADER} header or send a JSON body with a "model" field.', None
    if _compressed(encoding):
        # Bodies are forwarded as sent; decompressing one only to route it would let a small request
        # expand into gigabytes. The header routes it without reading it.
        shown = (encoding or b"").decode("latin-1")
        return None, f"The request body is compressed ({shown}): set the {MODEL_HEADER} header to route it.", None
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):
        return None, "The request body is not valid JSON.", None
    model = doc.get("model") if isinstance(doc, dict) else None
    if not isinstance(model, str) or not model:
        return None, f'No model given: the JSON body needs a "model" string (or set the {MODEL_HEADER} header).', doc
    return model, "", doc
