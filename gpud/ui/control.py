"""The dashboard's client of the control API: aiohttp over the daemon's Unix socket.

`gpud ui` has no rights of its own: it connects to the socket as the user who runs it, so the daemon's
SO_PEERCRED check decides what the page may do, exactly as for the CLI.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
from yarl import URL

from gpud.errors import DaemonUnreachable, GpudError, from_json

# The host means nothing on a Unix socket; HTTP/1.1 wants one.
_BASE = "http://localhost"


def _unreachable(socket_path: str, exc: BaseException) -> DaemonUnreachable:
    cause = str(exc) or type(exc).__name__
    if isinstance(exc, aiohttp.ClientConnectorError):
        cause = exc.os_error.strerror or str(exc.os_error)
    return DaemonUnreachable(f"Cannot reach the gpud daemon at {socket_path}: {cause}.")


class ControlClient:
    """One aiohttp session on the control socket, shared by every request of one `gpud ui`."""

    def __init__(self, socket_path: str, timeout: float = 30.0) -> None:
        self.socket_path = socket_path
        self.timeout = timeout
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            # No pooled keep-alive: a daemon that restarted leaves no stale connection to trip over.
            connector = aiohttp.UnixConnector(path=self.socket_path, force_close=True)
            self._session = aiohttp.ClientSession(connector=connector, auto_decompress=False)
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _url(self, path: str) -> URL:
        # encoded=True: a name's %2F must reach the daemon as %2F, not as a second path segment.
        return URL(_BASE + path, encoded=True)

    async def forward(self, method: str, path: str, body: bytes | None) -> tuple[int, bytes]:
        """Send one request as the page made it; (status, raw JSON body) as the daemon answered."""
        headers = {"Accept": "application/json"}
        if body:
            headers["Content-Type"] = "application/json"
        try:
            async with self._client().request(
                method, self._url(path), data=body or None, headers=headers,
                timeout=aiohttp.ClientTimeout(total=self.timeout),
            ) as resp:
                return resp.status, await resp.read()
        except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as exc:
            raise _unreachable(self.socket_path, exc) from None

    async def get_json(self, path: str) -> Any:
        """GET a control-API path → its decoded JSON; the daemon's error as a GpudError."""
        status, raw = await self.forward("GET", path, None)
        try:
            body = json.loads(raw) if raw.strip() else None
        except ValueError:
            raise GpudError(f"The daemon sent an answer to GET {path} that is not JSON.") from None
        if status >= 400:
            raise from_json(body, status)
        return body

    @asynccontextmanager
    async def stream(self, path: str, query: dict[str, str] | None = None) -> AsyncIterator[aiohttp.StreamReader]:
        """A streamed GET (events, a followed log): the response body to read lines from.

        Raises DaemonUnreachable when the daemon cannot be reached, and the daemon's own error when it
        refuses (a replica that does not exist, say).
        """
        url = self._url(path)
        if query:
            url = url.with_query(query)
        try:
            resp = await self._client().get(url, timeout=aiohttp.ClientTimeout(total=None, sock_connect=self.timeout))
        except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as exc:
            raise _unreachable(self.socket_path, exc) from None
        try:
            if resp.status >= 400:
                raw = await resp.read()
                try:
                    body = json.loads(raw)
                except ValueError:
                    body = None
                raise from_json(body, resp.status)
            yield resp.content
        finally:
            resp.release()
            resp.close()
