"""Prometheus metrics for `GET /metrics` on the proxy (SPEC §9).

Two kinds of series:

* Events the proxy observes (requests, errors, latency, time to first byte of streams) are prometheus-client
  counters and histograms, recorded through a small per-(model, replica) `Series` object that the proxy
  fetches once per request, so the hot path does one dict lookup instead of several `labels()` calls.
* State the daemon already holds (in-flight requests, replica readiness, restarts, the GPU ledger) is read
  from the registry and the ledger when Prometheus scrapes, by a custom collector: the registry stays the
  one source of truth and nothing has to be kept in sync.

Everything lives in a private `CollectorRegistry`, never the process-global one, so several daemons (or
tests) in one process do not collide.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from gpud.registry import Registry, ReplicaState

log = logging.getLogger(__name__)

# LLM requests last from milliseconds (a cached short completion) to minutes (long generations).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
TTFB_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_LEDGER_FIELDS = ("total_bytes", "used_by_others_bytes", "reserved_bytes", "available_bytes")


class Series:
    """The metric children of one (model, replica) pair, cached; replica "" = not routed to a replica."""

    __slots__ = ("_metrics", "_labels", "_requests", "_errors", "duration", "ttfb")

    def __init__(self, metrics: Metrics, model: str, replica: str) -> None:
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

    def remove(self) -> None:
        """Drop this pair's series from the exposition (its model is gone)."""
        m = self._metrics
        for status in self._requests:
            m.requests.remove(*self._labels, str(status))
        for kind in self._errors:
            m.errors.remove(*self._labels, kind)
        m.duration.remove(*self._labels)
        m.ttfb.remove(*self._labels)


class Metrics:
    """Proxy and daemon metrics in their own CollectorRegistry."""

    def __init__(self, registry: Registry, ledger: Any | None = None) -> None:
        self.registry = registry
        self.ledger = ledger
        self.collector_registry = CollectorRegistry(auto_describe=True)
        labels = ("model", "replica")
        self.requests = Counter(
            "gpud_proxy_requests",
            "Requests answered by the proxy, by model, replica and HTTP status.",
            (*labels, "code"),
            registry=self.collector_registry,
        )
        self.errors = Counter(
            "gpud_proxy_errors",
            "Proxy errors by kind: bad_request, too_large, unauthorized, model_not_found, no_ready_replica, "
            "connect (one per failed upstream attempt), upstream (broken after the response started), "
            "timeout, client_disconnect.",
            (*labels, "kind"),
            registry=self.collector_registry,
        )
        self.duration = Histogram(
            "gpud_proxy_request_duration_seconds",
            "Time from request arrival to the last response byte.",
            labels,
            buckets=LATENCY_BUCKETS,
            registry=self.collector_registry,
        )
        self.ttfb = Histogram(
            "gpud_proxy_ttfb_seconds",
            "Streaming responses: time from request arrival to the first body chunk.",
            labels,
            buckets=TTFB_BUCKETS,
            registry=self.collector_registry,
        )
        self._series: dict[tuple[str, str], Series] = {}
        self.collector_registry.register(_StateCollector(self))

    def series(self, model: str, replica: int | str = "") -> Series:
        """The cached metric children for a model and a replica index ("" when no replica was chosen)."""
        key = (model, replica if isinstance(replica, str) else str(replica))
        found = self._series.get(key)
        if found is None:
            found = self._series[key] = Series(self, *key)
        return found

    def render(self) -> tuple[bytes, str]:
        """The Prometheus text exposition and its content type."""
        self._prune()
        return generate_latest(self.collector_registry), CONTENT_TYPE_LATEST

    def _prune(self) -> None:
        # Series of models that no longer exist would otherwise stay forever (one set per model ever run).
        # Model "" (requests that named no known model) is kept: its label set is bounded.
        models = self.registry.models
        for key in [k for k in self._series if k[0] and k[0] not in models]:
            self._series.pop(key).remove()


class _StateCollector(Collector):
    """Reads the registry and the ledger at scrape time."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def describe(self) -> list[Metric]:
        # Empty: the family set depends on what is running; no need to check for name clashes up front.
        return []

    def collect(self) -> Iterator[Metric]:
        labels = ["model", "replica"]
        inflight = GaugeMetricFamily(
            "gpud_proxy_inflight_requests", "Requests in flight to each replica.", labels=labels
        )
        ready = GaugeMetricFamily(
            "gpud_replica_ready", "1 when the replica is ready (in the balancer), else 0.", labels=labels
        )
        restarts = CounterMetricFamily(
            "gpud_replica_restarts", "Restarts of each replica since its model started.", labels=labels
        )
        for model in self._metrics.registry:
            for replica in list(model.replicas.values()):
                values = [model.name, str(replica.index)]
                inflight.add_metric(values, replica.inflight)
                ready.add_metric(values, 1 if replica.state is ReplicaState.READY else 0)
                restarts.add_metric(values, replica.restarts)
        yield inflight
        yield ready
        yield restarts
        yield from self._ledger()

    def _ledger(self) -> Iterator[Metric]:
        ledger = self._metrics.ledger
        if ledger is None:
            return
        try:
            data = ledger.to_json()
        except Exception:  # a scrape must not fail because one reading did; the log says why
            log.exception("Could not read the GPU ledger for /metrics.")
            return
        gpus = data.get("gpus", []) if isinstance(data, dict) else data
        families = {
            name: GaugeMetricFamily(
                f"gpud_gpu_{name}",
                f"GPU memory: {name.removesuffix('_bytes')} (bytes), from the ledger.",
                labels=["gpu"],
            )
            for name in _LEDGER_FIELDS
        }
        for gpu in gpus:
            for name, family in families.items():
                value = gpu.get(name)
                if isinstance(value, (int, float)):
                    family.add_metric([str(gpu.get("index"))], value)
        yield from families.values()
