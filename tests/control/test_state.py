"""Persisted desired state: atomic writes, damaged files kept aside, bad records skipped."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from gpud.control.state import StateStore
from gpud.spec import ModelSpec


def test_round_trip(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    specs = [ModelSpec.from_json({"model": "a", "engine": "sim", "replicas": 2, "vram": "1GiB", "env": {"K": "v"}}),
             ModelSpec.from_json({"model": "Org/b", "engine": "sim"})]
    store.save(specs)
    loaded, problems = store.load()
    assert loaded == specs and problems == []
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]  # no temp file left


def test_missing_file_is_empty(tmp_path: Path) -> None:
    assert StateStore(tmp_path / "nope").load() == ([], [])


@pytest.mark.parametrize("content", [b"", b"{trunc", b"\x00\xff", b"[]", b'{"models": 3}'])
def test_damaged_file_is_kept_aside(tmp_path: Path, content: bytes) -> None:
    (tmp_path / "state.json").write_bytes(content)
    specs, problems = StateStore(tmp_path).load()
    assert specs == [] and len(problems) == 1 and "kept it aside" in problems[0]
    aside = list(tmp_path.glob("state.json.corrupt-*"))
    assert len(aside) == 1 and aside[0].read_bytes() == content


def test_invalid_record_is_skipped_and_others_kept(tmp_path: Path) -> None:
    good = ModelSpec.from_json({"model": "good", "engine": "sim"})
    data = {"version": 1, "models": {"good": good.to_json(), "bad": {"model": "../x"}}}
    (tmp_path / "state.json").write_text(json.dumps(data))
    specs, problems = StateStore(tmp_path).load()
    assert specs == [good]
    assert len(problems) == 1 and "'bad'" in problems[0]


def test_failed_write_keeps_previous_state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = StateStore(tmp_path)
    first = [ModelSpec.from_json({"model": "a", "engine": "sim"})]
    store.save(first)

    def disk_full(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError):
        store.save([ModelSpec.from_json({"model": "b", "engine": "sim"})])
    monkeypatch.undo()
    assert store.load()[0] == first
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]
