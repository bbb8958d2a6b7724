"""Sizes: parse what users type (`20GiB`, `1.5G`, `500MB`, `1073741824`) and format bytes for people."""

from __future__ import annotations

import re

from gpud.errors import InvalidInput

_DECIMAL = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
_BINARY = {
    "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40,
    "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40,
    "B": 1, "": 1,
}
_SIZE_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([A-Za-z]*)\s*$")


def parse_size(value: str | int, *, what: str = "size") -> int:
    """Bytes from a size string or integer. Raises InvalidInput with one sentence on bad input."""
    if isinstance(value, bool):
        raise InvalidInput(f"Invalid {what} {value!r}: expected a size such as 20GiB or a number of bytes.")
    if isinstance(value, int):
        if value < 0:
            raise InvalidInput(f"Invalid {what} {value}: a size cannot be negative.")
        return value
    if not isinstance(value, str):
        raise InvalidInput(f"Invalid {what} {value!r}: expected a size such as 20GiB or a number of bytes.")
    m = _SIZE_RE.match(value)
    if not m:
        raise InvalidInput(f"Invalid {what} {value!r}: expected a size such as 20GiB, 500MB or 1073741824.")
    number, unit = m.group(1), m.group(2).upper()
    factor = _DECIMAL.get(unit) or _BINARY.get(unit)
    if factor is None:
        raise InvalidInput(
            f"Invalid {what} {value!r}: unknown unit {m.group(2)!r} (use KB MB GB TB, KiB MiB GiB TiB, or K M G T)."
        )
    if "." in number:
        whole, _, frac = number.partition(".")
        # Exact decimal arithmetic: 1.5GiB is exactly 1610612736 bytes, no float rounding.
        scale = 10 ** len(frac)
        return int((int(whole or "0") * scale + int(frac or "0")) * factor // scale)
    return int(number) * factor


def format_size(n: int) -> str:
    """Human form in binary units, as nvidia-smi and Docker show it: 20 GiB, 1.5 GiB, 512 MiB."""
    if n < 0:
        return "-" + format_size(-n)
    for unit, factor in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= factor:
            value = n / factor
            text = f"{value:.1f}".rstrip("0").rstrip(".")
            return f"{text} {unit}"
    return f"{n} B"
