"""The supervisor in-process: one event loop, sim GPUs, a tiny `python -c` HTTP server as the engine.

Each edge of a replica's life costs a process start here, not a daemon start.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from helpers import InProcess, tiny_engine_body
from helpers import run_in_process as run

from gpud.registry import Model, Replica, ReplicaState
from gpud.spec import MANAGED_ENV, ModelSpec

GiB = 2**30


def environ_of(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    return dict(item.split("=", 1) for item in raw.decode().split("\0") if "=" in item)


def add_model(h: InProcess, gpus: list[tuple[int, ...]], **fields: Any) -> Model:
    model = Model(ModelSpec.from_json(tiny_engine_body(replicas=len(gpus), **fields)))
    for i, replica_gpus in enumerate(gpus):
        model.replicas[i] = Replica(model.name, i, replica_gpus, (10 * GiB,) * len(replica_gpus))
    h.registry.models[model.name] = model
    return model


def test_a_replica_starts_with_its_gpus_is_owned_and_stops_leaving_nothing(tmp_path: Path) -> None:
    async def test(h: InProcess) -> None:
        model = add_model(h, [(1,)], env={"A": "1"})
        replica = model.replicas[0]
        ended: list[Replica] = []
        h.supervisor.launch(model, replica, ended.append)
        await h.wait(lambda: replica.state is ReplicaState.READY, what="ready")
        env = environ_of(replica.pid or 0)
        assert (env["CUDA_VISIBLE_DEVICES"], env["GPUD_MODEL"], env["GPUD_REPLICA"], env["A"]) == ("1", "tiny", "0", "1")
        assert env["GPUD_PORT"] == str(replica.port)
        assert replica.pid in h.owned.all()  # the ledger will not count its GPU memory twice
        await h.supervisor.stop("tiny", 0)
        assert replica.state is ReplicaState.STOPPED and replica.pid is None
        assert not h.owned.all() and ended == []  # stopped on request: the caller decides about memory

    run(test, tmp_path)


def test_a_crash_loop_ends_failed_once_and_reports_it(tmp_path: Path) -> None:
    async def test(h: InProcess) -> None:
        model = add_model(h, [(0,)], env={"EXIT_AFTER": "0", "EXIT_CODE": "3"})
        ended: list[Replica] = []
        h.supervisor.launch(model, model.replicas[0], ended.append)
        replica = model.replicas[0]
        await h.wait(lambda: replica.state is ReplicaState.FAILED, what="failed")
        assert ended == [replica]
        assert replica.restarts == 2 and replica.last_exit == {"code": 3, "signal": None}
        assert "failed more than 2 times" in (replica.message or "")
        assert not h.owned.all()

    run(test, tmp_path, start_limit_burst=2)


def test_a_clean_exit_with_restart_no_is_stopped_and_reported(tmp_path: Path) -> None:
    async def test(h: InProcess) -> None:
        model = add_model(h, [(0,)], env={"EXIT_AFTER": "0.3", "EXIT_CODE": "0"})
        ended: list[Replica] = []
        replica = model.replicas[0]
        h.supervisor.launch(model, replica, ended.append)
        await h.wait(lambda: ended, what="the end report")
        assert replica.state is ReplicaState.STOPPED
        assert replica.message == "exited normally (code 0); restart=no does not restart it"

    run(test, tmp_path, restart="no")


def test_a_start_timeout_names_the_path_and_its_answer(tmp_path: Path) -> None:
    async def test(h: InProcess) -> None:
        # Long enough for the tiny server to listen even on a loaded machine: the answer must be its 404.
        model = add_model(h, [(0,)], env={"STATUS": "404"}, health_path="/ready", start_timeout_sec=10)
        replica = model.replicas[0]
        h.supervisor.launch(model, replica, lambda r: None)
        await h.wait(lambda: replica.state is ReplicaState.BACKOFF, what="backoff")
        assert replica.message is not None
        assert replica.message.startswith(f"did not become ready within 10 s (GET /ready on port {replica.port}: HTTP 404)")

    run(test, tmp_path)


def test_replicas_sharing_a_gpu_start_in_turn_and_a_waiting_one_stops_at_once(tmp_path: Path) -> None:
    async def test(h: InProcess) -> None:
        # Replica 0 answers 503 for a long time: it holds GPU 0's start turn. Replica 1 waits for it.
        model = add_model(h, [(0,), (0,)], env={"STATUS": "503"}, start_timeout_sec=30)
        first, second = model.replicas[0], model.replicas[1]
        h.supervisor.launch(model, first, lambda r: None)
        await h.wait(lambda: first.state is ReplicaState.STARTING, what="replica 0 starting")
        h.supervisor.launch(model, second, lambda r: None)
        await h.wait(lambda: second.state is ReplicaState.PENDING, what="replica 1 pending")
        began = time.monotonic()
        await h.supervisor.stop("tiny", 1)
        # Not its 30 s start timeout (nor the first replica's): the stop of a waiting replica does not wait.
        assert time.monotonic() - began < 10 and second.pid is None and second.state is ReplicaState.STOPPED
        assert first.state is ReplicaState.STARTING

    run(test, tmp_path)


def test_a_connection_failure_takes_a_replica_out_until_its_health_check_passes(tmp_path: Path) -> None:
    async def test(h: InProcess) -> None:
        model = add_model(h, [(0,)])
        replica = model.replicas[0]
        h.supervisor.launch(model, replica, lambda r: None)
        await h.wait(lambda: replica.state is ReplicaState.READY, what="ready")
        h.supervisor.connect_failed(replica)
        assert replica.state is ReplicaState.UNHEALTHY
        await h.wait(lambda: replica.state is ReplicaState.READY, what="ready again")
        assert replica.restarts == 0

    run(test, tmp_path)


def test_every_variable_gpud_manages_is_set_and_wins_over_the_models_own(tmp_path: Path) -> None:
    async def test(h: InProcess) -> None:
        # A spec cannot set them (refused at validation); gpud's values win over the daemon's environment.
        model = add_model(h, [(1,)])
        env = h.supervisor.replica_env(model, model.replicas[0])
        assert set(MANAGED_ENV) <= set(env)
        assert (env["CUDA_VISIBLE_DEVICES"], env["GPUD_MODEL"], env["GPUD_REPLICA"]) == ("1", "tiny", "0")

    run(test, tmp_path)
