"""Wake on request (SPEC §12), the proxy's side: hold requests for an idle model until it is ready.

No aiohttp and no registry here, so any proxy (the in-process one, worker processes) can use it. The proxy
calls `await gate.wait(name)` for a request whose model has no ready replica and is idle or waking; the
gate asks for the wake once per wake through the `request_wake(name)` callback it was given, and whoever
learns how the wake went tells it with `changed(name, ready=…, failure=…)`. Every request waiting for that
model is then let through (ready) or refused with the failure's reason (the model stays idle).

Bounds: a request waits at most `timeout_sec` (`proxy.wake_timeout_sec`; the wake goes on), and at most
`max_waiting` requests (`proxy.wake_queue`) wait for one model: one more is refused at once with
WakeQueueFull instead of holding a connection and its body without limit. Each refusal carries the
seconds a client should wait before retrying (the proxy's `Retry-After`). A request that goes away while
it waits (its task is cancelled) leaves the wake running for the others.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass


class WakeError(Exception):
    """A waiting request is refused: `code` and `message` for the OpenAI error body, `retry_after_sec`."""

    code = "model_wake_failed"
    retry_after_sec = 10

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class WakeFailed(WakeError):
    """The model could not be placed (even after eviction) or did not come up; it stays idle."""


class WakeTimeout(WakeError):
    """The model was not ready within the wake timeout; its wake goes on."""

    code = "model_wake_timeout"
    retry_after_sec = 5


class WakeQueueFull(WakeError):
    """Too many requests already wait for this model's wake."""

    code = "model_wake_queue_full"
    retry_after_sec = 1


@dataclass
class _Wake:
    """One wake in progress: the requests waiting on it share `outcome`."""

    outcome: asyncio.Future[None]
    waiting: int = 0


class WakeGate:
    """Holds requests for models that are waking; see the module docstring."""

    def __init__(self, request_wake: Callable[[str], None], *, timeout_sec: float, max_waiting: int) -> None:
        if timeout_sec <= 0 or max_waiting < 1:
            raise ValueError("a wake gate needs a timeout above 0 and room for one waiting request")
        self._request_wake = request_wake
        self.timeout_sec = timeout_sec
        self.max_waiting = max_waiting
        self._wakes: dict[str, _Wake] = {}

    def waiting(self, name: str) -> int:
        """Requests waiting for `name` now."""
        wake = self._wakes.get(name)
        return wake.waiting if wake is not None else 0

    def waking(self) -> list[str]:
        """Models with a wake asked for and not yet reported."""
        return list(self._wakes)

    async def wait(self, name: str) -> None:
        """Return once `name` is ready; raise a WakeError subclass when this request should be refused."""
        wake = self._wakes.get(name)
        first = wake is None
        if wake is None:
            wake = _Wake(asyncio.get_running_loop().create_future())
            wake.outcome.add_done_callback(_consume)
            self._wakes[name] = wake
        if wake.waiting >= self.max_waiting:
            raise WakeQueueFull(
                f"Model '{name}' is loading and {wake.waiting} requests already wait for it; retry shortly."
            )
        wake.waiting += 1
        try:
            if first:
                try:
                    self._request_wake(name)  # exactly once per wake; its answer comes through changed()
                except Exception as exc:  # nobody would ever answer: fail this wake now
                    self.changed(name, ready=False, failure=f"Model '{name}' could not be woken ({exc}).")
            # Each request waits its own timeout from its arrival, whenever the wake began.
            await asyncio.wait_for(asyncio.shield(wake.outcome), self.timeout_sec)
        except asyncio.TimeoutError:
            raise WakeTimeout(
                f"Model '{name}' was not ready within {self.timeout_sec:g} s; it is still loading, retry shortly."
            ) from None
        finally:
            wake.waiting -= 1

    def changed(self, name: str, *, ready: bool, failure: str | None = None) -> None:
        """News of `name`: ready (let its waiting requests through), or failed (refuse them with `failure`).
        Anything else (not ready yet, no failure) changes nothing."""
        wake = self._wakes.get(name)
        if wake is None or not (ready or failure):
            return
        del self._wakes[name]
        if ready:
            wake.outcome.set_result(None)
        else:
            wake.outcome.set_exception(WakeFailed(failure or f"Model '{name}' could not be loaded."))


def _consume(outcome: asyncio.Future[None]) -> None:
    # A failure nobody waits for any more (they all timed out) is not an error worth a log line.
    if not outcome.cancelled():
        outcome.exception()
