"""Fixtures: a real gpud daemon on simulated GPUs, and a guard that no replica process outlives a test.
The helpers they use live in tests/helpers.py (importable as `helpers`: tests/ is on the path)."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import Daemon, kill_leftovers, wait_until


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A short directory: Unix socket paths must stay under 108 bytes."""
    path = Path(tempfile.mkdtemp(prefix="gpud-t-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def make_daemon(short_tmp: Path) -> Iterator[Callable[..., Daemon]]:
    made: list[Daemon] = []

    def factory(**kwargs: Any) -> Daemon:
        root = short_tmp / f"d{len(made)}"
        root.mkdir()
        daemon = Daemon(root, **kwargs)
        made.append(daemon)
        return daemon

    yield factory
    leftovers: list[int] = []
    for daemon in made:
        daemon.stop()
        # SPEC §7: no process of a replica outlives the daemon. Give the shims their stop time, then check.
        try:
            wait_until(lambda d=daemon: not d.replica_pids(), 10, "replica processes to go")
        except AssertionError:
            leftovers += kill_leftovers(daemon.instance)
    assert not leftovers, f"replica processes outlived the daemon: {leftovers}"


@pytest.fixture
def daemon(make_daemon: Callable[..., Daemon]) -> Daemon:
    return make_daemon().start()


@pytest.fixture(scope="module")
def fuzz_daemon() -> Iterator[Daemon]:
    """One daemon shared by a module's property-test examples (starting one per example would be slow)."""
    root = Path(tempfile.mkdtemp(prefix="gpud-f-", dir="/tmp"))
    daemon = Daemon(root).start()
    yield daemon
    daemon.stop()
    wait_until(lambda: not daemon.replica_pids(), 10, "replica processes to go")
    shutil.rmtree(root, ignore_errors=True)
