"""What the page draws from fields other issues add to the API: routing (13), the `--vram auto` estimate and
measured memory (11), the idle state with unload/load (12). The pure drawing functions are checked here on
objects of the SPEC's shapes; the end-to-end tests run them through a real daemon."""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import Daemon
from uihelpers import UiProcess

from gpud.cli.client import model_path
from gpud.units import format_size

pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install -e .[test])")
from playwright.sync_api import Page, expect  # noqa: E402

LIVE_MS = 8000  # see tests/ui/test_page.py
GiB = 2**30


@pytest.fixture(scope="module")
def page(browser: Any, ui: UiProcess) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1440, "height": 1000})
    page = context.new_page()
    page.goto(ui.url)
    expect(page.locator("#conn")).to_have_text("Live", timeout=5000)
    yield page
    context.close()


def call(page: Page, module: str, function: str, *args: Any) -> Any:
    """Call an exported function of one of the page's modules, in the page."""
    return page.evaluate(
        "async ([module, fn, args]) => { const m = await import(`/static/${module}`); return m[fn](...args); }",
        [module, function, list(args)],
    )


def layout(page: Page, gpu: dict[str, Any], models: list[dict[str, Any]]) -> Any:
    return page.evaluate(
        "async ([gpu, models]) => (await import('/static/ledger.js')).gpuLayout(gpu, new Map(models.map((m) => [m.name, m])))",
        [gpu, models],
    )


def test_a_bar_adds_up_to_the_gpu_and_splits_shared_gpus_by_reservation(page: Page) -> None:
    gpu = {"index": 0, "total_bytes": 80 * GiB, "used_by_others_bytes": 6 * GiB, "reserved_bytes": 30 * GiB,
           "available_bytes": int(43.5 * GiB), "replicas": [{"model": "a", "index": 0}, {"model": "b", "index": 1}]}
    models = [{"name": "a", "replicas": [{"index": 0, "vram_bytes": 20 * GiB, "gpus": [0], "state": "ready"}]},
              {"name": "b", "replicas": [{"index": 1, "vram_bytes": 10 * GiB, "gpus": [0], "state": "starting"}]}]
    out = layout(page, gpu, models)
    kinds = [(s["kind"], s.get("label"), s["bytes"]) for s in out["segments"]]
    assert kinds == [("reservation", "a#0", 20 * GiB), ("reservation", "b#1", 10 * GiB),
                     ("others", "used by others", 6 * GiB), ("headroom", "headroom", 512 * 2**20),
                     ("available", "available", int(43.5 * GiB))]
    assert abs(sum(s["fraction"] for s in out["segments"]) - 1) < 1e-9 and not out["overcommitted"]
    # A sole (exclusive) holder has everything reserved on the GPU, whatever its vram_bytes says.
    alone = {**gpu, "replicas": [{"model": "a", "index": 0}], "reserved_bytes": 73 * GiB, "available_bytes": 0,
             "used_by_others_bytes": int(6.5 * GiB)}
    assert layout(page, alone, models)["segments"][0]["bytes"] == 73 * GiB


def test_measured_memory_is_shown_against_the_reservation_when_the_api_has_it(page: Page) -> None:
    gpu = {"index": 0, "total_bytes": 80 * GiB, "used_by_others_bytes": 0, "reserved_bytes": 20 * GiB,
           "available_bytes": int(59.5 * GiB), "replicas": [{"model": "a", "index": 0, "used_bytes": 18 * GiB}]}
    models = [{"name": "a", "replicas": [{"index": 0, "vram_bytes": 20 * GiB, "gpus": [0], "measured_bytes": 19 * GiB}]}]
    assert layout(page, gpu, models)["segments"][0]["measured"] == 18 * GiB  # the GPU's own figure first
    del gpu["replicas"][0]["used_bytes"]
    assert layout(page, gpu, models)["segments"][0]["measured"] == 19 * GiB
    del models[0]["replicas"][0]["measured_bytes"]
    assert layout(page, gpu, models)["segments"][0]["measured"] is None  # no NVML: nothing drawn


def test_routing_estimate_and_demand_settings_read_as_one_line(page: Page) -> None:
    show = {"name": "q", "model": "Qwen/Qwen2.5-7B-Instruct", "engine": "vllm", "vram_bytes": 24 * GiB,
            "gpus_per_replica": 1, "placement": "spread", "routing": "session", "idle_timeout_sec": 900,
            "on_demand": False, "max_replicas": 4}
    assert call(page, "describe.js", "modelMeta", show) == (
        "vllm · Qwen/Qwen2.5-7B-Instruct · 24 GiB per GPU · spread · routing session · idle after 15m · "
        "up to 4 replicas")
    older = {"name": "q", "model": "q", "engine": "sim", "vram_bytes": None, "placement": "pack"}
    assert call(page, "describe.js", "modelMeta", older) == "sim · whole GPUs · pack"
    estimate = {"source": "/models/q", "weights_bytes": int(15.2 * GiB), "kv_bytes_per_token": 56 * 1024,
                "context_tokens": 32768, "sequences": 4, "overhead_bytes": 2 * GiB, "per_gpu_bytes": int(24.2 * GiB)}
    text = call(page, "describe.js", "estimateText", estimate, 1)
    kv = format_size(56 * 1024 * 32768 * 4)
    assert text == (f"vram auto: 24.2 GiB per GPU = (weights 15.2 GiB + KV 56 KiB/token × 32768 tokens × "
                    f"4 sequences = {kv}) + overhead 2 GiB")
    assert "÷ 2 GPUs" in call(page, "describe.js", "estimateText", estimate, 2)


# ---- end to end, through a daemon that has these fields------------------------------------------------------


def card(page: Page, name: str) -> Any:
    return page.locator(f'article.model[data-model="{name}"]')


def test_unload_and_load_from_the_page(page: Page, ui_daemon: Daemon) -> None:
    ui_daemon.start_model({"name": "sleepy", "model": "sleepy", "engine": "sim", "vram": "2GiB", "replicas": 2,
                           "args": ["--startup-s", "0.1"]})
    sleepy = card(page, "sleepy")
    sleepy.get_by_role("button", name="Unload").click()
    expect(sleepy.locator(".model-state")).to_have_text("idle", timeout=15000)
    expect(sleepy.locator(".idle-note")).to_contain_text("2 replica(s) start on the next request")
    expect(page.get_by_role("img", name="sleepy#0: 2 GiB reserved")).to_have_count(0, timeout=LIVE_MS)
    assert ui_daemon.show("sleepy")["state"] == "idle"
    sleepy.get_by_role("button", name="Load").click()
    expect(sleepy.locator(".ready")).to_have_text("2/2 ready", timeout=15000)
    expect(sleepy.locator(".model-state")).to_have_text("running")
    ui_daemon.client.request("DELETE", model_path("sleepy"))
    ui_daemon.wait_removed("sleepy")


def test_routing_chosen_in_the_form_is_shown(page: Page, ui_daemon: Daemon) -> None:
    form = page.locator("#start-form")
    form.get_by_label("Model", exact=True).fill("routed")
    form.get_by_label("Engine", exact=True).select_option("sim")
    form.get_by_label("VRAM per GPU").fill("2GiB")
    form.get_by_label("Routing").select_option("session")
    form.get_by_label("Engine arguments").fill("--startup-s 0.1")
    form.get_by_role("button", name="Start").click()
    expect(card(page, "routed").locator(".meta")).to_contain_text("routing session", timeout=15000)
    assert ui_daemon.show("routed")["routing"] == "session"
    ui_daemon.client.request("DELETE", model_path("routed"))
    ui_daemon.wait_removed("routed")


def test_the_forms_more_fields_reach_the_daemon(page: Page, ui_daemon: Daemon) -> None:
    form = page.locator("#start-form")
    form.get_by_label("Model", exact=True).fill("lazy")
    form.get_by_label("Engine", exact=True).select_option("sim")
    form.get_by_label("VRAM per GPU").fill("2GiB")
    form.locator("summary").click()
    form.get_by_label("Idle timeout").fill("15m")
    form.get_by_label("On demand (load on the first request)").check()
    form.get_by_label("Max replicas").fill("3")
    form.get_by_label("Target in flight").fill("4")
    form.get_by_label("Health path").fill("/health")
    form.get_by_label("Start timeout (s)").fill("45")
    form.get_by_label("Unset variables").fill("HTTP_PROXY")
    form.get_by_role("button", name="Start").click()
    expect(card(page, "lazy").locator(".model-state")).to_have_text("idle", timeout=15000)
    shown = ui_daemon.show("lazy")
    assert (shown["idle_timeout_sec"], shown["on_demand"], shown["max_replicas"], shown["target_inflight"]) == \
        (900, True, 3, 4)
    assert shown["unset_env"] == ["HTTP_PROXY"]
    form.get_by_label("Model", exact=True).fill("bad")
    form.get_by_label("Max replicas").fill("0")
    form.get_by_role("button", name="Start").click()
    expect(page.locator("#start-error")).to_contain_text("max", timeout=LIVE_MS)  # the daemon's own sentence
    form.evaluate("form => form.reset()")  # the page is shared: the next test starts from an empty form
    ui_daemon.client.request("DELETE", model_path("lazy"))
    ui_daemon.wait_removed("lazy")


def tiny_checkpoint(root: Path) -> Path:
    """A model directory as §11 reads it: config.json and one safetensors file (sparse: no data written)."""
    model = root / "tiny-model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "hidden_size": 64,
        "max_position_embeddings": 1024, "torch_dtype": "bfloat16"}))
    header = json.dumps({"w": {"dtype": "BF16", "shape": [1024, 1024], "data_offsets": [0, 2 * 2**20]}}).encode()
    with open(model / "model.safetensors", "wb") as out:
        out.write(struct.pack("<Q", len(header)) + header)
        out.truncate(8 + len(header) + 2 * 2**20)
    return model


def test_a_vram_auto_start_shows_its_estimate(page: Page, ui_daemon: Daemon, ui_root: Path) -> None:
    model = tiny_checkpoint(ui_root)
    form = page.locator("#start-form")
    form.get_by_label("Model", exact=True).fill(str(model))
    form.get_by_label("Engine", exact=True).select_option("sim")
    form.get_by_label("VRAM per GPU").fill("auto")
    form.get_by_label("Engine arguments").fill("--startup-s 0.1")
    form.get_by_role("button", name="Start").click()
    estimate = card(page, "tiny-model").locator(".estimate")
    expect(estimate).to_contain_text("vram auto:", timeout=15000)
    expect(estimate).to_contain_text("weights 2 MiB")
    shown = ui_daemon.show("tiny-model")["estimate"]
    expect(estimate).to_contain_text(f"{format_size(shown['per_gpu_bytes'])} per GPU")
    ui_daemon.client.request("DELETE", model_path("tiny-model"))
    ui_daemon.wait_removed("tiny-model")
