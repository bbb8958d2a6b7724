"""The registrar against an in-process fake gateway (tests/fakes/fake_gateway.py): registration, idempotence,
removal, the stop hook, SIGTERM, and a gateway that is down, refuses, or answers garbage — logged once per
change, retried with backoff, never a crash. The real SMG is in test_smg.py."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from fakes.fake_gateway import FakeGateway

from gpud.cluster.registrar import FIRST_BACKOFF_SEC, Registrar
from gpud.cluster.settings import ClusterSettings
from gpud.cluster.workers import worker_url
from gpud.registry import Model, ModelState, Operation, Registry, Replica, ReplicaState
from gpud.spec import ModelSpec

NODE = "http://127.0.0.1:8000"
LOGGER = "gpud.cluster.registrar"


def add_model(registry: Registry, name: str, state: ReplicaState = ReplicaState.READY) -> Model:
    model = Model(spec=ModelSpec(name=name, model=name, engine="sim", replicas=1))
    model.replicas[0] = Replica(model=name, index=0, gpus=(), vram_by_gpu=(), port=1, state=state)
    registry.models[name] = model
    registry.changed(name)
    return model


def settings_for(gateway: FakeGateway, **overrides: Any) -> ClusterSettings:
    values: dict[str, Any] = {"gateway": gateway.url, "advertise": NODE, "labels": {"zone": "a"}, "sync_sec": 30.0,
                              "request_timeout_sec": 2.0, "deregister_timeout_sec": 3.0, **overrides}
    return ClusterSettings(**values)


def run(test: Callable[[FakeGateway, Registry], Awaitable[None]], api_key: str | None = None) -> None:
    async def main() -> None:
        gateway = await FakeGateway(api_key).start()
        try:
            await asyncio.wait_for(test(gateway, Registry()), 30)
        finally:
            await gateway.stop()

    asyncio.run(main())


async def until(predicate: Callable[[], Any], what: str, timeout: float = 5.0) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)
    return value


def test_ready_models_are_registered_once_and_starting_ones_wait() -> None:
    async def test(gateway: FakeGateway, registry: Registry) -> None:
        add_model(registry, "a/b")
        add_model(registry, "later", ReplicaState.STARTING)
        registrar = Registrar(settings_for(gateway, api_key=None), registry, proxy_api_key="pk")
        await registrar.sync()
        assert list(gateway.live()) == [worker_url(NODE, "a/b")] == ["http://127.0.0.1:8000/m/a%2Fb"]
        [body] = gateway.posted
        assert body["labels"] == {"zone": "a", "gpud_node": NODE} and body["api_key"] == "pk"
        assert body["models"] == [{"id": "a/b"}] and body["runtime_type"] == "vllm"
        for _ in range(3):  # idempotent: the gateway's list is the truth, and it matches
            await registrar.sync()
        assert gateway.count("POST") == 1 and gateway.count("DELETE") == 0
        assert registrar.status()["workers"] == [
            {"model": "a/b", "url": worker_url(NODE, "a/b"), "id": next(iter(gateway.workers)),
             "status": "ready"}]
        assert registrar.status()["last_sync"]["ok"] is True
        await registrar.close()

    run(test)


def test_workers_of_this_node_that_it_does_not_serve_are_removed_and_others_left() -> None:
    async def test(gateway: FakeGateway, registry: Registry) -> None:
        gateway.workers["x"] = {"id": "x", "url": worker_url(NODE, "old"), "status": "ready",
                                "labels": {"gpud_node": NODE}}
        gateway.workers["y"] = {"id": "y", "url": "http://other:8000/m/old", "status": "ready",
                                "labels": {"gpud_node": "http://other:8000"}}
        gateway.workers["z"] = {"id": "z", "url": "http://manual:1", "status": "ready", "labels": {}}
        registrar = Registrar(settings_for(gateway), registry)
        await registrar.sync()
        assert gateway.workers["x"]["status"] == "draining"
        assert gateway.workers["y"]["status"] == gateway.workers["z"]["status"] == "ready"
        await registrar.close()

    run(test)


def test_the_loop_follows_the_registry_without_waiting_for_sync_sec() -> None:
    async def test(gateway: FakeGateway, registry: Registry) -> None:
        registrar = Registrar(settings_for(gateway, sync_sec=60.0), registry)
        loop = asyncio.create_task(registrar.run())
        model = add_model(registry, "m", ReplicaState.STARTING)
        await until(lambda: gateway.count("GET") >= 1, "the first pass")
        assert not gateway.posted  # starting: not yet
        registry.set_state(model.replicas[0], ReplicaState.READY)
        await until(lambda: worker_url(NODE, "m") in gateway.live(), "the registration")
        seen = registrar.events_seen
        for replica_state in (ReplicaState.BACKOFF, ReplicaState.STARTING):  # a restart keeps it registered
            registry.set_state(model.replicas[0], replica_state)
        await until(lambda: registrar.events_seen >= seen + 2, "the loop to look at both changes")
        assert worker_url(NODE, "m") in gateway.live() and gateway.count("DELETE") == 0
        registry.set_state(model.replicas[0], ReplicaState.FAILED)  # failed for good: removed
        await until(lambda: not gateway.live(), "the removal")
        gets, seen = gateway.count("GET"), registrar.events_seen
        for _ in range(20):  # changes that do not alter what is wanted cost the gateway nothing
            registry.changed("m")
        await until(lambda: registrar.events_seen >= seen + 20, "the loop to look at every change")
        assert gateway.count("GET") == gets
        loop.cancel()
        await asyncio.gather(loop, return_exceptions=True)
        await registrar.close()

    run(test)


def test_deregister_returns_once_the_gateway_stopped_sending() -> None:
    async def test(gateway: FakeGateway, registry: Registry) -> None:
        model = add_model(registry, "m")
        registrar = Registrar(settings_for(gateway), registry)
        await registrar.sync()
        model.stopping = True  # what `model stop` has done when it calls the hook
        started = time.monotonic()
        await registrar.deregister(model)
        assert time.monotonic() - started < 2.5  # not deregister_timeout_sec (3 s): it saw the draining
        assert [w["status"] for w in gateway.workers.values()] == ["draining"]
        # A model the gateway never had costs no call at all.
        calls = len(gateway.calls)
        await registrar.deregister(add_model(registry, "never", ReplicaState.STARTING))
        assert len(gateway.calls) == calls
        await registrar.close()

    run(test)


def test_close_removes_every_worker_of_this_node() -> None:
    async def test(gateway: FakeGateway, registry: Registry) -> None:
        for name in ("a", "b", "c"):
            add_model(registry, name)
        registrar = Registrar(settings_for(gateway), registry)
        await registrar.sync()
        assert len(gateway.live()) == 3
        await registrar.close()
        assert not gateway.live() and len(gateway.workers) == 3  # all draining

    run(test)


def test_close_and_deregister_do_not_wait_on_a_gateway_that_is_down() -> None:
    async def test(gateway: FakeGateway, registry: Registry) -> None:
        model = add_model(registry, "m")
        registrar = Registrar(settings_for(gateway), registry)
        await registrar.sync()
        await gateway.stop()
        assert await registrar.sync() is None
        model.stopping = True
        started = time.monotonic()
        await registrar.deregister(model)
        await registrar.close()
        assert time.monotonic() - started < 2.5  # not deregister_timeout_sec (3 s) for each: at once

    run(test)


def test_a_gateway_that_is_down_is_logged_once_retried_with_backoff_and_caught_up(
        caplog: pytest.LogCaptureFixture) -> None:
    async def test(gateway: FakeGateway, registry: Registry) -> None:
        add_model(registry, "m")
        await gateway.stop()
        registrar = Registrar(settings_for(gateway, sync_sec=2.0), registry)
        delays = []
        for _ in range(6):
            delays.append(registrar.next_delay(await registrar.sync()))
        assert delays == [FIRST_BACKOFF_SEC, 1.0, 2.0, 2.0, 2.0, 2.0]  # doubling, up to sync_sec
        assert registrar.status()["last_sync"]["ok"] is False
        assert "Cannot reach the gateway" in registrar.status()["last_sync"]["error"]
        await gateway.start()  # back, on the same port, knowing nothing
        plan = await registrar.sync()
        assert plan is not None and registrar.next_delay(plan) == 1.0  # soon: to see the registration land
        assert list(gateway.live()) == [worker_url(NODE, "m")]
        await registrar.sync()
        assert registrar.next_delay(await registrar.sync()) == 2.0
        await registrar.close()

    with caplog.at_level(logging.INFO, logger=LOGGER):
        run(test)
    lines = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert sum("Cannot reach the gateway" in line for line in lines) == 1, lines
    assert sum("in sync again" in line for line in lines) == 1, lines


def test_refusals_and_garbage_are_logged_once_each_and_never_crash(caplog: pytest.LogCaptureFixture) -> None:
    async def test(gateway: FakeGateway, registry: Registry) -> None:
        add_model(registry, "m")
        registrar = Registrar(settings_for(gateway), registry)
        for mode in ("401", "401", "500", "500", "garbage", "garbage", "shape", "ok", "ok"):
            gateway.mode = mode
            await registrar.sync()
            assert registrar.status()["last_sync"]["ok"] is (mode == "ok")
        assert list(gateway.live()) == [worker_url(NODE, "m")]
        await registrar.close()

    with caplog.at_level(logging.INFO, logger=LOGGER):
        run(test)
    lines = [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno >= logging.ERROR]
    assert len(lines) == 3, lines  # one per state: refused, failing, garbage (not JSON or not the shape)
    assert "HTTP 401" in lines[0] and "cluster.api_key" in lines[0]
    assert "HTTP 500" in lines[1] and "database on fire" in lines[1]
    assert "not JSON" in lines[2]


def test_the_control_plane_key_is_sent() -> None:
    async def test(gateway: FakeGateway, registry: Registry) -> None:
        add_model(registry, "m")
        wrong = Registrar(settings_for(gateway, api_key="nope"), registry)
        await wrong.sync()
        assert not gateway.live() and "cluster.api_key" in wrong.status()["last_sync"]["error"]
        await wrong.close()
        right = Registrar(settings_for(gateway, api_key="s3cret"), registry)
        await right.sync()
        assert list(gateway.live()) == [worker_url(NODE, "m")]
        await right.close()

    run(test, api_key="s3cret")


def test_a_url_registered_by_somebody_else_is_a_conflict(caplog: pytest.LogCaptureFixture) -> None:
    async def test(gateway: FakeGateway, registry: Registry) -> None:
        add_model(registry, "m")
        gateway.workers["s"] = {"id": "s", "url": worker_url(NODE, "m"), "status": "ready", "labels": {}}
        registrar = Registrar(settings_for(gateway), registry)
        for _ in range(3):
            await registrar.sync()
        assert gateway.count("POST") == 0 and gateway.count("DELETE") == 0
        assert [w["status"] for w in registrar.status()["workers"]] == ["conflict"]
        await registrar.close()
        assert gateway.workers["s"]["status"] == "ready"  # not ours: never removed

    with caplog.at_level(logging.INFO, logger=LOGGER):
        run(test)
    assert sum("not this node's" in r.getMessage() for r in caplog.records) == 1


def test_a_registration_the_gateway_never_lists_is_sent_again_and_reported_once(
        caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]

    async def test(gateway: FakeGateway, registry: Registry) -> None:
        add_model(registry, "m")
        gateway.list_new = False  # the gateway cannot reach the worker: its first probe fails
        registrar = Registrar(settings_for(gateway, sync_sec=10.0), registry, clock=lambda: now[0])
        await registrar.sync()
        now[0] = 5.0
        await registrar.sync()
        assert gateway.count("POST") == 1  # still pending: not sent twice
        assert [w["status"] for w in registrar.status()["workers"]] == ["registering"]
        for t in (11.0, 22.0, 33.0):
            now[0] = t
            await registrar.sync()
        assert gateway.count("POST") == 4
        assert registrar.status()["last_sync"]["ok"] is False
        assert "can it reach http://127.0.0.1:8000" in registrar.status()["last_sync"]["error"]
        gateway.list_new = True
        now[0] = 44.0
        await registrar.sync()
        await registrar.sync()
        assert registrar.status()["last_sync"]["ok"] is True
        await registrar.close()

    with caplog.at_level(logging.INFO, logger=LOGGER):
        run(test)
    messages = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert sum("registering model m" in m for m in messages) == 1, messages
    assert sum("has not listed it" in m for m in messages) == 1, messages


def test_a_draining_worker_is_waited_for_then_replaced() -> None:
    async def test(gateway: FakeGateway, registry: Registry) -> None:
        gateway.workers["old"] = {"id": "old", "url": worker_url(NODE, "m"), "status": "draining",
                                  "labels": {"gpud_node": NODE}}
        add_model(registry, "m")
        registrar = Registrar(settings_for(gateway), registry)
        plan = await registrar.sync()
        assert plan is not None and not plan.register and registrar.next_delay(plan) == 1.0
        assert gateway.count("POST") == 0
        gateway.drain()
        await registrar.sync()
        assert list(gateway.live()) == [worker_url(NODE, "m")]
        await registrar.close()

    run(test)


def test_a_restored_model_keeps_its_worker_while_it_starts_again() -> None:
    async def test(gateway: FakeGateway, registry: Registry) -> None:
        # A daemon restarted after SIGKILL: its workers are still on the gateway, its models starting again.
        gateway.workers["w"] = {"id": "w", "url": worker_url(NODE, "m"), "status": "not_ready",
                                "labels": {"gpud_node": NODE, "zone": "a"}}
        gateway.workers["v"] = {"id": "v", "url": worker_url(NODE, "gone"), "status": "not_ready",
                                "labels": {"gpud_node": NODE, "zone": "a"}}
        add_model(registry, "m", ReplicaState.STARTING)
        registrar = Registrar(settings_for(gateway), registry)
        await registrar.sync()
        assert gateway.workers["w"]["status"] == "not_ready"  # kept: the gateway's probe lets it back in
        assert gateway.workers["v"]["status"] == "draining"  # no such model any more
        await registrar.close()

    run(test)


def test_the_loop_ends_when_cancelled_as_an_event_arrives() -> None:
    # The daemon's shutdown closes the registry (an event for every subscriber) and cancels the loop in the
    # same moment; asyncio.wait_for could swallow such a cancellation, and the daemon then never exited.
    async def test(gateway: FakeGateway, registry: Registry) -> None:
        registrar = Registrar(settings_for(gateway), registry)
        loop = asyncio.create_task(registrar.run())
        await until(lambda: gateway.count("GET") >= 1, "the first pass")
        await asyncio.sleep(0)  # the loop is waiting for the next event now
        registry.close()
        loop.cancel()
        done, _ = await asyncio.wait({loop}, timeout=2)
        assert done and loop.cancelled()
        await registrar.close()

    run(test)


def test_an_unloading_model_stays_registered_a_stopping_one_does_not() -> None:
    async def test(gateway: FakeGateway, registry: Registry) -> None:
        model = add_model(registry, "m")
        registrar = Registrar(settings_for(gateway), registry)
        await registrar.sync()
        assert list(gateway.live()) == [worker_url(NODE, "m")]
        model.operation = Operation.UNLOAD  # an idle timeout's unload: requests meanwhile wait for the wake
        model.replicas[0].state = ReplicaState.STOPPING
        assert model.state() is ModelState.STOPPING
        await registrar.sync()
        assert list(gateway.live()) == [worker_url(NODE, "m")] and gateway.count("DELETE") == 0
        model.stopping = True  # `gpud model stop`: gone from this node
        await registrar.sync()
        await until(lambda: list(gateway.live()) == [], "the stopped model's worker to go")
        await registrar.close()

    run(test)
