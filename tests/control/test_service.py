"""The model service in-process: placement, the reservations it owns, and its operations on real processes.

The service is the one owner of GPU reservations; these tests hold the ledger against each path that
takes or gives memory back, without a daemon.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from helpers import InProcess, tiny_engine_body
from helpers import run_in_process as run

from gpud.errors import DoesNotFit, GpudError
from gpud.registry import Model, Operation, ReplicaState
from gpud.spec import ModelSpec

GiB = 2**30


def spec(**fields: Any) -> ModelSpec:
    return ModelSpec.from_json(tiny_engine_body(**fields))


async def settled(h: InProcess, model: Model) -> None:
    await h.wait(lambda: model.operation is None, what=f"{model.name} to settle")


def test_start_reserves_and_stop_gives_everything_back(tmp_path: Path) -> None:
    async def test(h: InProcess) -> None:
        model = await h.service.start_model(spec(replicas=3))
        await settled(h, model)
        assert model.state().value == "running"
        assert h.reserved() == [20 * GiB, 10 * GiB]
        await h.service.stop_model("tiny")
        await h.wait(lambda: "tiny" not in h.registry.models, what="removed")
        assert h.reserved() == [0, 0] and not h.owned.all()

    run(test, tmp_path)


def test_a_replica_that_fails_for_good_gives_its_memory_back(tmp_path: Path) -> None:
    async def test(h: InProcess) -> None:
        model = await h.service.start_model(spec(env={"EXIT_AFTER": "0", "EXIT_CODE": "1"}))
        await settled(h, model)
        assert model.replicas[0].state is ReplicaState.FAILED
        assert h.reserved() == [0, 0]

    run(test, tmp_path, start_limit_burst=1)


def test_a_restart_keeps_the_reservation_the_whole_time(tmp_path: Path) -> None:
    async def test(h: InProcess) -> None:
        model = await h.service.start_model(spec(replicas=2))
        await settled(h, model)
        seen: set[tuple[int, ...]] = set()
        queue = h.registry.subscribe()
        await h.service.restart("tiny")
        while model.operation is not None:
            seen.add(tuple(h.reserved()))
            await queue.get()
        h.registry.unsubscribe(queue)
        assert seen == {(10 * GiB, 10 * GiB)}
        assert all(r.state is ReplicaState.READY for r in model.replicas.values())

    run(test, tmp_path)


def test_restarting_a_replica_that_lost_its_reservation_places_it_again(tmp_path: Path) -> None:
    """A replica that fails for good while a rolling restart goes through the others gives its memory back
    (on_end); when the restart reaches it, it must be placed and reserved again, not launched on nothing."""

    async def test(h: InProcess) -> None:
        model = await h.service.start_model(spec(replicas=2))
        await settled(h, model)
        assert h.reserved() == [10 * GiB, 10 * GiB]
        h.service.placer.release("tiny", [1])  # what the replica's on_end does when it fails for good
        assert h.reserved() == [10 * GiB, 0]
        fresh = await h.service._restart_one(model, model.replicas[1])
        assert h.service.placer.holds("tiny", 1) and sorted(h.reserved()) == [10 * GiB, 10 * GiB]
        await h.wait(lambda: fresh.state is ReplicaState.READY, what="the replica placed again to be ready")

    run(test, tmp_path)


def test_an_operation_that_fails_half_way_leaves_no_reservation_behind(tmp_path: Path) -> None:
    async def test(h: InProcess) -> None:
        model = await h.service.start_model(spec(replicas=1))
        await settled(h, model)
        new = h.service.placer.place(model.spec, 1, 1)  # a scale reserves replica 1 …

        async def broken() -> None:
            h.service.placer.reserve(model.spec, new)
            raise RuntimeError("a bug between the reservation and the launch")  # … and fails before adding it

        h.service._begin(model, Operation.SCALE, broken())
        await settled(h, model)
        assert not h.service.placer.holds("tiny", 1) and h.service.placer.holds("tiny", 0)
        assert sorted(h.reserved()) == [0, 10 * GiB]

    run(test, tmp_path)


def test_scale_reserves_new_replicas_and_releases_removed_ones(tmp_path: Path) -> None:
    async def test(h: InProcess) -> None:
        model = await h.service.start_model(spec(replicas=1))
        await settled(h, model)
        await h.service.scale("tiny", 4)
        await settled(h, model)
        assert h.reserved() == [20 * GiB, 20 * GiB] and sorted(model.replicas) == [0, 1, 2, 3]
        await h.service.scale("tiny", 1)
        await settled(h, model)
        assert h.reserved() == [10 * GiB, 0] and sorted(model.replicas) == [0]

    run(test, tmp_path)


def test_a_start_that_does_not_fit_changes_nothing(tmp_path: Path) -> None:
    async def test(h: InProcess) -> None:
        with pytest.raises(DoesNotFit):
            await h.service.start_model(spec(replicas=3, vram="50GiB"))
        assert h.reserved() == [0, 0] and not h.registry.models and not (h.root / "state.json").exists()

    run(test, tmp_path)


def test_a_failed_prepare_gives_the_memory_back(tmp_path: Path) -> None:
    async def test(h: InProcess) -> None:
        async def fail(model: Model) -> None:
            raise GpudError("the venv could not be built")

        h.service.prepare = fail
        model = await h.service.start_model(spec(replicas=2))
        await settled(h, model)
        assert h.reserved() == [0, 0]
        assert {r.message for r in model.replicas.values()} == {"the venv could not be built"}

    run(test, tmp_path)


def test_a_state_write_that_fails_leaves_no_reservation(tmp_path: Path) -> None:
    async def test(h: InProcess) -> None:
        # A directory where the state file goes: the rename onto it fails, as a full disk would (even as root).
        (h.root / "state.json").mkdir()
        (h.root / "state.json" / "x").touch()
        with pytest.raises(GpudError, match="Cannot save the state"):
            await h.service.start_model(spec())
        assert h.reserved() == [0, 0] and not h.registry.models

    run(test, tmp_path)


def test_a_start_timeout_message_says_what_was_polled(tmp_path: Path) -> None:
    async def test(h: InProcess) -> None:
        # Long enough for the tiny server to listen even on a loaded machine: the answer must be its 404.
        model = await h.service.start_model(spec(env={"STATUS": "404"}, start_timeout_sec=3))
        await settled(h, model)
        replica = model.replicas[0]
        assert replica.state is ReplicaState.FAILED
        assert f"GET /health on port {replica.port}: HTTP 404" in (replica.message or "")

    run(test, tmp_path, start_limit_burst=0)
