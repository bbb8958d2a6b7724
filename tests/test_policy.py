"""Restart policy and start limit: pure values with systemd's semantics."""

from __future__ import annotations

from gpud.supervise.policy import RestartPolicy, StartLimit


def test_which_exits_restart() -> None:
    assert RestartPolicy("on-failure").should_restart(clean_exit=False)
    assert not RestartPolicy("on-failure").should_restart(clean_exit=True)
    assert RestartPolicy("always").should_restart(clean_exit=True)
    assert not RestartPolicy("no").should_restart(clean_exit=False)


def test_delay_doubles_from_restart_sec_up_to_the_cap() -> None:
    policy = RestartPolicy(restart_sec=0.1, restart_max_delay_sec=30)
    assert [policy.delay(n) for n in range(1, 6)] == [0.1, 0.2, 0.4, 0.8, 1.6]
    assert policy.delay(20) == 30
    assert policy.delay(10_000) == 30  # no overflow
    assert RestartPolicy(restart_sec=5, restart_max_delay_sec=1).delay(1) == 1


def test_start_limit_counts_failures_inside_the_interval() -> None:
    limit = StartLimit(burst=3, interval=10)
    assert [limit.record_failure(t) for t in (0, 1, 2)] == [False, False, False]
    assert limit.record_failure(3)  # the 4th within 10 s: more than burst
    spaced = StartLimit(burst=1, interval=10)
    assert not spaced.record_failure(0)
    assert not spaced.record_failure(10)  # the first one has left the window
    assert spaced.record_failure(11)
