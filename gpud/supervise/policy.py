"""Restart policy as pure values: which exits restart, the backoff delay, and the start limit (systemd-like)."""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass


class Restart(str, enum.Enum):
    """systemd's Restart= values that gpud supports (`[supervisor] restart`)."""

    ON_FAILURE = "on-failure"
    ALWAYS = "always"
    NO = "no"


@dataclass(frozen=True)
class RestartPolicy:
    """The values come from SupervisorSettings, where their defaults live."""

    restart: Restart
    restart_sec: float
    restart_max_delay_sec: float

    def should_restart(self, *, clean_exit: bool) -> bool:
        """clean_exit: the process ended with code 0 on its own (not a crash, signal or failed health)."""
        if self.restart is Restart.ALWAYS:
            return True
        if self.restart is Restart.ON_FAILURE:
            return not clean_exit
        return False

    def delay(self, consecutive_failures: int) -> float:
        """restart_sec doubled per consecutive failure (1 → restart_sec), capped at restart_max_delay_sec."""
        if consecutive_failures <= 1:
            return min(self.restart_sec, self.restart_max_delay_sec)
        # Cap the exponent: 2**1000 overflows float math long after the cap has been reached.
        exponent = min(consecutive_failures - 1, 64)
        return min(self.restart_sec * float(2**exponent), self.restart_max_delay_sec)


class StartLimit:
    """More than `burst` failed starts within `interval` seconds means: give up (systemd's StartLimitBurst)."""

    def __init__(self, burst: int, interval: float) -> None:
        self.burst = burst
        self.interval = interval
        self._failures: deque[float] = deque()

    def record_failure(self, now: float) -> bool:
        """Record a failed start at `now` (monotonic seconds); True when the limit is exceeded."""
        self._failures.append(now)
        while self._failures and self._failures[0] <= now - self.interval:
            self._failures.popleft()
        return len(self._failures) > self.burst
