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
from gpud.registry import Model, ReplicaState
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
        # 2 s: time enough for the tiny server to listen even on a busy machine (then it answers 404).
        model = await h.service.start_model(spec(env={"STATUS": "404"}, start_timeout_sec=2))
        await settled(h, model)
        replica = model.replicas[0]
        assert replica.state is ReplicaState.FAILED
        assert f"GET /health on port {replica.port}: HTTP 404" in (replica.message or "")

    run(test, tmp_path, start_limit_burst=0)
