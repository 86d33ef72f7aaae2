"""The cluster as one replica sees it: shared state in Redis and the shared blob tier in
S3, each present only when configured (a lone mirror has neither, and pays nothing)."""

from __future__ import annotations

from dataclasses import dataclass

from ..clock import Clock
from ..config import Config
from ..store.s3 import S3Tier
from .shared import Shared


@dataclass
class Cluster:
    shared: Shared | None = None  # cluster.redis
    tier: S3Tier | None = None  # storage.s3

    @classmethod
    def open(cls, config: Config, clock: Clock) -> Cluster:
        shared = Shared(config.cluster, clock) if config.cluster is not None else None
        s3 = config.storage.s3
        tier = S3Tier(s3, config.timeouts.read) if s3 is not None else None
        return cls(shared, tier)

    async def close(self) -> None:
        if self.shared is not None:
            await self.shared.close()
        if self.tier is not None:
            await self.tier.close()
