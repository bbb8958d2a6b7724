"""Persisted desired state: which models should run, written atomically, read back at boot.

One JSON file, STATE_DIR/state.json: `models` (name → request) and `demand` (name → whether the model is
idle and when it last had a request, SPEC §12: a restart keeps idle models idle, and the eviction order).
Writes go to a temp file that is fsynced and renamed over the old one (then the directory is fsynced), so a
crash or a full disk leaves the previous state intact. A file that cannot be read is kept aside
(state.json.corrupt-TIMESTAMP) and named in the log; the daemon starts anyway.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any, NamedTuple

from gpud.errors import GpudError
from gpud.spec import ModelSpec

log = logging.getLogger(__name__)
VERSION = 1


class DemandRecord(NamedTuple):
    """What a restart keeps of a model's demand: idle or loaded, and its last request (epoch seconds)."""

    idle: bool
    last_request_at: float | None


class StateStore:
    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / "state.json"

    def load(self) -> tuple[list[ModelSpec], list[str]]:
        """The persisted models, and one sentence per problem found (file kept aside, record skipped)."""
        problems: list[str] = []
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return [], problems
        try:
            data = json.loads(raw)
            if not isinstance(data, dict) or not isinstance(data.get("models"), dict):
                raise ValueError("not a gpud state object")
        except ValueError as exc:
            aside = self.path.with_name(f"{self.path.name}.corrupt-{int(time.time())}")
            os.replace(self.path, aside)
            problems.append(f"State file {self.path} is damaged ({exc}); kept it aside as {aside} and started empty.")
            return [], problems
        specs: list[ModelSpec] = []
        for name, record in data["models"].items():
            try:
                specs.append(ModelSpec.from_json(record, check_files=False))
            except GpudError as exc:
                problems.append(f"Skipped model {name!r} from {self.path}: {exc.message}")
        return specs, problems

    def load_demand(self) -> dict[str, DemandRecord]:
        """The `demand` section; what cannot be read is left out (a model is then loaded as its spec says)."""
        try:
            data = json.loads(self.path.read_bytes())
        except (OSError, ValueError):
            return {}
        section = data.get("demand") if isinstance(data, dict) else None
        records: dict[str, DemandRecord] = {}
        for name, entry in (section.items() if isinstance(section, dict) else ()):
            if not isinstance(entry, dict) or not isinstance(entry.get("idle"), bool):
                continue
            last = entry.get("last_request_at")
            when = float(last) if isinstance(last, (int, float)) and not isinstance(last, bool) else None
            records[name] = DemandRecord(entry["idle"], when)
        return records

    def save(self, specs: list[ModelSpec], demand: dict[str, DemandRecord] | None = None) -> None:
        payload: dict[str, Any] = {"version": VERSION, "models": {s.name: s.to_json() for s in specs}}
        if demand:
            payload["demand"] = {name: record._asdict() for name, record in sorted(demand.items())}
        data = json.dumps(payload, indent=2).encode()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".state.", suffix=".tmp", dir=self.path.parent)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise
        dir_fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
