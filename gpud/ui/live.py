"""The page's live feed: the daemon's /v1/events turned into page events, through outages; and log follows.

For each open page, `page_events` follows the control API's event stream and yields (name, data) pairs:

- `snapshot` — everything the page draws (status, models, GPUs), on every (re)connection;
- `model` / `removed` — a model changed or went away, as the daemon announced it;
- `gpus` — the ledger, re-read after changes (reservations follow model changes, which have events);
- `notice` — any other daemon event (venv build progress, idle/wake/evicted/scaled), for the activity list;
- `daemon` — `{"up": false, "message"}` when the daemon cannot be reached; the feed then retries every
  second at most and sends a fresh `snapshot` once it answers again;
- `ping` — nothing changed; the handler writes an SSE comment, which also notices a page that went away.

The event stream is opened before the snapshot is read, so no change can fall between the two. Counters
that change without an event (requests in flight, memory used by other processes) are re-read every
`refresh_sec`, and only what differs from what the page has is sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncGenerator
from typing import Any

import aiohttp

from gpud.cli.client import model_path
from gpud.errors import GpudError
from gpud.ui.control import ControlClient
from gpud.ui.routes import decorate_models, decorate_show, model_changes, page_event
from gpud.ui.text import LineSplitter

PageEvent = tuple[str, Any]
_EOF = object()
GPUS_AFTER_EVENT_SEC = 0.05   # a burst of model events re-reads the ledger once
RETRY_FIRST_SEC = 0.2
RETRY_MAX_SEC = 1.0            # "reconnects when it is back": within a second of the daemon answering


async def _pump(content: aiohttp.StreamReader, queue: asyncio.Queue[object]) -> None:
    """Lines of the event stream into `queue`, then _EOF (a reader task, so that waiting with a timeout
    never cuts a line in half)."""
    try:
        while True:
            line = await content.readline()
            if not line:
                break
            await queue.put(line)
    except (aiohttp.ClientError, OSError):
        pass
    finally:
        await queue.put(_EOF)


class _Feed:
    """What the page has been sent, so the periodic refresh sends only changes."""

    def __init__(self) -> None:
        self.models: dict[str, Any] = {}
        self.gpus: Any = None

    def gpus_event(self, gpus: Any) -> PageEvent | None:
        if gpus == self.gpus:
            return None
        self.gpus = gpus
        return "gpus", gpus

    def refreshed(self, models: list[Any]) -> list[PageEvent]:
        changed, removed = model_changes(self.models, models)
        events: list[PageEvent] = []
        for show in changed:
            self.models[show["name"]] = show
            events.append(("model", decorate_show(show)))
        for name in removed:
            del self.models[name]
            events.append(("removed", {"name": name}))
        return events


async def _follow(control: ControlClient, info: dict[str, Any], refresh_sec: float) -> AsyncGenerator[PageEvent, None]:
    """One connection's worth of events; returns (with a message in the last `daemon` event) when it ends."""
    async with control.stream("/v1/events") as content:
        queue: asyncio.Queue[object] = asyncio.Queue()
        reader = asyncio.create_task(_pump(content, queue))
        try:
            status, models, gpus = await asyncio.gather(
                control.get_json("/v1/status"), control.get_json("/v1/models"), control.get_json("/v1/gpus"))
            feed = _Feed()
            feed.models = {m["name"]: m for m in models.get("models", []) if isinstance(m, dict) and "name" in m}
            feed.gpus = gpus
            yield "snapshot", {"status": status, "models": decorate_models(models)["models"], "gpus": gpus, "ui": info}
            gpus_due: float | None = None
            next_refresh = time.monotonic() + refresh_sec
            while True:
                now = time.monotonic()
                wake = next_refresh if gpus_due is None else min(gpus_due, next_refresh)
                try:
                    item = await asyncio.wait_for(queue.get(), max(0.0, wake - now))
                except asyncio.TimeoutError:
                    item = None
                if item is _EOF:
                    yield "daemon", {"up": False, "message": "The gpud daemon closed the connection."}
                    return
                if isinstance(item, bytes):
                    try:
                        event = json.loads(item)
                    except ValueError:
                        event = None
                    if isinstance(event, dict):
                        if event.get("type") == "shutdown":
                            yield "daemon", {"up": False, "message": "The gpud daemon is shutting down."}
                            return
                        relayed = page_event(event)
                        if relayed is not None:
                            if relayed[0] == "model":
                                feed.models[event["model"]["name"]] = event["model"]
                            elif relayed[0] == "removed":
                                feed.models.pop(relayed[1]["name"], None)
                            yield relayed
                        if gpus_due is None:
                            gpus_due = time.monotonic() + GPUS_AFTER_EVENT_SEC
                now = time.monotonic()
                if gpus_due is not None and now >= gpus_due:
                    gpus_due = None
                    changed = feed.gpus_event(await control.get_json("/v1/gpus"))
                    if changed:
                        yield changed
                if now >= next_refresh:
                    next_refresh = now + refresh_sec
                    models, gpus = await asyncio.gather(control.get_json("/v1/models"), control.get_json("/v1/gpus"))
                    events = feed.refreshed(models.get("models", []))
                    if (changed := feed.gpus_event(gpus)) is not None:
                        events.append(changed)
                    for page in events or [("ping", None)]:
                        yield page
        finally:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)


async def page_events(control: ControlClient, info: dict[str, Any], refresh_sec: float) -> AsyncGenerator[PageEvent, None]:
    """The feed of one open page, forever: follows the daemon, says when it is gone, reconnects."""
    delay = RETRY_FIRST_SEC
    last_down: str | None = None
    while True:
        message: str | None = None
        try:
            async with contextlib.aclosing(_follow(control, info, refresh_sec)) as pages:
                async for page in pages:
                    if page[0] == "daemon":
                        message = page[1]["message"]
                        break
                    if page[0] == "snapshot":
                        delay, last_down = RETRY_FIRST_SEC, None
                    yield page
        except GpudError as exc:
            message = exc.message
        message = message or "The gpud daemon ended the event stream."
        if message != last_down:
            # Once per outage (and when the reason changes), not once per retry.
            last_down = message
            yield "daemon", {"up": False, "message": message}
        else:
            yield "ping", None
        await asyncio.sleep(delay)
        delay = min(RETRY_MAX_SEC, delay * 2)


async def log_batches(control: ControlClient, name: str, replica: int, lines: int,
                      line_chars: int) -> AsyncGenerator[list[str], None]:
    """A replica's log: its last `lines` lines, then each new line as the replica writes it.

    Only the tail is read (the daemon seeks from the end), and lines longer than `line_chars` are cut,
    so a huge log costs the page what it shows. Raises the daemon's error (no such model or replica).
    """
    query = {"replica": str(replica), "lines": str(lines), "follow": "1"}
    splitter = LineSplitter(line_chars)
    async with control.stream(model_path(name, "logs"), query) as content:
        while True:
            try:
                chunk = await content.readany()
            except (aiohttp.ClientError, OSError):
                break
            if not chunk:
                break
            batch = splitter.feed(chunk)
            if batch:
                yield batch
    rest = splitter.flush()
    if rest:
        yield rest
