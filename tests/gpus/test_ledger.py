"""Ledger arithmetic: headroom, memory used by others, owned pids, all-or-nothing reservations, JSON."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gpud.config import DEFAULT_HEADROOM_BYTES
from gpud.errors import Conflict, DoesNotFit, NotFound
from gpud.gpus.base import GpuProcess
from gpud.gpus.ledger import Ledger, OwnedPids, Reservation
from gpud.gpus.placement import GpuView
from gpud.gpus.sim import SimBackend, parse_sim_spec

GiB = 2**30
MiB = 2**20


def make(spec: str = "sim:2x24GiB", *, headroom: int = 0, owned: set[int] | None = None) -> tuple[Ledger, SimBackend]:
    backend = SimBackend(parse_sim_spec(spec))
    pids = owned if owned is not None else set()
    table = OwnedPids()
    table.set("m", 0, pids)
    return Ledger(backend, headroom_bytes=headroom, owned=table), backend


def r(model: str, replica: int, gpus: tuple[int, ...], vram: tuple[int, ...], exclusive: bool = False) -> Reservation:
    return Reservation(model=model, replica=replica, gpus=gpus, vram_by_gpu=vram, exclusive=exclusive)


def test_default_headroom_is_512mib() -> None:
    ledger = Ledger(SimBackend(parse_sim_spec("sim:24GiB")), headroom_bytes=DEFAULT_HEADROOM_BYTES)
    assert ledger.headroom_bytes == DEFAULT_HEADROOM_BYTES == 512 * MiB
    assert ledger.available(0) == 24 * GiB - 512 * MiB


def test_available_subtracts_used_by_others_reservations_and_headroom() -> None:
    ledger, _ = make("sim:80GiB,40GiB@10GiB", headroom=GiB)
    assert ledger.used_by_others(1) == 10 * GiB
    assert ledger.available(0) == 79 * GiB
    assert ledger.available(1) == 29 * GiB
    ledger.reserve([r("m", 0, (1,), (20 * GiB,))])
    assert ledger.reserved(1) == 20 * GiB
    assert ledger.available(1) == 9 * GiB
    assert ledger.available(0) == 79 * GiB


def test_owned_pids_memory_is_not_counted_twice() -> None:
    owned = OwnedPids()
    owned.set("m", 0, {1000})
    ledger = Ledger(backend := SimBackend(parse_sim_spec("sim:24GiB")), headroom_bytes=0, owned=owned)
    ledger.reserve([r("m", 0, (0,), (10 * GiB,))])
    # The replica (pid 1000) now really uses 9 GiB; someone else (pid 7) uses 3 GiB.
    backend.set_used(0, 12 * GiB, [GpuProcess(1000, 9 * GiB), GpuProcess(7, 3 * GiB)])
    ledger.refresh()
    assert ledger.used_by_others(0) == 3 * GiB
    assert ledger.available(0) == 24 * GiB - 3 * GiB - 10 * GiB
    # When the pid is no longer ours (e.g. the replica's tree changed), its memory counts as others'.
    owned.discard("m", 0)
    ledger.refresh()
    assert ledger.used_by_others(0) == 12 * GiB


def test_used_by_others_floors_at_zero() -> None:
    ledger, backend = make("sim:24GiB", owned={1})
    # Per-process figures can exceed the device total a driver reports at a slightly different moment.
    backend.set_used(0, GiB, [GpuProcess(1, 2 * GiB)])
    ledger.refresh()
    assert ledger.used_by_others(0) == 0


def test_owned_pids_read_after_backend() -> None:
    order: list[str] = []
    backend = SimBackend(parse_sim_spec("sim:24GiB"))
    real_read = backend.read

    def read() -> list:
        order.append("read")
        return real_read()

    class Owned(OwnedPids):
        def all(self) -> frozenset[int]:
            order.append("owned")
            return frozenset()

    backend.read = read  # type: ignore[method-assign]
    Ledger(backend, headroom_bytes=0, owned=Owned())
    assert order == ["read", "owned"]


def test_refresh_sees_new_usage() -> None:
    ledger, backend = make("sim:24GiB")
    backend.set_used(0, 4 * GiB)
    assert ledger.available(0) == 24 * GiB  # nothing changes until refresh
    ledger.refresh()
    assert ledger.available(0) == 20 * GiB


def test_available_may_go_negative_but_views_and_json_floor_it() -> None:
    ledger, backend = make("sim:24GiB", headroom=GiB)
    ledger.reserve([r("m", 0, (0,), (20 * GiB,))])
    backend.set_used(0, 8 * GiB)  # someone else grabbed memory after the reservation
    ledger.refresh()
    assert ledger.available(0) == 24 * GiB - 8 * GiB - 20 * GiB - GiB
    assert ledger.views()[0].available_bytes == 0
    assert ledger.to_json()["gpus"][0]["available_bytes"] == 0


def test_reserve_multi_gpu_and_views() -> None:
    ledger, _ = make("sim:3x24GiB")
    ledger.reserve([r("a", 0, (0, 1), (10 * GiB, 5 * GiB)), r("a", 1, (1, 2), (GiB, GiB))])
    assert ledger.views() == [
        GpuView(index=0, total_bytes=24 * GiB, available_bytes=14 * GiB, replicas=1, exclusive=False),
        GpuView(index=1, total_bytes=24 * GiB, available_bytes=18 * GiB, replicas=2, exclusive=False),
        GpuView(index=2, total_bytes=24 * GiB, available_bytes=23 * GiB, replicas=1, exclusive=False),
    ]


def test_reserve_exactly_available_fits() -> None:
    ledger, _ = make("sim:24GiB", headroom=GiB)
    ledger.reserve([r("m", 0, (0,), (23 * GiB,))])
    assert ledger.available(0) == 0


def test_reserve_too_much_changes_nothing() -> None:
    ledger, _ = make("sim:2x24GiB", headroom=GiB)
    ledger.reserve([r("old", 0, (1,), (3 * GiB,))])
    before = (ledger.reservations(), [ledger.available(i) for i in (0, 1)])
    with pytest.raises(DoesNotFit) as info:
        # The first replica fits on its own; the batch as a whole overfills GPU 1.
        ledger.reserve([r("m", 0, (0,), (GiB,)), r("m", 1, (1,), (15 * GiB,)), r("m", 2, (1,), (15 * GiB,))])
    assert (ledger.reservations(), [ledger.available(i) for i in (0, 1)]) == before
    err = info.value
    assert "GPU 1 needs 30 GiB but has 20 GiB available" in err.message
    assert err.message.endswith(".")
    assert err.details["plan"] == {"fits": False, "replicas": [], "reason": err.message}
    assert err.details["gpus"] == [
        {"index": 0, "needed_bytes": GiB, "available_bytes": 23 * GiB},
        {"index": 1, "needed_bytes": 30 * GiB, "available_bytes": 20 * GiB},
    ]


def test_reserve_unknown_gpu() -> None:
    ledger, _ = make("sim:24GiB")
    with pytest.raises(DoesNotFit, match="GPU 3 does not exist"):
        ledger.reserve([r("m", 0, (0, 3), (GiB, GiB))])
    assert ledger.reservations() == []


def test_reserve_on_gpu_not_ok() -> None:
    ledger, backend = make("sim:2x24GiB")
    backend.set_ok(1, False, "NVML error: GPU is lost")
    ledger.refresh()
    with pytest.raises(DoesNotFit, match=r"GPU 1 is not usable \(NVML error: GPU is lost\)"):
        ledger.reserve([r("m", 0, (0,), (GiB,)), r("m", 1, (1,), (GiB,))])
    assert ledger.reservations() == []


def test_reserve_existing_key_conflicts() -> None:
    ledger, _ = make()
    ledger.reserve([r("m", 0, (0,), (GiB,))])
    with pytest.raises(Conflict, match="model 'm' replica 0 already holds"):
        ledger.reserve([r("m", 1, (1,), (GiB,)), r("m", 0, (1,), (GiB,))])
    assert [x.replica for x in ledger.reservations()] == [0]


def test_reserve_duplicate_key_within_batch_conflicts() -> None:
    ledger, _ = make()
    with pytest.raises(Conflict):
        ledger.reserve([r("m", 0, (0,), (GiB,)), r("m", 0, (1,), (GiB,))])
    assert ledger.reservations() == []


def test_reserve_empty_batch_is_fine() -> None:
    ledger, _ = make()
    ledger.reserve([])
    assert ledger.reservations() == []


def test_exclusive_reservation() -> None:
    ledger, _ = make("sim:2x24GiB", headroom=GiB)
    ledger.reserve([r("big", 0, (0,), (ledger.available(0),), exclusive=True)])
    view = ledger.views()[0]
    assert (view.exclusive, view.replicas, view.available_bytes) == (True, 1, 0)
    # Even a zero-byte replica may not join a GPU held exclusively.
    with pytest.raises(DoesNotFit, match="exclusively"):
        ledger.reserve([r("small", 0, (0,), (0,))])
    # An exclusive replica may not take a GPU someone already uses.
    ledger.reserve([r("small", 0, (1,), (GiB,))])
    with pytest.raises(DoesNotFit, match="GPU 1 would be shared although the model 'big' replica 1"):
        ledger.reserve([r("big", 1, (1,), (GiB,), exclusive=True)])
    # Two exclusive replicas in one batch on one GPU conflict as well.
    ledger.release("small", 0)
    with pytest.raises(DoesNotFit):
        ledger.reserve([r("x", 0, (1,), (GiB,), exclusive=True), r("x", 1, (1,), (GiB,), exclusive=True)])
    ledger.reserve([r("big", 1, (1,), (ledger.available(1),), exclusive=True)])
    assert [v.exclusive for v in ledger.views()] == [True, True]


def test_release_and_release_model() -> None:
    ledger, _ = make()
    ledger.reserve([r("a", 0, (0,), (GiB,)), r("a", 1, (1,), (GiB,)), r("b", 0, (0,), (2 * GiB,))])
    assert [(x.model, x.replica) for x in ledger.reservations()] == [("a", 0), ("a", 1), ("b", 0)]
    assert [x.replica for x in ledger.reservations("a")] == [0, 1]
    ledger.release("a", 1)
    ledger.release("a", 1)  # absent: no-op
    ledger.release("nope", 0)
    assert [(x.model, x.replica) for x in ledger.reservations()] == [("a", 0), ("b", 0)]
    ledger.release_model("b")
    ledger.release_model("b")
    assert ledger.reservations("b") == []
    assert ledger.reserved(0) == GiB
    # A released key may be reserved again.
    ledger.reserve([r("b", 0, (1,), (GiB,))])


def test_to_json_shape() -> None:
    ledger, backend = make("sim:24GiB,24GiB@4GiB", headroom=GiB, owned={50})
    backend.set_used(0, 3 * GiB, [GpuProcess(50, 2 * GiB), GpuProcess(51, GiB)])
    backend.set_ok(1, False, "MIG mode is enabled; gpud does not place on MIG devices yet")
    ledger.refresh()
    ledger.reserve([r("chat", 0, (0,), (4 * GiB,)), r("chat", 1, (0,), (4 * GiB,))])
    assert ledger.to_json() == {
        "gpus": [
            {
                "index": 0, "name": "Simulated GPU 24GiB", "uuid": "GPU-sim-0000-0000-0000-000000000000",
                "total_bytes": 24 * GiB, "used_by_others_bytes": GiB, "reserved_bytes": 8 * GiB,
                "available_bytes": 14 * GiB,
                "replicas": [  # measured_bytes: null on the sim backend (tests/estimate/test_measured.py: NVML)
                    {"model": "chat", "index": 0, "reserved_bytes": 4 * GiB, "measured_bytes": None},
                    {"model": "chat", "index": 1, "reserved_bytes": 4 * GiB, "measured_bytes": None},
                ],
                "ok": True, "reason": None,
            },
            {
                "index": 1, "name": "Simulated GPU 24GiB", "uuid": "GPU-sim-0001-0000-0000-000000000000",
                "total_bytes": 24 * GiB, "used_by_others_bytes": 4 * GiB, "reserved_bytes": 0,
                "available_bytes": 0, "replicas": [],
                "ok": False, "reason": "MIG mode is enabled; gpud does not place on MIG devices yet",
            },
        ]
    }


def test_device_not_ok_offers_nothing_but_keeps_reservations() -> None:
    ledger, backend = make("sim:2x24GiB")
    ledger.reserve([r("m", 0, (1,), (4 * GiB,))])
    backend.set_ok(1, False, "gone")
    ledger.refresh()
    assert ledger.available(1) == 0
    assert ledger.views()[1] == GpuView(index=1, total_bytes=24 * GiB, available_bytes=0, replicas=1)
    assert ledger.reserved(1) == 4 * GiB  # freed only when the replica is really gone
    backend.set_ok(1, True)
    ledger.refresh()
    assert ledger.available(1) == 20 * GiB
    assert [d.ok for d in ledger.devices()] == [True, True]


def test_unknown_index_is_not_found() -> None:
    ledger, _ = make()
    with pytest.raises(NotFound, match=r"GPU 5 does not exist \(this machine has GPUs 0, 1\)"):
        ledger.available(5)


def test_malformed_reservation_is_a_bug() -> None:
    with pytest.raises(ValueError):
        r("m", 0, (0, 1), (GiB,))
    with pytest.raises(ValueError):
        r("m", 0, (0, 0), (GiB, GiB))
    with pytest.raises(ValueError):
        r("m", 0, (0,), (-1,))
    with pytest.raises(ValueError):
        Ledger(SimBackend(parse_sim_spec("sim:1GiB")), headroom_bytes=-1)


# A random batch: (gpu subset, vram per gpu in GiB, exclusive) per replica.
_batches = st.lists(
    st.tuples(st.sets(st.integers(0, 2), min_size=1, max_size=3), st.integers(0, 12), st.booleans()),
    min_size=1, max_size=3,
)


@settings(max_examples=150, deadline=None)
@given(st.lists(_batches, min_size=1, max_size=6))
def test_property_never_overcommits_and_failures_change_nothing(batches: list) -> None:
    ledger, _ = make("sim:3x24GiB", headroom=GiB)
    for n, batch in enumerate(batches):
        res = [r(f"m{n}", i, tuple(sorted(gpus)), (vram * GiB,) * len(gpus), excl)
               for i, (gpus, vram, excl) in enumerate(batch)]
        before = (ledger.reservations(), ledger.views())
        try:
            ledger.reserve(res)
        except DoesNotFit:
            assert (ledger.reservations(), ledger.views()) == before
        for index in range(3):
            assert ledger.available(index) >= 0
            holders = [x for x in ledger.reservations() if index in x.gpus]
            if any(x.exclusive for x in holders):
                assert len(holders) == 1
