"""The proxy's HTTP message rules, apart from any I/O: which header fields cross the proxy, the head sent to a
replica, the OpenAI-style error bodies, and how the model is found in a request body.

Kept free of sockets and event loops so that each rule is a plain function of its inputs.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence

from aiohttp import web
from multidict import CIMultiDict

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
_BODYLESS_METHODS = frozenset({"GET", "HEAD", "DELETE", "OPTIONS", "TRACE"})


def error_body(message: str, type_: str, code: str) -> bytes:
    """OpenAI's error object, as JSON."""
    return json.dumps({"error": {"message": message, "type": type_, "param": None, "code": code}}).encode()


def error_response(
    status: int, message: str, type_: str, code: str, headers: dict[str, str] | None = None
) -> web.Response:
    """An OpenAI-style error answer."""
    return web.Response(
        status=status, body=error_body(message, type_, code), content_type="application/json", headers=headers
    )


def sse_error_event(message: str) -> bytes:
    """An SSE event carrying an OpenAI-style error (what vLLM sends, and OpenAI's SDKs raise as APIError)."""
    return b"data: %s\n\n" % error_body(message, "server_error", "upstream_error")


def connection_tokens(values: Sequence[str]) -> frozenset[str]:
    """The field names a Connection header lists: hop-by-hop for this message too."""
    return frozenset(t.strip().lower() for v in values for t in v.split(",") if t.strip())


def upstream_head_tail(
    raw_headers: Iterable[tuple[bytes, bytes]],
    connection: Sequence[str],
    *,
    method: str,
    remote: str | None,
    scheme: str,
    body: bytes,
    drop_authorization: bool,
) -> bytes:
    """The request head after the Host line: the client's end-to-end fields as raw bytes, X-Forwarded-*,
    Content-Length, and the blank line. `connection`: the values of the client's Connection fields;
    `drop_authorization`: the bearer key is gpud's own, and the replica must not see it."""
    drop = _REQUEST_DROP
    if connection:
        drop = drop | {t.encode("latin-1", "replace") for t in connection_tokens(connection)}
    if drop_authorization:
        drop = drop | {b"authorization"}
    parts: list[bytes] = []
    prior: list[bytes] = []
    for name, value in raw_headers:
        lower = name.lower()
        if lower not in drop:
            parts += (name, b": ", value, b"\r\n")
        elif lower == b"x-forwarded-for":
            prior.append(value)
    address = (remote or "").encode()
    parts += (
        b"X-Forwarded-For: ",
        b", ".join(prior) + b", " + address if prior else address,
        b"\r\n",
        b"X-Forwarded-Proto: ",
        scheme.encode(),
        b"\r\n",
    )
    if body or method not in _BODYLESS_METHODS:
        parts.append(b"Content-Length: %d\r\n" % len(body))
    parts.append(b"\r\n")
    return b"".join(parts)


def response_headers(headers: Iterable[tuple[str, str]], index: int) -> CIMultiDict[str]:
    """The replica's response fields that go on to the client, plus X-Gpud-Replica."""
    headers = list(headers)
    drop = _RESPONSE_DROP
    connection = [v for k, v in headers if k.lower() == "connection"]
    if connection:
        drop = drop | connection_tokens(connection)
    out: CIMultiDict[str] = CIMultiDict()
    for key, value in headers:
        if key.lower() not in drop:
            out.add(key, value)
    out[REPLICA_HEADER] = str(index)
    return out


def model_from_body(body: bytes, encoding: str = "identity") -> tuple[str | None, str]:
    """The JSON body's "model", or None and the sentence that says what is wrong with the request."""
    if not body:
        return (
            None,
            f'No model given: set the {MODEL_HEADER} header or send a JSON body with a "model" field.',
        )
    if encoding.strip().lower() not in ("", "identity"):
        # Bodies are forwarded as sent; decompressing one only to route it would let a small request
        # expand into gigabytes. The header routes it without reading it.
        return None, f"The request body is compressed ({encoding}): set the {MODEL_HEADER} header to route it."
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
