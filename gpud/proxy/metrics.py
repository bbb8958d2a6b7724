"""Prometheus metrics for `GET /metrics` on the proxy (SPEC §9, §14: the sum over every worker).

Two kinds of series:

* Events a worker observes (requests, errors, latency, time to first byte of streams): prometheus-client
  counters and histograms, recorded through a small per-(model, replica) `Series` the proxy fetches once per
  request. With several workers, prometheus-client's multiprocess mode keeps each worker's values in a file
  of a directory the daemon made (PROMETHEUS_MULTIPROC_DIR, set in the worker's environment before the
  library is imported); whichever worker answers a scrape sums them all, so the figures never depend on which
  worker a scrape lands on, and a restarted worker's earlier counts are kept.
* State (requests in flight, replica readiness, restarts, the GPU ledger) is read at scrape time from the
  route table the daemon pushed and from the shared counters: nothing has to be kept in sync.

Series of models that no longer exist leave the exposition (they are filtered at scrape time; in multiprocess
mode a dead worker's file cannot be edited). Every registry here is private, never the process-global one.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from gpud.proxy.counters import Counters
from gpud.proxy.table import RouteTable

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
# LLM requests last from milliseconds (a cached short completion) to minutes (long generations).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
TTFB_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_LEDGER_FIELDS = ("total_bytes", "used_by_others_bytes", "reserved_bytes", "available_bytes")


class Series:
    """The metric children of one (model, replica) pair, cached; replica "" = not routed to a replica."""

    __slots__ = ("_metrics", "_labels", "_requests", "_errors", "duration", "ttfb")

    def __init__(self, metrics: RequestMetrics, model: str, replica: str) -> None:
        self._metrics = metrics
        self._labels = (model, replica)
        self._requests: dict[int, Any] = {}
        self._errors: dict[str, Any] = {}
        self.duration = metrics.duration.labels(model, replica)
        self.ttfb = metrics.ttfb.labels(model, replica)

    def request(self, status: int, seconds: float | None = None) -> None:
        """One finished request: its HTTP status, and `seconds` from arrival to last byte if known."""
        child = self._requests.get(status)
        if child is None:
            child = self._requests[status] = self._metrics.requests.labels(*self._labels, str(status))
        child.inc()
        if seconds is not None:
            self.duration.observe(seconds)

    def error(self, kind: str) -> None:
        child = self._errors.get(kind)
        if child is None:
            child = self._errors[kind] = self._metrics.errors.labels(*self._labels, kind)
        child.inc()


class RequestMetrics:
    """A worker's request counters; `render` gives the whole exposition (every worker's, plus state)."""

    def __init__(self, multiproc_dir: str | None = None) -> None:
        """multiproc_dir: the directory of prometheus-client's multiprocess mode (it must also be in the
        environment as PROMETHEUS_MULTIPROC_DIR when prometheus_client is first imported), else None."""
        if multiproc_dir is not None and os.environ.get(MULTIPROC_ENV) != multiproc_dir:
            raise ValueError(f"{MULTIPROC_ENV} must be {multiproc_dir} before prometheus_client is imported")
        self._dir = multiproc_dir
        own = None if multiproc_dir else CollectorRegistry(auto_describe=True)
        labels = ("model", "replica")
        self.requests = Counter(
            "gpud_proxy_requests", "Requests answered by the proxy, by model, replica and HTTP status.",
            (*labels, "code"), registry=own)
        self.errors = Counter(
            "gpud_proxy_errors",
            "Proxy errors by kind: bad_request, too_large, unauthorized, model_not_found, no_ready_replica, "
            "connect (one per failed upstream attempt), upstream (broken after the response started), "
            "timeout, client_disconnect, client_timeout, too_many_connections, wake (an idle model could not be woken).",
            (*labels, "kind"), registry=own)
        self.duration = Histogram(
            "gpud_proxy_request_duration_seconds", "Time from request arrival to the last response byte.",
            labels, buckets=LATENCY_BUCKETS, registry=own)
        self.ttfb = Histogram(
            "gpud_proxy_ttfb_seconds", "Streaming responses: time from request arrival to the first body chunk.",
            labels, buckets=TTFB_BUCKETS, registry=own)
        self.routes = Counter(
            "gpud_route", "Routing decisions of the session and prefix policies (SPEC §13): hit (where the key or "
            "prefix pointed), miss (nothing known: least connections), overflow (that replica was overloaded or "
            "not ready: least connections).", ("model", "policy", "outcome"), registry=own)
        self._own = own
        self._series: dict[tuple[str, str], Series] = {}
        self._route_children: dict[tuple[str, str, str], Any] = {}

    def series(self, model: str, replica: int | str = "") -> Series:
        """The cached metric children for a model and a replica index ("" when no replica was chosen)."""
        key = (model, replica if isinstance(replica, str) else str(replica))
        found = self._series.get(key)
        if found is None:
            found = self._series[key] = Series(self, *key)
        return found

    def route(self, model: str, policy: str, outcome: str) -> None:
        key = (model, policy, outcome)
        child = self._route_children.get(key)
        if child is None:
            child = self._route_children[key] = self.routes.labels(*key)
        child.inc()

    def forget(self, live: Iterable[str]) -> None:
        """Drop the cached children of models that are gone (the labels stay bounded in a worker's life)."""
        keep = set(live) | {""}
        for key in [k for k in self._series if k[0] not in keep]:
            del self._series[key]
        for route in [k for k in self._route_children if k[0] not in keep]:
            del self._route_children[route]

    def render(self, table: RouteTable, counters: Counters) -> tuple[bytes, str]:
        """The Prometheus text exposition and its content type."""
        exposition = CollectorRegistry(auto_describe=False)
        live = set(table.models) | {""}
        if self._dir is not None:
            from prometheus_client import multiprocess

            events: Collector = multiprocess.MultiProcessCollector(None, self._dir)  # type: ignore[no-untyped-call]
        else:
            assert self._own is not None
            events = self._own
        exposition.register(_LiveOnly(events, live))
        exposition.register(_StateCollector(table, counters))
        return generate_latest(exposition), CONTENT_TYPE_LATEST


class _LiveOnly(Collector):
    """Another collector's families, without the samples of models that no longer exist."""

    def __init__(self, inner: Collector | CollectorRegistry, live: set[str]) -> None:
        self._inner = inner
        self._live = live

    def collect(self) -> Iterator[Metric]:
        for family in self._inner.collect():
            family.samples = [s for s in family.samples if s.labels.get("model", "") in self._live]
            yield family


class _StateCollector(Collector):
    """Reads the route table and the shared counters at scrape time."""

    def __init__(self, table: RouteTable, counters: Counters) -> None:
        self._table = table
        self._counters = counters

    def collect(self) -> Iterator[Metric]:
        labels = ["model", "replica"]
        inflight = GaugeMetricFamily("gpud_proxy_inflight_requests", "Requests in flight to each replica.",
                                     labels=labels)
        ready = GaugeMetricFamily("gpud_replica_ready", "1 when the replica is ready (in the balancer), else 0.",
                                  labels=labels)
        restarts = CounterMetricFamily("gpud_replica_restarts", "Restarts of each replica since its model started.",
                                       labels=labels)
        for model in self._table.models.values():
            for replica in model.replicas:
                values = [model.name, str(replica.index)]
                inflight.add_metric(values, self._counters.inflight(replica.slot))
                ready.add_metric(values, 1 if replica.ready else 0)
                restarts.add_metric(values, replica.restarts)
        yield inflight
        yield ready
        yield restarts
        families = {
            name: GaugeMetricFamily(f"gpud_gpu_{name}", f"GPU memory: {name.removesuffix('_bytes')} (bytes), "
                                    "from the ledger.", labels=["gpu"])
            for name in _LEDGER_FIELDS
        }
        for gpu in self._table.gpus:
            for name, family in families.items():
                value = gpu.get(name)
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    family.add_metric([str(gpu.get("index"))], value)
        yield from families.values()
