"""Upstream back-off, shared: a replica that finds an upstream down says so in Redis, and
the others stop asking it too until the back-off ends, so a failing upstream costs the
cluster one timeout, not one per replica."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

from ..upstream.breaker import Breaker
from ..upstream.client import Upstream
from .shared import Shared

HEALTH_EVERY = 0.25  # seconds between exchanges of upstream health with the cluster


async def share_health(shared: Shared, upstreams: Mapping[str, Upstream]) -> None:
    """Publish this replica's own findings and learn the others', every HEALTH_EVERY."""
    published: dict[str, float] = {}  # upstream -> the retry time said to the cluster
    task = asyncio.current_task()
    while True:
        await asyncio.sleep(HEALTH_EVERY)
        for name, upstream in upstreams.items():
            breaker = getattr(upstream, "breaker", None)
            if isinstance(breaker, Breaker):  # (an offline upstream has none)
                await exchange(shared, name, breaker, published)
            if task is not None and task.cancelling():
                # A stop's cancel can be lost inside the Redis client (Python 3.11's
                # asyncio.wait_for drops one that comes as its call completes): this loop
                # would then run on and hold the stop until its time limit.
                raise asyncio.CancelledError


async def exchange(
    shared: Shared, name: str, breaker: Breaker, published: dict[str, float]
) -> None:
    """Say what this replica found of one upstream (once per finding), or learn what
    another found."""
    if breaker.down and not breaker.learned and published.get(name) != breaker.retry_at:
        await shared.put_down(name, breaker.retry_in(), breaker.why)
        published[name] = breaker.retry_at
    elif not breaker.down and name in published:
        await shared.put_up(name)
        del published[name]
        return
    down = await shared.down(name)
    if down is not None:
        breaker.learn(down.retry_at, down.why)
