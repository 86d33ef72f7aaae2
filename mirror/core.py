"""The mirror without its HTTP server: the store, the tag index, the upstreams and the
pull-through policy over them. The server holds one; so do the commands that fill or read
the cache (`mirror warm`, `export`), which then share the server's store beside it.
"""

from __future__ import annotations

from dataclasses import dataclass

from .clock import Clock, system_clock
from .cluster.parts import Cluster
from .config import Config
from .hosted.registry import Hosted
from .metrics import Metrics
from .policy.proxy import Proxy
from .store.disk import DiskStore
from .store.tags import TagIndex
from .upstream.pool import Upstreams


@dataclass
class Core:
    config: Config
    metrics: Metrics
    store: DiskStore
    tags: TagIndex
    upstreams: Upstreams
    proxy: Proxy
    cluster: Cluster
    hosted: Hosted | None  # when a namespace is hosted (pushed to)

    @classmethod
    def open(
        cls, config: Config, *, repair_store: bool = True, clock: Clock = system_clock
    ) -> Core:
        """Open the store and the upstreams' connections; inside the event loop that will
        use them. `repair_store` only where no other process may be using the store."""
        metrics = Metrics()
        metrics.start_at_zero(config.upstreams)
        store = DiskStore(
            config.storage.path, config.storage.max_size, repair=repair_store, clock=clock
        )
        tags = TagIndex(config.storage.path / "index", store.counters.write_failed, clock)
        upstreams = Upstreams(config, metrics, clock)
        cluster = Cluster.open(config, clock)
        proxy = Proxy(config, store, tags, upstreams.by_name, metrics, clock, cluster)
        hosted = Hosted(config, store) if any(u.hosted for u in config.upstreams.values()) else None
        return cls(config, metrics, store, tags, upstreams, proxy, cluster, hosted)

    async def close(self) -> None:
        await self.proxy.close()
        await self.cluster.close()
        await self.upstreams.close()
        self.tags.close()
        if self.hosted is not None:
            self.hosted.close()
        self.store.close()
