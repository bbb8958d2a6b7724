"""SPEC §12 in the model service, in process on real replica processes: unload, load and wake, eviction in
LRU order (and none when it would not help), the hand-over of an evicted model's room, load failures,
load-based scaling, and the idle timer of the demand loop."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import pytest
from helpers import InProcess, tiny_engine_body
from helpers import run_in_process as run

from gpud.config import ProxySettings, ScaleSettings
from gpud.demand.loop import DemandLoop
from gpud.errors import Conflict, DoesNotFit, Unavailable
from gpud.registry import Model, ModelState, Operation, ReplicaState
from gpud.spec import ModelSpec

GiB = 2**30


def spec(name: str = "tiny", **fields: Any) -> ModelSpec:
    return ModelSpec.from_json(tiny_engine_body(name, **fields))


async def settled(h: InProcess, model: Model) -> None:
    await h.wait(lambda: model.operation is None, what=f"{model.name} to settle")


def events_of(h: InProcess) -> asyncio.Queue[dict[str, Any]]:
    return h.registry.subscribe()


def drained(queue: asyncio.Queue[dict[str, Any]], *kinds: str) -> list[dict[str, Any]]:
    out = []
    while not queue.empty():
        event = queue.get_nowait()
        if event["type"] in kinds:
            out.append(event)
    return out


async def loaded(h: InProcess, name: str, *, last_request_at: float, **fields: Any) -> Model:
    model = await h.service.start_model(spec(name, **fields))
    if model.idle:
        await h.service.load(name)
    await settled(h, model)
    assert model.state() is ModelState.RUNNING
    model.last_request_at = last_request_at
    return model


def test_on_demand_starts_idle_and_concurrent_wakes_load_it_once(tmp_path: Path) -> None:
    async def test(h: InProcess) -> None:
        events = events_of(h)
        model = await h.service.start_model(spec(replicas=2, on_demand=True))
        assert model.state() is ModelState.IDLE and model.operation is None and h.reserved() == [0, 0]
        shown = h.service.show(model)
        assert (shown["state"], shown["replicas"], shown["replicas_desired"], shown["on_demand"]) == ("idle", [], 2, True)
        woken = await asyncio.gather(*(h.service.wake("tiny") for _ in range(20)))
        assert all(m is model for m in woken) and model.ready_replicas()
        await settled(h, model)
        assert [e["why"] for e in drained(events, "wake")] == ["request"]
        assert sorted(model.replicas) == [0, 1] and all(r.restarts == 0 for r in model.replicas.values())
        assert h.reserved() == [10 * GiB, 10 * GiB] and model.loaded_at is not None

    run(test, tmp_path)


def test_unload_releases_everything_and_keeps_the_desired_count(tmp_path: Path) -> None:
    async def test(h: InProcess) -> None:
        model = await loaded(h, "tiny", last_request_at=1.0, replicas=2, idle_timeout="1h")
        pids = [r.pid for r in model.replicas.values()]
        events = events_of(h)
        await h.service.unload("tiny")
        assert model.state() is ModelState.STOPPING  # out of the balancer at once
        await settled(h, model)
        assert model.state() is ModelState.IDLE and not model.replicas and model.desired == 2
        assert h.reserved() == [0, 0] and not h.owned.all()
        assert [e["why"] for e in drained(events, "idle")] == ["unload"]
        assert all(not _alive(pid) for pid in pids if pid)
        saved = json.loads((h.root / "state.json").read_text())
        assert saved["demand"]["tiny"] == {"idle": True, "last_request_at": 1.0}
        assert await h.service.unload("tiny") is model  # idle already: nothing to do
        with pytest.raises(Conflict, match="is idle"):
            await h.service.restart("tiny")

    run(test, tmp_path)


def test_eviction_takes_the_least_recently_used_first_and_hands_its_room_over(tmp_path: Path) -> None:
    async def test(h: InProcess) -> None:
        old = await loaded(h, "old", last_request_at=100.0, vram="30GiB", idle_timeout="1h")
        new = await loaded(h, "new", last_request_at=200.0, vram="30GiB", on_demand=True)
        events = events_of(h)
        big = await h.service.start_model(spec("big", vram="40GiB"))  # 20 GiB free: one 30 GiB model must go
        assert [(e["name"], e["by"]) for e in drained(events, "evicted")] == [("old", "big")]
        # The room is big's from now on, although old's processes may still be stopping: a small model that
        # would fit in it right now is refused.
        with pytest.raises(DoesNotFit):
            await h.service.start_model(spec("small", vram="15GiB"))
        await settled(h, big)
        await settled(h, old)
        assert old.state() is ModelState.IDLE and new.state() is ModelState.RUNNING
        assert big.state() is ModelState.RUNNING and h.reserved() == [70 * GiB]

    run(test, tmp_path, gpus="sim:80GiB")


def test_a_model_stop_during_its_eviction_still_holds_the_new_model_back_until_its_processes_are_gone(
        tmp_path: Path) -> None:
    async def test(h: InProcess) -> None:
        await loaded(h, "old", last_request_at=100.0, vram="50GiB", idle_timeout="1h")
        events = events_of(h)
        big = await h.service.start_model(spec("big", vram="50GiB"))  # old is evicted for it
        await h.service.stop_model("old")  # cancels old's unload; the stop takes its replicas down instead
        old_runners_at_big_launch: list[list[tuple[str, int]]] = []
        while not any(r.pid for r in big.replicas.values()) and big.operation is not None:
            event = await asyncio.wait_for(events.get(), 15)
            if event.get("name") == "big" and big.replicas and not old_runners_at_big_launch \
                    and any(r.state is ReplicaState.STARTING for r in big.replicas.values()):
                old_runners_at_big_launch.append([k for k in h.supervisor.runners if k[0] == "old"])
        await settled(h, big)
        assert old_runners_at_big_launch == [[]], "big started while old's replica still ran"
        assert "old" not in h.registry.models and big.state() is ModelState.RUNNING

    run(test, tmp_path, gpus="sim:80GiB")


def test_nothing_is_evicted_when_it_would_not_help(tmp_path: Path) -> None:
    async def test(h: InProcess) -> None:
        pinned = await loaded(h, "pinned", last_request_at=1.0, vram="60GiB")
        idle_able = await loaded(h, "idle-able", last_request_at=1.0, vram="10GiB", idle_timeout="1h")
        events = events_of(h)
        with pytest.raises(DoesNotFit, match="needs 40 GiB|does not fit"):
            await h.service.start_model(spec("big", vram="40GiB"))
        asleep = await h.service.start_model(spec("asleep", vram="40GiB", on_demand=True))
        with pytest.raises(DoesNotFit):
            await h.service.wake("asleep")
        with pytest.raises(DoesNotFit):
            await h.service.load("asleep")
        assert drained(events, "evicted", "wake") == []
        assert asleep.state() is ModelState.IDLE and "big" not in h.registry.models
        assert pinned.state() is idle_able.state() is ModelState.RUNNING and h.reserved() == [70 * GiB]

    run(test, tmp_path, gpus="sim:80GiB")


def test_a_model_with_a_request_in_flight_or_busy_is_not_evicted(tmp_path: Path) -> None:
    async def test(h: InProcess) -> None:
        serving = await loaded(h, "serving", last_request_at=1.0, vram="50GiB", idle_timeout="1h")
        serving.replicas[0].inflight = 1  # as the proxy counts a request in progress (a stream, say)
        with pytest.raises(DoesNotFit):
            await h.service.start_model(spec("big", vram="40GiB"))
        serving.replicas[0].inflight = 0
        big = await h.service.start_model(spec("big", vram="40GiB"))
        await settled(h, big)
        assert serving.state() is ModelState.IDLE and big.state() is ModelState.RUNNING

    run(test, tmp_path, gpus="sim:80GiB")


def test_a_wake_waits_for_room_that_is_in_use_up_to_the_wake_timeout(tmp_path: Path) -> None:
    async def test(h: InProcess) -> None:
        h.service.settings = dataclasses.replace(h.settings, proxy=ProxySettings(wake_timeout_sec=0.5))
        serving = await loaded(h, "serving", last_request_at=1.0, vram="50GiB", idle_timeout="1h")
        await h.service.start_model(spec("asleep", vram="40GiB", on_demand=True))
        serving.replicas[0].inflight = 1
        started = time.monotonic()
        with pytest.raises(DoesNotFit):  # the request in flight outlasts the wake timeout
            await h.service.wake("asleep")
        assert time.monotonic() - started >= 0.5 and not serving.idle
        h.service.settings = h.settings  # 600 s
        waking = asyncio.ensure_future(h.service.wake("asleep"))
        await asyncio.sleep(0.3)
        assert not waking.done() and h.registry.models["asleep"].idle  # waiting for the room
        serving.replicas[0].inflight = 0  # the request ends: serving may go now
        await waking
        assert serving.idle and h.registry.models["asleep"].ready_replicas()

    run(test, tmp_path, gpus="sim:80GiB")


def test_a_wake_that_evicts_and_scale_that_evicts(tmp_path: Path) -> None:
    async def test(h: InProcess) -> None:
        a = await loaded(h, "a", last_request_at=10.0, vram="30GiB", idle_timeout="1h")
        b = await loaded(h, "b", last_request_at=20.0, vram="30GiB", idle_timeout="1h")
        c = await h.service.start_model(spec("c", vram="30GiB", on_demand=True))
        await h.service.wake("c")  # 20 GiB free: a (least recently used) goes
        assert a.idle and not b.idle and c.ready_replicas()
        await settled(h, c)
        c.last_request_at = 30.0
        await h.service.scale("c", 2)  # b is the least recently used now
        await settled(h, c)
        await settled(h, b)
        assert b.idle and sorted(c.replicas) == [0, 1] and h.reserved() == [60 * GiB]

    run(test, tmp_path, gpus="sim:80GiB")


def test_a_wake_whose_replicas_fail_goes_back_to_idle_with_the_reason(tmp_path: Path) -> None:
    async def test(h: InProcess) -> None:
        model = await h.service.start_model(spec(on_demand=True, env={"EXIT_AFTER": "0", "EXIT_CODE": "3"}))
        with pytest.raises(Unavailable, match="The last load failed: .*code 3"):
            await h.service.wake("tiny")
        await settled(h, model)
        assert model.state() is ModelState.IDLE and h.reserved() == [0, 0]
        assert "The last load failed" in (h.service.show(model)["message"] or "")

    run(test, tmp_path, start_limit_burst=0)


def test_stop_during_a_wake_ends_the_wake_and_leaves_nothing(tmp_path: Path) -> None:
    async def test(h: InProcess) -> None:
        await h.service.start_model(spec(on_demand=True, env={"STATUS": "503"}))  # never ready
        waker = asyncio.ensure_future(h.service.wake("tiny"))
        await h.wait(lambda: h.registry.models["tiny"].operation is Operation.LOAD)
        with pytest.raises(Conflict, match="busy"):
            await h.service.unload("tiny")
        await h.service.stop_model("tiny")
        with pytest.raises(Unavailable, match="was stopped while it was loading"):
            await waker
        await h.wait(lambda: "tiny" not in h.registry.models)
        assert h.reserved() == [0, 0]

    run(test, tmp_path)


def test_a_request_during_an_unload_wakes_the_model_after_it(tmp_path: Path) -> None:
    async def test(h: InProcess) -> None:
        model = await loaded(h, "tiny", last_request_at=1.0, idle_timeout="1h")
        first_pid = model.replicas[0].pid
        await h.service.unload("tiny")
        await h.service.wake("tiny")  # waits for the unload, then wakes it
        assert model.ready_replicas() and model.replicas[0].pid != first_pid

    run(test, tmp_path)


def test_model_load_during_an_unload_answers_at_once_and_loads_it_after(tmp_path: Path) -> None:
    async def test(h: InProcess) -> None:
        model = await loaded(h, "tiny", last_request_at=1.0, idle_timeout="1h")
        first_pid = model.replicas[0].pid
        await h.service.unload("tiny")
        assert model.operation is Operation.UNLOAD
        await h.service.load("tiny")  # does not wait for the drain and stop (a client would time out)
        assert model.operation is Operation.UNLOAD
        await h.wait(lambda: model.ready_replicas() and model.operation is None, what="the load after the unload")
        assert model.replicas[0].pid != first_pid

    run(test, tmp_path)


def test_scaling_an_idle_model_sets_what_it_comes_back_with(tmp_path: Path) -> None:
    async def test(h: InProcess) -> None:
        model = await h.service.start_model(spec(on_demand=True, max_replicas=3))
        await h.service.scale("tiny", 2)
        assert model.idle and model.desired == 2 and h.reserved() == [0, 0]
        with pytest.raises(Exception, match="max_replicas 3"):
            await h.service.scale("tiny", 4)
        await h.service.load("tiny")
        await settled(h, model)
        assert sorted(model.replicas) == [0, 1] and model.state() is ModelState.RUNNING

    run(test, tmp_path)


def test_autoscale_adds_and_removes_one_replica_at_a_time_with_stable_indices(tmp_path: Path) -> None:
    async def test(h: InProcess) -> None:
        model = await loaded(h, "tiny", last_request_at=1.0, max_replicas=3)
        events = events_of(h)
        await h.service.autoscale("tiny", 2, "load")
        await settled(h, model)
        await h.service.autoscale("tiny", 3, "load")
        await settled(h, model)
        assert sorted(model.replicas) == [0, 1, 2] and model.state() is ModelState.RUNNING
        assert model.spec.replicas == 1 and h.service.show(model)["replicas_desired"] == 3
        await h.service.autoscale("tiny", 2, "quiet")
        await settled(h, model)
        assert sorted(model.replicas) == [0, 1]
        assert [(e["from"], e["to"], e["why"]) for e in drained(events, "scaled")] == [
            (1, 2, "load"), (2, 3, "load"), (3, 2, "quiet")]
        saved = json.loads((h.root / "state.json").read_text())
        assert saved["models"]["tiny"]["replicas"] == 1  # scaling by load is not saved: the floor is

    run(test, tmp_path)


def test_autoscale_never_evicts(tmp_path: Path) -> None:
    async def test(h: InProcess) -> None:
        await loaded(h, "other", last_request_at=1.0, vram="60GiB", idle_timeout="1h")
        model = await loaded(h, "tiny", last_request_at=1.0, vram="15GiB", max_replicas=2)
        with pytest.raises(DoesNotFit):
            await h.service.autoscale("tiny", 2, "load")
        assert not h.registry.models["other"].idle and sorted(model.replicas) == [0]

    run(test, tmp_path, gpus="sim:80GiB")


def test_the_demand_loop_unloads_an_idle_model_but_not_one_with_a_request_in_flight(tmp_path: Path) -> None:
    async def test(h: InProcess) -> None:
        model = await loaded(h, "tiny", last_request_at=time.time(), idle_timeout="0.5s")
        assert model.last_request_at is not None
        due = model.last_request_at + 0.5
        loop = DemandLoop(h.registry, h.service, ScaleSettings())
        task = asyncio.ensure_future(loop.run())
        try:
            model.replicas[0].inflight = 1  # a stream in progress keeps it loaded
            await h.wait(lambda: (loop.last_tick_at or 0) > due, what="a pass of the loop after the idle timeout")
            assert model.state() is ModelState.RUNNING and model.operation is None
            model.replicas[0].inflight = 0
            model.last_request_at = ended = time.time()  # the proxy, when that request ends
            await h.wait(lambda: model.state() is ModelState.IDLE, timeout=5, what="idle")
            assert time.time() - ended >= 0.5
        finally:
            task.cancel()

    run(test, tmp_path)


def test_the_demand_loop_scales_by_load(tmp_path: Path) -> None:
    async def test(h: InProcess) -> None:
        model = await loaded(h, "tiny", last_request_at=time.time(), max_replicas=2, target_inflight=2)
        loop = DemandLoop(h.registry, h.service, ScaleSettings(up_after_sec=0.3, down_after_sec=0.3))
        task = asyncio.ensure_future(loop.run())
        try:
            model.replicas[0].inflight = 2
            await h.wait(lambda: len(model.ready_replicas()) == 2, timeout=10, what="a second replica")
            model.replicas[0].inflight = 1  # 1 < 2 x (2 - 1): quiet
            await h.wait(lambda: sorted(model.replicas) == [0] and model.operation is None, timeout=10,
                         what="back to one replica")
            assert model.replicas[0].state is ReplicaState.READY
        finally:
            task.cancel()

    run(test, tmp_path)


def _alive(pid: int) -> bool:
    try:
        import os

        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
