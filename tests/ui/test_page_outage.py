"""The page while the daemon goes away (kill -9) and comes back: it says so at once, a change asked for
meanwhile is refused with a sentence, and it is live again, without a reload, once the daemon answers."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import Daemon, wait_until
from uihelpers import UiProcess

pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install -e .[test])")
from playwright.sync_api import expect  # noqa: E402

LIVE_MS = 8000  # see tests/ui/test_page.py


@pytest.fixture
def restartable(ui_root: Path) -> Iterator[Daemon]:
    (ui_root / "r").mkdir()
    daemon = Daemon(ui_root / "r").start()
    yield daemon
    daemon.stop()
    wait_until(lambda: not daemon.replica_pids(), 10, "replica processes to go")


def test_the_daemon_going_away_and_coming_back(browser: Any, restartable: Daemon, ui_root: Path,
                                               shots: Path) -> None:
    daemon = restartable
    daemon.start_model({"name": "keep", "model": "keep", "engine": "sim", "vram": "4GiB",
                        "args": ["--startup-s", "0.1"]})
    ui = UiProcess(daemon.socket, ui_root).start()
    context = browser.new_context(viewport={"width": 1440, "height": 900})
    try:
        page = context.new_page()
        page.goto(ui.url)
        keep = page.locator('article.model[data-model="keep"]')
        expect(keep.locator(".ready")).to_have_text("1/1 ready", timeout=5000)

        daemon.stop(signal.SIGKILL)
        expect(page.locator("#conn")).to_have_text("Daemon unreachable — reconnecting…", timeout=LIVE_MS)
        expect(page.locator("#banner")).to_contain_text("gpud daemon")
        keep.get_by_role("button", name="Scale").click()
        expect(keep.get_by_role("alert")).to_contain_text(f"Cannot reach the gpud daemon at {daemon.socket}",
                                                          timeout=LIVE_MS)
        page.screenshot(path=str(shots / "daemon-down.png"))
        wait_until(lambda: not daemon.replica_pids(), 10, "the old replicas to go")

        daemon.start()  # the same state dir: "keep" is restored
        expect(page.locator("#conn")).to_have_text("Live", timeout=LIVE_MS)
        expect(page.locator("#banner")).to_be_hidden()
        expect(keep.locator(".ready")).to_have_text("1/1 ready", timeout=15000)
        expect(page.locator("#activity")).to_contain_text("Daemon is back")
        assert page.evaluate("performance.getEntriesByType('navigation').length") == 1
    finally:
        context.close()
        assert ui.stop() == 0
