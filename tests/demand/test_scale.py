"""Load-based scaling decisions (pure): sustained load adds one replica, sustained quiet removes one."""

from __future__ import annotations

from gpud.demand.scale import Direction, ScaleController, ScaleView


def view(inflight: list[int], *, replicas: int | None = None, floor: int = 1, ceiling: int = 4,
         busy: bool = False) -> ScaleView:
    return ScaleView("m", floor, ceiling, 8, len(inflight) if replicas is None else replicas, inflight, busy)


def test_up_after_load_holds_for_up_after_sec_in_a_row() -> None:
    c = ScaleController(up_after_sec=5, down_after_sec=60)
    assert c.observe(view([8]), 0) is None
    assert c.observe(view([9]), 4.9) is None
    decision = c.observe(view([8]), 5.0)
    assert decision is not None and (decision.direction, decision.to) == (Direction.UP, 2)
    assert "at least 8 requests in flight for 5 s" in decision.why
    assert c.observe(view([8]), 5.1) is None  # the clock starts again after a decision


def test_a_dip_starts_the_clock_again() -> None:
    c = ScaleController(up_after_sec=5, down_after_sec=60)
    c.observe(view([8, 8]), 0)
    c.observe(view([8, 7]), 3)  # one replica below the target: not every replica is loaded
    assert c.observe(view([8, 8]), 6) is None
    assert c.observe(view([8, 8]), 11) is not None


def test_never_above_the_ceiling_nor_while_busy_or_starting() -> None:
    c = ScaleController(up_after_sec=1, down_after_sec=1)
    for t in range(5):
        assert c.observe(view([9, 9, 9, 9]), t) is None  # at max_replicas
        assert c.observe(view([9, 9], replicas=3), t) is None  # a replica is still starting
        assert c.observe(view([9], busy=True), t) is None


def test_down_after_quiet_holds_for_down_after_sec_and_never_below_the_floor() -> None:
    c = ScaleController(up_after_sec=5, down_after_sec=60)
    # 3 replicas, floor 1: fewer than 8 x 2 = 16 in flight for 60 s removes one.
    assert c.observe(view([5, 5, 5]), 0) is None
    decision = c.observe(view([5, 5, 5]), 60)
    assert decision is not None and (decision.direction, decision.to) == (Direction.DOWN, 2)
    assert "fewer than 16 requests in flight" in decision.why
    c2 = ScaleController(up_after_sec=5, down_after_sec=1)
    for t in range(5):
        assert c2.observe(view([0, 0], floor=2), t) is None


def test_forget_starts_from_nothing() -> None:
    c = ScaleController(up_after_sec=5, down_after_sec=60)
    c.observe(view([8]), 0)
    c.forget("m")
    assert c.known() == [] and c.observe(view([8]), 5) is None
