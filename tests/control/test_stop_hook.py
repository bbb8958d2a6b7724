"""`model stop` awaits the service's before_stop hook first, while the model still serves (SPEC §16: the
gateway's worker is removed before the model leaves the proxy and drains)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from helpers import InProcess, tiny_engine_body
from helpers import run_in_process as run

from gpud.registry import Model, ReplicaState
from gpud.spec import ModelSpec


def test_the_hook_runs_before_any_replica_leaves_the_balancer(tmp_path: Path) -> None:
    async def test(h: InProcess) -> None:
        seen: list[tuple[bool, list[ReplicaState]]] = []
        release = asyncio.Event()

        async def before_stop(model: Model) -> None:
            seen.append((model.stopping, [r.state for r in model.replicas.values()]))
            await release.wait()

        h.service.before_stop = before_stop
        model = await h.service.start_model(ModelSpec.from_json(tiny_engine_body(replicas=2)))
        await h.wait(lambda: model.operation is None and len(model.ready_replicas()) == 2, what="ready")
        await h.service.stop_model("tiny")
        await h.wait(lambda: seen, what="the hook")
        await asyncio.sleep(0.1)  # the hook holds the stop: nothing may have changed meanwhile
        assert seen == [(True, [ReplicaState.READY, ReplicaState.READY])]
        assert len(model.ready_replicas()) == 2 and "tiny" in h.registry.models
        release.set()
        await h.wait(lambda: "tiny" not in h.registry.models, what="the stop to finish")

    run(test, tmp_path)
