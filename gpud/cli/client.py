"""Control-API client: HTTP/1.1 over the daemon's Unix socket, stdlib only so that CLI commands start fast.

Each call opens its own connection (the socket is local, so a connection costs microseconds) which keeps
the client free of connection-reuse state. Errors come back as the gpud.errors classes:

- the socket is missing, refuses, or does not answer  → DaemonUnreachable (exit 3)
- an HTTP status >= 400 with `{"error": {...}}`          → the matching class (from_json)
- a stream that outlives its time limit                → StreamTimeout
"""

from __future__ import annotations

import errno
import http.client
import json
import socket
import time
from collections.abc import Callable, Generator
from typing import Any
from urllib.parse import quote, urlencode

from gpud.errors import DaemonUnreachable, GpudError, from_json

# Called with each event of the followed model (a decoded /v1/events line), e.g. to show progress.
EventObserver = Callable[[dict[str, Any]], None]


class StreamTimeout(GpudError):
    """A stream (events, logs) ran past the time limit its caller gave."""


def model_path(name: str, *rest: str) -> str:
    """`/v1/models/NAME[/rest…]` with NAME URL-encoded: Hugging Face names contain '/'."""
    return "/".join(["/v1/models", quote(name, safe=""), *rest])


class _UnixConnection(http.client.HTTPConnection):
    """http.client over AF_UNIX: only `connect` differs from a TCP connection."""

    def __init__(self, socket_path: str, timeout: float | None) -> None:
        # The Host header is required by HTTP/1.1; its value means nothing on a Unix socket.
        super().__init__("localhost", timeout=timeout)
        self._socket_path = socket_path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout)
            sock.connect(self._socket_path)
        except BaseException:
            sock.close()
            raise
        self.sock = sock


def _connect_failure(socket_path: str, exc: OSError) -> DaemonUnreachable:
    """One sentence naming the socket, the cause, and the usual fix."""
    if isinstance(exc, FileNotFoundError):
        cause = "the socket does not exist"
    elif isinstance(exc, ConnectionRefusedError):
        cause = "nothing is listening on the socket"
    elif isinstance(exc, PermissionError):
        cause = "permission denied (use sudo, or join the group that owns the socket)"
    elif isinstance(exc, TimeoutError):
        cause = "it did not answer in time"
    elif exc.errno == errno.ENOTDIR:
        cause = "a part of the path is not a directory"
    else:
        cause = exc.strerror or str(exc) or type(exc).__name__
    return DaemonUnreachable(f"Cannot reach the gpud daemon at {socket_path}: {cause} (is `gpud daemon` running?).")


def _error_from_response(status: int, raw: bytes) -> GpudError:
    try:
        body = json.loads(raw)
    except ValueError:
        text = raw.decode("utf-8", "replace").strip().splitlines()
        first = text[0] if text else ""
        return GpudError(f"The daemon answered HTTP {status}{': ' + first if first else ''}.")
    return from_json(body, status)


def is_busy(show: dict[str, Any]) -> bool:
    """True while an operation runs on the model: the daemon's `busy` key.

    Without that key (an older daemon) the model counts as settled once every replica is ready or one
    has failed for good, which is what `start` waits for.
    """
    busy = show.get("busy")
    if isinstance(busy, bool):
        return busy
    states = [r.get("state") for r in show.get("replicas") or []]
    return not (states and all(s == "ready" for s in states) or "failed" in states)


def _decode_event(line: str) -> dict[str, Any] | None:
    try:
        event = json.loads(line)
    except ValueError:
        return None  # a keep-alive blank line or garbage: nothing to act on
    return event if isinstance(event, dict) else None


class Client:
    """Talks to one daemon. `timeout` bounds connecting and each plain request."""

    def __init__(self, socket_path: str, timeout: float = 30.0) -> None:
        self.socket_path = socket_path
        self.timeout = timeout

    def _open(
        self, method: str, path: str, body: dict[str, Any] | None, query: dict[str, Any] | None, timeout: float
    ) -> tuple[_UnixConnection, http.client.HTTPResponse]:
        """Send the request and read the response head; connection failures become DaemonUnreachable."""
        target = path
        if query:
            clean = {k: v for k, v in query.items() if v is not None}
            if clean:
                target += "?" + urlencode(clean)
        payload = None if body is None else json.dumps(body).encode()
        headers = {"Accept": "application/json"}
        if payload is not None:
            headers["Content-Type"] = "application/json"
        conn = _UnixConnection(self.socket_path, timeout)
        try:
            conn.connect()
        except OSError as exc:
            conn.close()
            raise _connect_failure(self.socket_path, exc) from None
        try:
            conn.request(method, target, body=payload, headers=headers)
            return conn, conn.getresponse()
        except TimeoutError:
            conn.close()
            raise DaemonUnreachable(
                f"The gpud daemon at {self.socket_path} did not answer within {timeout:g} s."
            ) from None
        except (OSError, http.client.HTTPException) as exc:
            conn.close()
            raise GpudError(
                f"The gpud daemon at {self.socket_path} closed the connection before answering ({exc or type(exc).__name__})."
            ) from None

    def request(
        self, method: str, path: str, body: dict[str, Any] | None = None, query: dict[str, Any] | None = None
    ) -> Any:
        """One JSON request → the decoded JSON answer (None for an empty body). Raises GpudError subclasses."""
        conn, resp = self._open(method, path, body, query, self.timeout)
        try:
            raw = resp.read()
        except TimeoutError:
            raise DaemonUnreachable(
                f"The gpud daemon at {self.socket_path} did not answer within {self.timeout:g} s."
            ) from None
        except (OSError, http.client.HTTPException) as exc:
            raise GpudError(f"The connection to the gpud daemon broke while reading its answer ({exc}).") from None
        finally:
            conn.close()
        if resp.status >= 400:
            raise _error_from_response(resp.status, raw)
        if not raw.strip():
            return None
        try:
            return json.loads(raw)
        except ValueError:
            raise GpudError(f"The daemon sent an answer to {method} {path} that is not JSON.") from None

    def stream_lines(
        self, path: str, query: dict[str, Any] | None = None, timeout: float | None = None
    ) -> Generator[str, None, None]:
        """Lines of a streamed GET (NDJSON events, log lines), without their line ending.

        `timeout` is a limit on the whole stream (None: no limit): once it passes, StreamTimeout is raised,
        even while the daemon stays silent. The iterator ends when the daemon ends the response.
        Closing the iterator (or leaving a for loop) closes the connection.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        head_timeout = self.timeout if timeout is None else min(self.timeout, max(timeout, 0.001))
        conn, resp = self._open("GET", path, None, query, head_timeout)
        try:
            if resp.status >= 400:
                raise _error_from_response(resp.status, resp.read())
            # Keep our own reference: http.client may drop conn.sock once the response owns the stream.
            sock = conn.sock
            while True:
                if deadline is not None:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise StreamTimeout(f"Timed out after {timeout:g} s.")
                    if sock is not None:
                        sock.settimeout(left)
                elif sock is not None:
                    sock.settimeout(None)
                try:
                    line = resp.readline()
                except TimeoutError:
                    raise StreamTimeout(f"Timed out after {timeout:g} s.") from None
                except (OSError, http.client.HTTPException) as exc:
                    raise GpudError(f"The connection to the gpud daemon broke ({exc or type(exc).__name__}).") from None
                if not line:
                    return
                yield line.decode("utf-8", "replace").rstrip("\r\n")
        finally:
            resp.close()
            conn.close()

    def wait_for_model(
        self,
        name: str,
        *,
        until_removed: bool = False,
        timeout: float | None = None,
        observer: EventObserver | None = None,
    ) -> dict[str, Any] | None:
        """Follow /v1/events until model `name` is no longer busy (or, with until_removed, is gone).

        Returns the final show object (None once removed). The daemon sends the current state first, so a
        change that finished before we subscribed is seen at once. `observer` sees every relevant event
        (for progress displays). StreamTimeout when `timeout` passes first.
        """
        lines = self.stream_lines("/v1/events", {"model": name}, timeout=timeout)
        try:
            for line in lines:
                event = _decode_event(line)
                if event is None:
                    continue
                target = event.get("name")
                if target is None and isinstance(event.get("model"), str):
                    target = event["model"]  # replica events name their model under "model"
                if target is not None and target != name and event.get("by") != name:
                    continue  # (an eviction names the model that needed the room as "by")
                if observer is not None:
                    observer(event)
                kind = event.get("type")
                if kind == "model" and isinstance(event.get("model"), dict):
                    show: dict[str, Any] = event["model"]
                    if not until_removed and not is_busy(show):
                        return show
                elif kind == "shutdown":
                    raise GpudError(
                        f"The gpud daemon is shutting down; model {name!r} stops with it "
                        "(its desired state is kept for the next start)."
                    )
                elif kind == "removed":
                    if until_removed:
                        return None
                    raise GpudError(f"Model {name!r} was removed before the operation finished.")
        finally:
            lines.close()  # leave the daemon's stream now, not whenever the generator is collected
        raise GpudError(
            f"The daemon ended the event stream before model {name!r} was done; check with `gpud model show {name}`."
        )
