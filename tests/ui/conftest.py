"""Fixtures of the `gpud ui` tests: a real daemon on sim GPUs, a real `gpud ui` process in front of it, and
headless Chromium from Debian driven by Playwright (no browser download: `executable_path`).

One daemon, one `gpud ui` and one browser are shared by a module's tests (each starts in a second or two,
and the tests use models of their own), so the browser tests stay fast.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import Daemon, kill_leftovers, wait_until
from uihelpers import CHROMIUM_ARGS, UiProcess, chromium_path


def _stop_daemon(daemon: Daemon) -> None:
    daemon.stop()
    try:
        wait_until(lambda: not daemon.replica_pids(), 10, "replica processes to go")
    except AssertionError:
        left = kill_leftovers(daemon.instance)
        raise AssertionError(f"replica processes outlived the daemon: {left}") from None


@pytest.fixture(scope="module")
def ui_root() -> Iterator[Path]:
    root = Path(tempfile.mkdtemp(prefix="gpud-ui-", dir="/tmp"))
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def ui_daemon(ui_root: Path) -> Iterator[Daemon]:
    """A daemon on two 80 GiB GPUs and one 48 GiB GPU of which 6 GiB are used by other processes."""
    (ui_root / "d").mkdir()
    daemon = Daemon(ui_root / "d", gpus="sim:2x80GiB,48GiB@6GiB").start()
    yield daemon
    _stop_daemon(daemon)


@pytest.fixture(scope="module")
def ui(ui_daemon: Daemon, ui_root: Path) -> Iterator[UiProcess]:
    proc = UiProcess(ui_daemon.socket, ui_root).start()
    yield proc
    assert proc.stop() == 0


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Headless Chromium (Debian's), or a skip that says why there is none."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install -e .[test])")
    path = chromium_path()
    if path is None:
        pytest.skip("Chromium is not installed (apt-get install chromium; .ci/run installs it)")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=path, args=CHROMIUM_ARGS, headless=True)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the screenshots of a module go (artifacts: pytest's temp dir keeps the last runs)."""
    return tmp_path_factory.mktemp("ui-screenshots")
