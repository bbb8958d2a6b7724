"""The one sentence every `--vram auto` refusal is: the path, what is missing there, and the way out."""

from __future__ import annotations

from pathlib import Path

from gpud.errors import InvalidInput

OVERRIDE = "pass --vram SIZE"
# `gpud plan --vram auto` (or a /v1/plan body) without the model to read.
NEEDS_MODEL = "--vram auto needs the model whose files it reads: `gpud plan MODEL --vram auto`."


def cannot_estimate(where: str | Path, what: str) -> InvalidInput:
    """InvalidInput (exit 2 / HTTP 422): `--vram auto` cannot be computed from `where` because of `what`."""
    return InvalidInput(f"Cannot compute --vram auto from {where}: {what}; {OVERRIDE}.")
