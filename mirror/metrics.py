"""Every Prometheus metric of the mirror, defined once, on a registry owned by the app."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest


class Metrics:
    """The mirror's metrics; one instance per app, so tests and workers never share state."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "mirror_requests",
            "Client requests answered, by route kind, method, status class and result.",
            ["kind", "method", "status", "result"],
            registry=self.registry,
        )
        self.upstream_requests = Counter(
            "mirror_upstream_requests",
            "Requests sent to an upstream registry, by upstream, method and status.",
            ["upstream", "method", "status"],
            registry=self.registry,
        )
        self.upstream_bytes = Counter(
            "mirror_upstream_fetched_bytes",
            "Blob bytes fetched from each upstream.",
            ["upstream"],
            registry=self.registry,
        )
        self.transfers_in_flight = Gauge(
            "mirror_transfers_in_flight",
            "Blob transfers from upstreams running now.",
            registry=self.registry,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
