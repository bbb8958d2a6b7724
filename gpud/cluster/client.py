"""A small client of a Shepherd Model Gateway's control plane: list, add and remove workers (aiohttp).

Only the three calls gpud needs, written against the gateway's HTTP API (no gateway code imported):

    GET    {gateway}/workers          → {"workers": [{"id", "url", "status", "labels", …}, …]}
    POST   {gateway}/workers          → 202 {"worker_id": …}   (registration continues in the background)
    DELETE {gateway}/workers/{id}     → 202                     (the worker drains, then goes)

Every failure is a `GatewayError` whose `kind` says what the registrar may conclude:

    unreachable  no answer (refused connection, DNS, timeout): the gateway is down or cut off
    refused      401/403: the control-plane key is missing or wrong (cluster.api_key)
    conflict     409: the gateway already has a worker at that URL
    error        any other HTTP error (5xx, 4xx)
    garbage      an answer that is not the JSON the API describes
"""

from __future__ import annotations

import asyncio
import json
from typing import Any
from urllib.parse import quote

import aiohttp

from gpud.cluster.workers import Listed

_MAX_SHOWN = 200  # characters of a gateway's error body quoted in a message


class GatewayError(Exception):
    """A control-plane call that did not do what was asked; `message` is one sentence for the log."""

    def __init__(self, kind: str, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.status = status

    @property
    def key(self) -> tuple[str, int | None]:
        """What tells one gateway state from another (the registrar logs once per change of it)."""
        return self.kind, self.status


def _excerpt(raw: bytes) -> str:
    text = raw.decode("utf-8", "replace").strip()
    try:
        doc = json.loads(text)
    except ValueError:
        doc = None
    if isinstance(doc, dict):  # the gateway's errors: {"error": "…", "code": "…"} or OpenAI's {"error": {…}}
        err = doc.get("error")
        text = str(err.get("message", err) if isinstance(err, dict) else err or doc.get("message") or text)
    text = " ".join(text.split())
    return text if len(text) <= _MAX_SHOWN else text[:_MAX_SHOWN] + "…"


def _listed(entry: Any) -> Listed | None:
    """One entry of GET /workers, or None when it lacks what gpud needs to act on it."""
    if not isinstance(entry, dict):
        return None
    worker_id, url = entry.get("id"), entry.get("url")
    if not isinstance(worker_id, str) or not isinstance(url, str) or not worker_id or not url:
        return None
    labels = entry.get("labels")
    labels = {k: v for k, v in labels.items() if isinstance(v, str)} if isinstance(labels, dict) else {}
    status = entry.get("status")
    return Listed(worker_id, url, status if isinstance(status, str) else "", labels)


class GatewayClient:
    """Calls to one gateway; `api_key` goes out as `Authorization: Bearer`; each call gives up after
    `timeout` seconds. Use as an async context manager, or call `close()`."""

    def __init__(self, gateway: str, api_key: str | None, timeout: float) -> None:
        self.gateway = gateway.rstrip("/")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._headers = headers
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> GatewayClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None:
            session, self._session = self._session, None
            await session.close()

    async def _call(self, method: str, path: str, body: Any = None) -> tuple[int, bytes]:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(headers=self._headers, timeout=self._timeout)
        url = self.gateway + path
        try:
            async with self._session.request(method, url, json=body) as response:
                return response.status, await response.read()
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            reason = str(exc) or type(exc).__name__
            if isinstance(exc, asyncio.TimeoutError):
                reason = f"no answer within {self._timeout.total:g} s"
            raise GatewayError("unreachable", f"Cannot reach the gateway at {self.gateway}: {reason}.") from None

    def _refusal(self, method: str, path: str, status: int, raw: bytes) -> GatewayError:
        said = _excerpt(raw)
        said = f": {said}" if said else ""
        if status in (401, 403):
            return GatewayError(
                "refused",
                f"The gateway at {self.gateway} refused gpud's control-plane call (HTTP {status}{said}); "
                "check cluster.api_key.",
                status,
            )
        kind = "conflict" if status == 409 else "error"
        return GatewayError(kind, f"The gateway at {self.gateway} answered {method} {path} with HTTP {status}{said}.",
                            status)

    def _garbage(self, method: str, path: str, what: str) -> GatewayError:
        return GatewayError("garbage", f"The gateway at {self.gateway} answered {method} {path} with {what}.")

    async def list_workers(self) -> list[Listed]:
        """Every worker the gateway lists (entries without an id or a URL are skipped)."""
        status, raw = await self._call("GET", "/workers")
        if status != 200:
            raise self._refusal("GET", "/workers", status, raw)
        try:
            doc = json.loads(raw)
        except ValueError:
            raise self._garbage("GET", "/workers", "a body that is not JSON") from None
        entries = doc.get("workers") if isinstance(doc, dict) else None
        if not isinstance(entries, list):
            raise self._garbage("GET", "/workers", 'JSON without a "workers" list')
        return [w for w in map(_listed, entries) if w is not None]

    async def add_worker(self, body: dict[str, Any]) -> str | None:
        """Ask for a worker; the gateway's id for it (None when it named none). Registration is asynchronous:
        the worker shows in `list_workers` once the gateway's probes of it passed."""
        status, raw = await self._call("POST", "/workers", body)
        if status not in (200, 201, 202):
            raise self._refusal("POST", "/workers", status, raw)
        try:
            doc = json.loads(raw) if raw.strip() else {}
        except ValueError:
            raise self._garbage("POST", "/workers", "a body that is not JSON") from None
        worker_id = doc.get("worker_id") if isinstance(doc, dict) else None
        return worker_id if isinstance(worker_id, str) else None

    async def remove_worker(self, worker_id: str) -> None:
        """Remove a worker (it drains on the gateway, then goes); one that is already gone is fine."""
        path = f"/workers/{quote(worker_id, safe='')}"
        status, raw = await self._call("DELETE", path)
        if status not in (200, 202, 204, 404):
            raise self._refusal("DELETE", path, status, raw)
