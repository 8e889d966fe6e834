"""Prometheus metrics of one app: requests by route and status, latency, jobs by state and per tenant queued and
running (read from the store at scrape), and the dispatcher's job metrics when it runs in this process."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily

from ..jobmetrics import JobMetrics
from ..jobstore import JobStore


class Metrics:
    """The app's registry: its request metrics, the store's gauges (read at scrape) and `jobs` (the dispatcher's)."""

    def __init__(self, store: JobStore, jobs: JobMetrics | None = None) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "pbs2p_http_requests", "HTTP requests", ["method", "route", "status"], registry=self.registry
        )
        self.latency = Histogram(
            "pbs2p_http_request_seconds",
            "HTTP request latency",
            ["route"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=self.registry,
        )
        store_ref = store

        class Jobs:
            def collect(self) -> Any:
                g = GaugeMetricFamily("pbs2p_jobs", "Jobs in the store by state", labels=["state"])
                for state, n in store_ref.counts().items():
                    g.add_metric([state], n)
                yield g
                per_tenant = GaugeMetricFamily(
                    "pbs2p_tenant_jobs", "Queued and active jobs per tenant (queue depth)", labels=["tenant", "state"]
                )
                for (who, state), n in sorted(store_ref.active_by_tenant().items()):
                    per_tenant.add_metric([who, state], n)
                yield per_tenant
                if jobs is not None:
                    yield from jobs.registry.collect()

            def describe(self) -> list[Any]:
                return []

        self.registry.register(Jobs())  # type: ignore[arg-type]
