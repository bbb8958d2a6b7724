"""The proxy's wake gate (pure asyncio, no sockets): one wake however many wait, bounded wait and queue."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from gpud.proxy.wake import WakeFailed, WakeGate, WakeQueueFull, WakeTimeout


def run(test: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(test(), 10))


async def until(predicate: Callable[[], bool]) -> None:
    while not predicate():
        await asyncio.sleep(0)


def test_many_waiters_ask_for_one_wake_and_all_go_through_when_ready() -> None:
    async def test() -> None:
        asked: list[str] = []
        gate = WakeGate(asked.append, timeout_sec=5, max_waiting=100)
        waiters = [asyncio.ensure_future(gate.wait("m")) for _ in range(50)]
        await until(lambda: gate.waiting("m") == 50)
        assert asked == ["m"] and gate.waking() == ["m"]
        gate.changed("m", ready=False)  # news that is neither ready nor a failure changes nothing
        await asyncio.sleep(0)
        assert not any(w.done() for w in waiters)
        gate.changed("m", ready=True)
        await asyncio.gather(*waiters)
        assert gate.waking() == [] and gate.waiting("m") == 0
        # The next time the model is idle, a new wake is asked for.
        later = asyncio.ensure_future(gate.wait("m"))
        await until(lambda: asked == ["m", "m"])
        gate.changed("m", ready=True)
        await later

    run(test)


def test_a_failure_refuses_every_waiter_with_its_reason() -> None:
    async def test() -> None:
        gate = WakeGate(lambda name: None, timeout_sec=5, max_waiting=10)
        waiters = [asyncio.ensure_future(gate.wait("m")) for _ in range(3)]
        await until(lambda: gate.waiting("m") == 3)
        gate.changed("m", ready=False, failure="1 replica of 90 GiB does not fit: GPU0 has 79.5 GiB available.")
        results = await asyncio.gather(*waiters, return_exceptions=True)
        assert all(isinstance(r, WakeFailed) and "does not fit" in r.message for r in results)
        assert all(isinstance(r, WakeFailed) and r.retry_after_sec > 0 for r in results)

    run(test)


def test_a_waiter_times_out_alone_and_the_wake_goes_on() -> None:
    async def test() -> None:
        asked: list[str] = []
        gate = WakeGate(asked.append, timeout_sec=0.05, max_waiting=10)
        with pytest.raises(WakeTimeout, match="not ready within 0.05 s"):
            await gate.wait("m")
        assert gate.waking() == ["m"]  # still waking: a request now joins it without asking again
        joined = asyncio.ensure_future(gate.wait("m"))
        await until(lambda: gate.waiting("m") == 1)
        gate.changed("m", ready=True)
        await joined
        assert asked == ["m"]

    run(test)


def test_a_full_queue_refuses_at_once_and_frees_room_as_waiters_leave() -> None:
    async def test() -> None:
        gate = WakeGate(lambda name: None, timeout_sec=5, max_waiting=2)
        first, second = (asyncio.ensure_future(gate.wait("m")) for _ in range(2))
        await until(lambda: gate.waiting("m") == 2)
        with pytest.raises(WakeQueueFull, match="2 requests already wait"):
            await gate.wait("m")
        other = asyncio.ensure_future(gate.wait("other"))  # the bound is per model
        await until(lambda: gate.waiting("other") == 1)
        first.cancel()  # a client that goes away: its place frees, the wake is not cancelled
        await asyncio.gather(first, return_exceptions=True)
        assert gate.waiting("m") == 1 and gate.waking() == ["m", "other"]
        third = asyncio.ensure_future(gate.wait("m"))
        await until(lambda: gate.waiting("m") == 2)
        gate.changed("m", ready=True)
        gate.changed("other", ready=True)
        await asyncio.gather(second, third, other)

    run(test)


def test_a_wake_that_cannot_be_asked_for_fails_now() -> None:
    async def test() -> None:
        def broken(name: str) -> None:
            raise RuntimeError("no loop")

        gate = WakeGate(broken, timeout_sec=5, max_waiting=2)
        with pytest.raises(WakeFailed, match="could not be woken"):
            await gate.wait("m")
        assert gate.waking() == []

    run(test)


def test_bad_bounds_are_a_bug() -> None:
    with pytest.raises(ValueError):
        WakeGate(lambda name: None, timeout_sec=0, max_waiting=1)
