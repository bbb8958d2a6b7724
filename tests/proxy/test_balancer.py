"""gpud.proxy.balancer.choose: least in-flight among ready replicas, ties rotating in index order (pure)."""

from __future__ import annotations

from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st

from gpud.proxy.balancer import choose
from gpud.proxy.table import ModelRoute, ReplicaRoute
from gpud.registry import ReplicaState

READY = ReplicaState.READY


class Model:
    """A model route with in-flight counts by slot and the cursor, as a worker sees them."""

    def __init__(self, states: list[ReplicaState], inflight: list[int] | None = None,
                 indices: list[int] | None = None) -> None:
        indices = indices or list(range(len(states)))
        self.route = ModelRoute.of("m", 0, "running", 0.0, (
            ReplicaRoute(i, 1000 + i, slot, s.value) for slot, (i, s) in enumerate(zip(indices, states, strict=True))))
        self.load = {slot: n for slot, n in enumerate(inflight or [0] * len(states))}
        self.cursor = 0

    def choose(self, exclude: tuple[int, ...] = ()) -> ReplicaRoute | None:
        replica, self.cursor = choose(self.route.ready, self.load.__getitem__, self.cursor, exclude)
        return replica

    def picks(self, n: int) -> list[int]:
        out = []
        for _ in range(n):
            replica = self.choose()
            assert replica is not None
            out.append(replica.index)
        return out


def test_sequential_requests_to_idle_replicas_rotate_3_3_3_in_index_order() -> None:
    assert Model([READY] * 3).picks(9) == [0, 1, 2, 0, 1, 2, 0, 1, 2]


def test_least_inflight_wins_over_rotation() -> None:
    model = Model([READY] * 3, inflight=[2, 0, 1])
    assert model.choose().index == 1  # type: ignore[union-attr]
    model.load[1] = 5
    assert model.choose().index == 2  # type: ignore[union-attr]


def test_only_ready_replicas_get_requests() -> None:
    states = [ReplicaState.STARTING, READY, ReplicaState.UNHEALTHY, ReplicaState.STOPPING, READY,
              ReplicaState.PENDING, ReplicaState.BACKOFF, ReplicaState.FAILED, ReplicaState.STOPPED]
    assert set(Model(states).picks(6)) == {1, 4}


def test_no_ready_replica_gives_none() -> None:
    assert Model([ReplicaState.STARTING, ReplicaState.FAILED]).choose() is None
    assert Model([]).choose() is None


def test_exclude_skips_replicas_by_index() -> None:
    model = Model([READY] * 3)
    assert model.choose(exclude=(0,)).index == 1  # type: ignore[union-attr]
    assert model.choose(exclude=(0, 1, 2)) is None


def test_ties_among_a_subset_rotate_while_one_replica_is_busy() -> None:
    model = Model([READY] * 3, inflight=[0, 4, 0])
    assert model.picks(4) == [0, 2, 0, 2]


def test_rotation_wraps_when_replica_indices_have_gaps() -> None:
    model = Model([READY] * 3, indices=[0, 3, 7])
    assert model.picks(6) == [0, 3, 7, 0, 3, 7]


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.sampled_from(list(ReplicaState)), min_size=1, max_size=8),
    st.lists(st.integers(0, 5), min_size=8, max_size=8),
    st.integers(0, 10),
    st.sets(st.integers(0, 7)),
)
def test_choice_is_a_ready_unexcluded_replica_with_minimum_inflight(
    states: list[ReplicaState], load: list[int], cursor: int, exclude: set[int]
) -> None:
    model = Model(states, inflight=load[: len(states)])
    model.cursor = cursor
    chosen = model.choose(tuple(exclude))
    candidates = [i for i, s in enumerate(states) if s is READY and i not in exclude]
    if not candidates:
        assert chosen is None
        return
    assert chosen is not None and chosen.index in candidates
    assert load[chosen.index] == min(load[i] for i in candidates)


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 8), st.integers(1, 5), st.integers(0, 20))
def test_equal_load_is_spread_evenly_from_any_cursor(n: int, rounds: int, rotation: int) -> None:
    model = Model([READY] * n)
    model.cursor = rotation
    counts = Counter(model.picks(n * rounds))
    assert set(counts.values()) == {rounds}
