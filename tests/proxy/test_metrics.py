"""gpud.proxy.metrics: request series, state read from the route table and the shared counters at scrape time,
series of removed models left out, a private registry."""

from __future__ import annotations

from typing import Any

import pytest
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from gpud.proxy.counters import Counters
from gpud.proxy.metrics import RequestMetrics
from gpud.proxy.table import Feed, RouteTable
from gpud.registry import Model, Registry, Replica, ReplicaState
from gpud.spec import ModelSpec

GiB = 2**30
LEDGER = [
    {"index": 0, "total_bytes": 80 * GiB, "used_by_others_bytes": GiB, "reserved_bytes": 20 * GiB,
     "available_bytes": 58 * GiB},
    {"index": 1, "total_bytes": 40 * GiB, "used_by_others_bytes": 0, "reserved_bytes": 0,
     "available_bytes": 39 * GiB},
]


def make_registry() -> Registry:
    registry = Registry()
    model = Model(spec=ModelSpec(name="org/m", model="org/m", engine="sim", replicas=2))
    model.replicas[0] = Replica(model="org/m", index=0, gpus=(0,), vram_by_gpu=(GiB,), port=1000,
                                state=ReplicaState.READY, restarts=3)
    model.replicas[1] = Replica(model="org/m", index=1, gpus=(1,), vram_by_gpu=(GiB,), port=1001,
                                state=ReplicaState.STARTING)
    registry.models[model.name] = model
    return registry


def samples(metrics: RequestMetrics, table: RouteTable, counters: Counters) -> dict[tuple[str, Any], float]:
    body, content_type = metrics.render(table, counters)
    assert content_type.startswith("text/plain")
    out = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def key(name: str, **labels: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    return name, tuple(sorted(labels.items()))


def test_state_is_read_from_the_table_and_the_counters_at_scrape_time() -> None:
    registry = make_registry()
    counters = Counters.local()
    feed = Feed(registry, counters, lambda: LEDGER)
    table = feed.table()
    slot = table.models["org/m"].replicas[0].slot
    counters.started(slot)
    counters.started(slot)
    metrics = RequestMetrics()
    s = samples(metrics, table, counters)
    assert s[key("gpud_replica_restarts_total", model="org/m", replica="0")] == 3
    assert s[key("gpud_replica_restarts_total", model="org/m", replica="1")] == 0
    assert s[key("gpud_proxy_inflight_requests", model="org/m", replica="0")] == 2
    assert s[key("gpud_replica_ready", model="org/m", replica="0")] == 1
    assert s[key("gpud_replica_ready", model="org/m", replica="1")] == 0
    assert s[key("gpud_gpu_total_bytes", gpu="0")] == 80 * GiB
    assert s[key("gpud_gpu_used_by_others_bytes", gpu="0")] == GiB
    assert s[key("gpud_gpu_reserved_bytes", gpu="0")] == 20 * GiB
    assert s[key("gpud_gpu_available_bytes", gpu="1")] == 39 * GiB
    # The counts are live: a request that ends shows in the next scrape, without a new table.
    counters.finished(slot)
    assert samples(metrics, table, counters)[key("gpud_proxy_inflight_requests", model="org/m", replica="0")] == 1
    # And the daemon's side reads the same counts back into the registry.
    feed.copy_counts()
    assert registry.models["org/m"].replicas[0].inflight == 1


def test_request_series_count_status_errors_latency_and_ttfb() -> None:
    metrics = RequestMetrics()
    series = metrics.series("org/m", 0)
    assert metrics.series("org/m", "0") is series  # cached: one lookup on the hot path
    series.request(200, 0.02)
    series.request(200, 0.03)
    series.request(502)
    series.error("connect")
    series.ttfb.observe(0.004)
    metrics.series("").error("model_not_found")
    s = samples(metrics, Feed(make_registry(), Counters.local()).table(), Counters.local())
    assert s[key("gpud_proxy_requests_total", model="org/m", replica="0", code="200")] == 2
    assert s[key("gpud_proxy_requests_total", model="org/m", replica="0", code="502")] == 1
    assert s[key("gpud_proxy_errors_total", model="org/m", replica="0", kind="connect")] == 1
    assert s[key("gpud_proxy_errors_total", model="", replica="", kind="model_not_found")] == 1
    assert s[key("gpud_proxy_request_duration_seconds_count", model="org/m", replica="0")] == 2
    assert s[key("gpud_proxy_request_duration_seconds_sum", model="org/m", replica="0")] == pytest.approx(0.05)
    assert s[key("gpud_proxy_request_duration_seconds_bucket", model="org/m", replica="0", le="0.025")] == 1
    assert s[key("gpud_proxy_ttfb_seconds_count", model="org/m", replica="0")] == 1
    assert s[key("gpud_proxy_ttfb_seconds_bucket", model="org/m", replica="0", le="0.005")] == 1


def test_series_of_a_removed_model_leave_the_exposition() -> None:
    registry = make_registry()
    counters = Counters.local()
    feed = Feed(registry, counters)
    metrics = RequestMetrics()
    metrics.series("org/m", 0).request(200, 0.01)
    metrics.series("").error("bad_request")
    del registry.models["org/m"]
    s = samples(metrics, feed.table(), counters)
    assert not any(labels and ("model", "org/m") in labels for _, labels in s)
    assert s[key("gpud_proxy_errors_total", model="", replica="", kind="bad_request")] == 1


def test_a_broken_ledger_read_does_not_break_the_table(caplog: pytest.LogCaptureFixture) -> None:
    def broken() -> list[dict[str, Any]]:
        raise RuntimeError("driver went away")

    counters = Counters.local()
    table = Feed(make_registry(), counters, broken).table()
    s = samples(RequestMetrics(), table, counters)
    assert key("gpud_replica_restarts_total", model="org/m", replica="0") in s
    assert not any(name.startswith("gpud_gpu_") for name, _ in s)
    assert "GPU ledger" in caplog.text


def test_each_metrics_object_has_its_own_registry() -> None:
    a, b = RequestMetrics(), RequestMetrics()  # would raise "Duplicated timeseries" if shared
    a.series("x", 0).request(200, 0.1)
    registry = Registry()
    registry.models["x"] = Model(ModelSpec(name="x", model="x", engine="sim"))
    table = Feed(registry, Counters.local()).table()
    assert b"gpud_proxy_requests_total{" not in b.render(table, Counters.local())[0]
    assert REGISTRY.get_sample_value("gpud_proxy_requests_total", {"model": "x", "replica": "0", "code": "200"}) is None
