"""Prometheus metrics of the gateway, served at ``/metrics`` (permission ``metrics:read``)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4 as CONTENT_TYPE
from prometheus_client.registry import Collector


class _WorkerCounts(Collector):
    """Counts the workers keep in Redis (shared by every gateway), as read at scrape time."""

    def __init__(self) -> None:
        self.dead_letters: Mapping[bytes | str, bytes | str] = {}

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(
            "bastion_worker_dead_lettered_requests",
            "Requests answered with an error after too many deliveries, by model.",
            labels=["model"],
        )
        for model, count in sorted(self.dead_letters.items()):
            family.add_metric([str(model)], float(count))
        yield family


class GatewayMetrics:
    """One registry per app, so several gateways in one process never share counters."""

    content_type = CONTENT_TYPE

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "bastion_gateway_requests",
            "Inference requests by endpoint and outcome.",
            ["endpoint", "status"],
            registry=self.registry,
        )
        self.seconds = Histogram(
            "bastion_gateway_request_seconds",
            "Wall time of inference requests, queueing included.",
            ["endpoint"],
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
            registry=self.registry,
        )
        self.completion_tokens = Counter(
            "bastion_gateway_completion_tokens",
            "Tokens generated for clients.",
            ["model"],
            registry=self.registry,
        )

        self.workers = _WorkerCounts()
        self.registry.register(self.workers)

    def observe(self, endpoint: str, status: str, seconds: float, model: str, tokens: int) -> None:
        self.requests.labels(endpoint, status).inc()
        self.seconds.labels(endpoint).observe(seconds)
        if tokens:
            self.completion_tokens.labels(model).inc(tokens)

    def render(self) -> bytes:
        return generate_latest(self.registry)
