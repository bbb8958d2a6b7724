"""Durations as users type them (`90s`, `10m`, `1.5h`, `300`): the one parser, used by the CLI and the daemon.

A duration is a number of seconds, or a number followed by `s`, `m` or `h` (case-insensitive). `0` means
"never" where the caller says so (an idle timeout of 0 never unloads). Negative numbers, NaN, infinities,
unknown units and absurd values (over MAX_DURATION_SEC) are refused with one sentence.
"""

from __future__ import annotations

import math
import re

from gpud.errors import InvalidInput

# A year: longer than any sensible idle timeout, short enough that the deadline arithmetic stays exact.
MAX_DURATION_SEC = 366 * 24 * 3600.0

_UNITS = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0}
_DURATION_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([A-Za-z]*)\s*$")


def parse_duration(value: object, *, what: str = "duration") -> float:
    """Seconds from `90s`, `10m`, `1.5h`, `300` or a JSON number; InvalidInput for anything else."""
    hint = "use a number of seconds or a number with s, m or h, such as 90s, 10m or 1.5h"
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise InvalidInput(f"Invalid {what} {value!r}: {hint}.")
    if isinstance(value, str):
        if value.strip().startswith("-"):
            raise InvalidInput(f"Invalid {what} {value!r}: a duration cannot be negative.")
        match = _DURATION_RE.match(value)
        if not match:
            raise InvalidInput(f"Invalid {what} {value!r}: {hint}.")
        unit = match.group(2).lower()
        if unit not in _UNITS:
            raise InvalidInput(f"Invalid {what} {value!r}: unknown unit {match.group(2)!r} ({hint}).")
        seconds = float(match.group(1)) * _UNITS[unit]
    else:
        seconds = float(value)
        if not math.isfinite(seconds):
            raise InvalidInput(f"Invalid {what} {value!r}: {hint}.")
        if seconds < 0:
            raise InvalidInput(f"Invalid {what} {value!r}: a duration cannot be negative.")
    if seconds > MAX_DURATION_SEC:
        raise InvalidInput(f"Invalid {what} {value!r}: at most {format_duration(MAX_DURATION_SEC)} (a year) is allowed.")
    return seconds


def format_duration(seconds: float) -> str:
    """A short exact form a user could type back: 90 → `1.5m`, 45 → `45s`, 600 → `10m`, 5400 → `1.5h`, 0 → `0`."""
    if seconds == 0:
        return "0"
    for unit, size in (("h", 3600.0), ("m", 60.0)):
        count = seconds / size
        if count >= 1 and (count * 10) == int(count * 10):
            return f"{count:g}{unit}"
    return f"{seconds:g}s"
