"""What every benchmark writes into docs/benchmarks.md: the machine it ran on, and its section replaced."""

from __future__ import annotations

import contextlib
import datetime
import os
import platform
import re
from pathlib import Path


def machine() -> str:
    """'2 cores (AMD EPYC …), Linux 6.1.0, Python 3.11.7': what the figures were measured on."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        found = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
        cpu = found.group(1) if found else cpu
    return (f"{os.cpu_count()} cores ({cpu}), {platform.system()} {platform.release()}, "
            f"Python {platform.python_version()}")


def measured() -> str:
    """The sentence a section starts with: today's date and the machine."""
    return f"Measured {datetime.date.today().isoformat()} on {machine()}."


def write_section(path: Path, title: str, lines: list[str]) -> None:
    """Replace the `## {title}` section of the Markdown file at `path` (up to the next `## `) with `lines`, or
    append it when the file has none."""
    section = "\n".join([f"## {title}", "", *lines, ""])
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    pattern = re.compile(rf"^## {re.escape(title)}\n.*?(?=^## |\Z)", re.M | re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _: section + "\n", text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text)
    print(f"\nWrote the {title} section of {path}.")
