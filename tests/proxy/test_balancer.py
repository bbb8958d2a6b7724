"""gpud.proxy.balancer.choose: least in-flight among ready replicas, ties rotating in index order (pure)."""

from __future__ import annotations

from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st

from gpud.proxy.balancer import choose
from gpud.registry import Model, Replica, ReplicaState
from gpud.spec import ModelSpec

READY = ReplicaState.READY


def make_model(states: list[ReplicaState], inflight: list[int] | None = None) -> Model:
    model = Model(spec=ModelSpec(name="m", model="m", engine="sim", replicas=len(states)))
    for i, state in enumerate(states):
        model.replicas[i] = Replica(
            model="m",
            index=i,
            gpus=(),
            vram_by_gpu=(),
            port=1000 + i,
            state=state,
            inflight=(inflight or [0] * len(states))[i],
        )
    return model


def picks(model: Model, n: int) -> list[int]:
    out = []
    for _ in range(n):
        replica = choose(model)
        assert replica is not None
        out.append(replica.index)
    return out


def test_sequential_requests_to_idle_replicas_rotate_3_3_3_in_index_order() -> None:
    model = make_model([READY] * 3)
    assert picks(model, 9) == [0, 1, 2, 0, 1, 2, 0, 1, 2]


def test_least_inflight_wins_over_rotation() -> None:
    model = make_model([READY] * 3, inflight=[2, 0, 1])
    assert choose(model).index == 1  # type: ignore[union-attr]
    model.replicas[1].inflight = 5
    assert choose(model).index == 2  # type: ignore[union-attr]


def test_only_ready_replicas_get_requests() -> None:
    states = [
        ReplicaState.STARTING,
        READY,
        ReplicaState.UNHEALTHY,
        ReplicaState.STOPPING,
        READY,
        ReplicaState.PENDING,
        ReplicaState.BACKOFF,
        ReplicaState.FAILED,
        ReplicaState.STOPPED,
    ]
    model = make_model(states)
    assert Counter(picks(model, 10)) == {1: 5, 4: 5}


def test_no_ready_replica_gives_none() -> None:
    assert choose(make_model([])) is None
    assert choose(make_model([ReplicaState.STARTING, ReplicaState.UNHEALTHY])) is None


def test_exclude_skips_replicas_by_index() -> None:
    model = make_model([READY] * 3, inflight=[0, 1, 1])
    assert choose(model, exclude={0}).index in (1, 2)  # type: ignore[union-attr]
    assert choose(model, exclude=[0, 1]).index == 2  # type: ignore[union-attr]
    assert choose(model, exclude=(0, 1, 2)) is None


def test_ties_among_a_subset_rotate_while_one_replica_is_busy() -> None:
    model = make_model([READY] * 3, inflight=[1, 0, 0])
    assert picks(model, 4) == [1, 2, 1, 2]


def test_rotation_wraps_when_replica_indices_have_gaps() -> None:
    # After scale-down/up indices need not be contiguous, nor inserted in order.
    model = Model(spec=ModelSpec(name="m", model="m", engine="sim", replicas=3))
    for i in (7, 2, 4):
        model.replicas[i] = Replica(model="m", index=i, gpus=(), vram_by_gpu=(), state=READY)
    assert picks(model, 6) == [2, 4, 7, 2, 4, 7]


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(st.sampled_from(list(ReplicaState)), st.integers(0, 4)), max_size=8),
    st.sets(st.integers(0, 7)),
    st.integers(0, 10),
)
def test_choice_is_a_ready_unexcluded_replica_with_minimum_inflight(
    replicas: list[tuple[ReplicaState, int]], exclude: set[int], rotation: int
) -> None:
    model = make_model([s for s, _ in replicas], [n for _, n in replicas])
    model.rotation = rotation
    eligible = [r for r in model.replicas.values() if r.state is READY and r.index not in exclude]
    chosen = choose(model, exclude)
    if not eligible:
        assert chosen is None
        return
    assert chosen is not None and chosen in eligible
    assert chosen.inflight == min(r.inflight for r in eligible)
    tied = sorted(r.index for r in eligible if r.inflight == chosen.inflight)
    # The tie goes to the first tied index at or above the cursor, wrapping around.
    assert chosen.index == next((i for i in tied if i >= rotation), tied[0])
    assert model.rotation == chosen.index + 1


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 8), st.integers(1, 5), st.integers(0, 20))
def test_equal_load_is_spread_evenly_from_any_cursor(n: int, rounds: int, rotation: int) -> None:
    model = make_model([READY] * n)
    model.rotation = rotation
    assert Counter(picks(model, n * rounds)) == {i: rounds for i in range(n)}
