"""Idle timers (pure): when the clock runs, when it starts again, when a model is due."""

from __future__ import annotations

from gpud.demand.idle import IdleView, due, idle_since


def view(**fields: object) -> IdleView:
    base: dict[str, object] = {"name": "m", "timeout_sec": 10.0, "loaded_at": 100.0, "last_request_at": None,
                               "inflight": 0, "busy": False}
    base.update(fields)
    return IdleView(**base)  # type: ignore[arg-type]


def test_the_clock_starts_when_the_model_is_running() -> None:
    assert idle_since(view()) == 100.0
    assert due([view()], 109.9) == [] and due([view()], 110.0) == ["m"]


def test_the_clock_starts_again_when_the_last_request_ends() -> None:
    v = view(last_request_at=150.0)
    assert due([v], 159.0) == [] and due([v], 160.0) == ["m"]
    assert due([v, view(name="n", loaded_at=120.0)], 130.0) == ["n"]


def test_never_idle_while_a_request_is_in_flight_nor_while_busy_nor_without_timeout() -> None:
    for v in (view(inflight=1), view(busy=True), view(timeout_sec=0.0), view(loaded_at=None)):
        assert idle_since(v) is None and due([v], 1e9) == []
