"""Prometheus metrics of one app: requests by route and status, latency, jobs by state (read at scrape)."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily

from ..jobstore import JobStore


class Metrics:
    """Prometheus metrics of one app: requests by route and status, latency, jobs by state (read at scrape)."""

    def __init__(self, store: JobStore) -> None:
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

            def describe(self) -> list[Any]:
                return []

        self.registry.register(Jobs())  # type: ignore[arg-type]
