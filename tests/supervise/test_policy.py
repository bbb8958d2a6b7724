"""Restart policy and start limit: pure values with systemd's semantics."""

from __future__ import annotations

from gpud.config import SupervisorSettings
from gpud.supervise.policy import Restart, RestartPolicy, StartLimit


def policy(restart: Restart = Restart.ON_FAILURE, restart_sec: float = 0.1, cap: float = 30) -> RestartPolicy:
    return RestartPolicy(restart, restart_sec, cap)


def test_which_exits_restart() -> None:
    assert policy(Restart.ON_FAILURE).should_restart(clean_exit=False)
    assert not policy(Restart.ON_FAILURE).should_restart(clean_exit=True)
    assert policy(Restart.ALWAYS).should_restart(clean_exit=True)
    assert not policy(Restart.NO).should_restart(clean_exit=False)


def test_the_defaults_live_in_the_settings() -> None:
    s = SupervisorSettings()
    assert (s.restart, s.restart_sec, s.restart_max_delay_sec) == (Restart.ON_FAILURE, 0.1, 30.0)


def test_delay_doubles_from_restart_sec_up_to_the_cap() -> None:
    p = policy(restart_sec=0.1, cap=30)
    assert [p.delay(n) for n in range(1, 6)] == [0.1, 0.2, 0.4, 0.8, 1.6]
    assert p.delay(20) == 30
    assert p.delay(10_000) == 30  # no overflow
    assert policy(restart_sec=5, cap=1).delay(1) == 1


def test_start_limit_counts_failures_inside_the_interval() -> None:
    limit = StartLimit(burst=3, interval=10)
    assert [limit.record_failure(t) for t in (0, 1, 2)] == [False, False, False]
    assert limit.record_failure(3)  # the 4th within 10 s: more than burst
    spaced = StartLimit(burst=1, interval=10)
    assert not spaced.record_failure(0)
    assert not spaced.record_failure(10)  # the first one has left the window
    assert spaced.record_failure(11)
