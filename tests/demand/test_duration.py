"""Durations as users type them: the one parser of SPEC §12 (`90s`, `10m`, `1.5h`, plain seconds)."""

from __future__ import annotations

import pytest

from gpud.demand.duration import MAX_DURATION_SEC, format_duration, parse_duration
from gpud.errors import InvalidInput


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90s", 90), ("10m", 600), ("1.5h", 5400), ("300", 300), ("0", 0), (" 2M ", 120), ("0.5s", 0.5),
     (".5m", 30), (15, 15), (2.5, 2.5), (0, 0), ("1H", 3600)],
)
def test_valid(text: object, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    ("text", "words"),
    [("-1", "negative"), (-1, "negative"), ("5x", "unknown unit 'x'"), ("", "such as 90s"), ("m", "such as 90s"),
     ("1.5.h", "such as 90s"), ("1e3", "such as 90s"), (True, "such as 90s"), (None, "such as 90s"),
     (float("nan"), "such as 90s"), (float("inf"), "such as 90s"), ("10d", "unknown unit 'd'"),
     ("9999999h", "at most"), (MAX_DURATION_SEC + 1, "at most"), ([1], "such as 90s")],
)
def test_invalid(text: object, words: str) -> None:
    with pytest.raises(InvalidInput, match=words) as caught:
        parse_duration(text, what="--idle-timeout")
    assert caught.value.message.startswith("Invalid --idle-timeout") and caught.value.message.endswith(".")


@pytest.mark.parametrize("seconds", [0, 1, 90, 600, 5400, 3600, 0.5, 86400, 7.25])
def test_format_reads_back(seconds: float) -> None:
    assert parse_duration(format_duration(seconds)) == seconds
