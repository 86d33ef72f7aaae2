"""Every Prometheus metric of the mirror, defined once, on a registry owned by the app.

Label values stay bounded: route kinds, methods, status classes, results, upstream names.
Never a repository name or a digest. What describes live state (cache size, transfers in
flight) is read when scraped, by `StateCollector`.
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, values
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from .tally import RecentTally
from .version import VERSION

RESULTS = ("hit", "miss", "coalesced", "stale", "negative", "error")


ERRORS_KEPT = 10  # failures remembered per upstream, for the status page


@dataclass
class UpstreamHealth:
    """What the last answers of one upstream said, for /readyz and the status page."""

    reachable: bool | None = None  # None: not asked yet
    last_error: str = ""
    ratelimit_limit: float | None = None
    ratelimit_remaining: float | None = None
    retry_in: Callable[[], float] = lambda: 0.0  # seconds until a down upstream is asked again
    last_answer: float | None = None  # wall-clock time of its last useful answer
    down_since: float | None = None  # wall-clock time it went down (None while up)
    # its latest failures, newest last: (wall-clock time, what happened)
    errors: deque[tuple[float, str]] = field(default_factory=lambda: deque(maxlen=ERRORS_KEPT))


@dataclass
class LiveState:
    """Callbacks that read the app's live state at scrape time."""

    cache_bytes: Callable[[], tuple[int, int]] = lambda: (0, 0)
    cache_bound: int = 0
    evictions: Callable[[], tuple[int, int]] = lambda: (0, 0)  # (entries, bytes)
    disk_full: Callable[[], int] = lambda: 0
    transfers_in_flight: Callable[[], int] = lambda: 0
    waiting_clients: Callable[[], int] = lambda: 0


class StateCollector(Collector):
    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        state = self._metrics.live
        evicted, evicted_bytes = state.evictions()
        yield CounterMetricFamily(
            "mirror_cache_evictions", "Cached entries evicted to stay under the bound.", evicted
        )
        yield CounterMetricFamily(
            "mirror_cache_evicted_bytes", "Bytes evicted to stay under the bound.", evicted_bytes
        )
        yield CounterMetricFamily(
            "mirror_cache_disk_full",
            "Transfers not kept because the disk was full.",
            state.disk_full(),
        )
        used, entries = state.cache_bytes()
        yield GaugeMetricFamily("mirror_cache_size_bytes", "Bytes of cached content.", used)
        yield GaugeMetricFamily("mirror_cache_entries", "Cached blobs and manifests.", entries)
        yield GaugeMetricFamily(
            "mirror_cache_max_size_bytes", "The bound on cached content.", state.cache_bound
        )
        yield GaugeMetricFamily(
            "mirror_transfers_in_flight",
            "Blob transfers from upstreams running now.",
            state.transfers_in_flight(),
        )
        yield GaugeMetricFamily(
            "mirror_coalesced_clients",
            "Clients being sent a blob from a transfer that is still running.",
            state.waiting_clients(),
        )
        limit = GaugeMetricFamily(
            "mirror_upstream_ratelimit_limit",
            "Pull limit the upstream announced (ratelimit-limit), as last seen.",
            labels=["upstream"],
        )
        remaining = GaugeMetricFamily(
            "mirror_upstream_ratelimit_remaining",
            "Pulls left that the upstream announced (ratelimit-remaining), as last seen.",
            labels=["upstream"],
        )
        up = GaugeMetricFamily(
            "mirror_upstream_up",
            "1 when the upstream's last answer came, 0 when it failed.",
            labels=["upstream"],
        )
        for name, health in sorted(self._metrics.health.items()):
            if health.ratelimit_limit is not None:
                limit.add_metric([name], health.ratelimit_limit)
            if health.ratelimit_remaining is not None:
                remaining.add_metric([name], health.ratelimit_remaining)
            if health.reachable is not None:
                up.add_metric([name], 1.0 if health.reachable else 0.0)
        yield limit
        yield remaining
        yield up


@dataclass
class Metrics:
    """The mirror's metrics; one instance per app, so tests and workers never share state."""

    registry: CollectorRegistry = field(default_factory=CollectorRegistry)
    live: LiveState = field(default_factory=LiveState)
    health: dict[str, UpstreamHealth] = field(default_factory=dict)
    repositories: RecentTally = field(default_factory=RecentTally)  # requests in the last hour
    started: float = field(default_factory=time.time)  # when this process began serving

    def __post_init__(self) -> None:
        registry = self.registry
        self.requests = Counter(
            "mirror_requests",
            "Client requests answered, by route kind, method, status class and result.",
            ["kind", "method", "status", "result"],
            registry=registry,
        )
        self.served_bytes = Counter(
            "mirror_served_bytes",
            "Bytes of blobs and manifests sent to clients, by where they came from.",
            ["source"],
            registry=registry,
        )
        self.answers = Counter(
            "mirror_upstream_answers",
            "Manifest and blob answers under each upstream, by where they came from.",
            ["upstream", "source"],
            registry=registry,
        )
        self.answered_bytes = Counter(
            "mirror_upstream_answered_bytes",
            "Bytes of those answers, by where they came from (cache: what the upstream was "
            "spared).",
            ["upstream", "source"],
            registry=registry,
        )
        self.fetched_bytes = Counter(
            "mirror_upstream_fetched_bytes",
            "Blob bytes fetched from each upstream.",
            ["upstream"],
            registry=registry,
        )
        self.upstream_requests = Counter(
            "mirror_upstream_requests",
            "Requests sent to an upstream registry, by upstream, method and status.",
            ["upstream", "method", "status"],
            registry=registry,
        )
        self.upstream_latency = Histogram(
            "mirror_upstream_request_duration_seconds",
            "Time until an upstream's answer began, by upstream.",
            ["upstream"],
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=registry,
        )
        self.token_requests = Counter(
            "mirror_upstream_token_requests",
            "Token requests to an upstream's token realm, by upstream and outcome.",
            ["upstream", "outcome"],
            registry=registry,
        )
        self.build = Gauge(
            "mirror_build_info",
            "1, labelled with the running version.",
            ["version"],
            registry=registry,
            multiprocess_mode="max",
        )
        self.build.labels(VERSION).set(1)
        self.prefetched = Counter(
            "mirror_prefetched_bytes",
            "Blob bytes fetched ahead of any client, as an image manifest passed through.",
            ["upstream"],
            registry=registry,
        )
        self.prefetch_hits = Counter(
            "mirror_prefetch_hits",
            "Blob requests answered from a prefetch (done, or under way and joined).",
            ["upstream"],
            registry=registry,
        )
        self.shared_tier_bytes = Counter(
            "mirror_shared_tier_bytes",
            "Blob bytes read from the shared S3 tier instead of an upstream (read), and "
            "uploaded to it (written).",
            ["direction"],
            registry=registry,
        )
        self.cluster_waits = Counter(
            "mirror_cluster_waits",
            "Fetches left to another replica that held the cluster's claim on them, by what "
            "the wait ended with: tier (its copy arrived in the shared tier), claimed (the "
            "claim came free, this replica fetched it).",
            ["outcome"],
            registry=registry,
        )
        self.access_refused = Counter(
            "mirror_access_refused",
            "Client requests refused by the access rules, by reason: credentials (wrong "
            "or missing where needed), denied (an identity without the grant), rate_limited "
            "(too many failed logins).",
            ["reason"],
            registry=registry,
        )
        self.logins = Counter(
            "mirror_logins",
            "Logins checked against access.users_file (Basic, or at /token), by outcome.",
            ["outcome"],
            registry=registry,
        )
        registry.register(StateCollector(self))

    def upstream(self, name: str) -> UpstreamHealth:
        return self.health.setdefault(name, UpstreamHealth())

    def start_at_zero(self, upstreams: Iterable[str]) -> None:
        """Give each upstream's counters a sample of 0 from the start: a dashboard or an
        alert on a rate sees 0, not a series that does not exist yet."""
        for name in upstreams:
            for counter in (self.fetched_bytes, self.prefetched, self.prefetch_hits):
                counter.labels(name)
            for source in ("cache", "upstream"):
                self.answers.labels(name, source)
                self.answered_bytes.labels(name, source)
        for source in ("cache", "upstream"):
            self.served_bytes.labels(source)

    def count_repository(self, upstream: str, repository: str) -> None:
        self.repositories.count(f"{upstream}/{repository}")

    def _collecting(self) -> CollectorRegistry:
        """The registry to read: this process's, or, with worker processes, every
        worker's counters and histograms added up (from their files), plus live state."""
        directory = os.environ.get(MULTIPROCESS_ENV)
        if not directory:
            return self.registry
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=directory)  # type: ignore[no-untyped-call]
        registry.register(StateCollector(self))
        return registry

    def render(self) -> bytes:
        return generate_latest(self._collecting())

    def value(self, name: str, **labels: str) -> float:
        """One sample's value (0 when absent): for the status page and tests."""
        return self.total(name, **labels)

    def total(self, name: str, **labels: str) -> float:
        """The sum of a metric's samples whose labels include `labels`."""
        total = 0.0
        for family in self._collecting().collect():
            for sample in family.samples:
                if sample.name == name and labels.items() <= sample.labels.items():
                    total += sample.value
        return total


MULTIPROCESS_ENV = "PROMETHEUS_MULTIPROC_DIR"


def shared_folder() -> Path | None:
    """Where the worker processes share their counters (and snapshots), if they do."""
    directory = os.environ.get(MULTIPROCESS_ENV)
    return Path(directory) if directory else None


def share_between_workers(directory: Path) -> None:
    """Before worker processes start: counters and histograms are kept in files under
    `directory`, one per process, and every scrape adds them all up. Clears what an
    earlier run left there."""
    directory.mkdir(parents=True, exist_ok=True)
    for stale in directory.glob("*.db"):
        stale.unlink()
    os.environ[MULTIPROCESS_ENV] = str(directory)


def start_worker_metrics() -> None:
    """In a worker process, before its Metrics are made: values go to this process's file."""
    if os.environ.get(MULTIPROCESS_ENV):
        values.ValueClass = values.MultiProcessValue()  # type: ignore[no-untyped-call]
