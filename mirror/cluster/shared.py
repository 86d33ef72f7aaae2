"""What the replicas of a cluster share through Redis (aiocache's Redis backend): tag
answers with the time they were confirmed, remembered 404s, each upstream's back-off, and
claims on fetches, so that each is asked of an upstream once for the whole cluster.

Redis helps; it is never needed. A call that fails or takes longer than REDIS_TIMEOUT
answers as if Redis knew nothing (a claim is granted: the replica fetches by itself), the
replica says so once in its log, and Redis is left alone for a few seconds before it is
asked again, so a lost Redis costs no request more than one short wait.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import secrets
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit

from aiocache import RedisCache  # type: ignore[import-untyped]
from aiocache.backends.redis import RedisBackend  # type: ignore[import-untyped]
from aiocache.serializers import StringSerializer  # type: ignore[import-untyped]

from ..clock import Clock
from ..config import ClusterConfig
from ..store.tags import TagEntry

log = logging.getLogger("mirror.cluster")

REDIS_TIMEOUT = 0.5  # seconds one Redis call may take before the replica goes on alone
REDIS_REST = 3.0  # seconds Redis is left alone after it failed
TAG_KEEP = 7 * 86400  # seconds a tag answer stays in Redis unconfirmed (bounds its size)

T = TypeVar("T")


@dataclass(frozen=True)
class Down:
    """An upstream another replica found down: not asked before `retry_at` (wall clock)."""

    retry_at: float
    why: str


class Claim:
    """The right to fetch one thing for the whole cluster, kept alive while held."""

    def __init__(self, shared: Shared | None, key: str, token: str) -> None:
        self._shared = shared  # None: granted without Redis (it is away), nothing to renew
        self._key = key
        self._token = token
        self._renewal: asyncio.Task[None] | None = None
        if shared is not None:
            self._renewal = asyncio.create_task(shared._renew(key, token))

    async def release(self) -> None:
        if self._renewal is not None:
            self._renewal.cancel()
            self._renewal = None
        if self._shared is not None:
            await self._shared._release(self._key, self._token)
            self._shared = None


class Shared:
    """The cluster's shared state, in Redis."""

    def __init__(self, config: ClusterConfig, clock: Clock) -> None:
        parts = urlsplit(config.redis)
        self._cache = RedisCache(
            endpoint=parts.hostname or "127.0.0.1",
            port=parts.port or 6379,
            db=int(parts.path.strip("/") or 0),
            password=unquote(parts.password) if parts.password else None,
            ssl=parts.scheme == "rediss",
            namespace="mirror",
            serializer=StringSerializer(),
            timeout=REDIS_TIMEOUT,
            create_connection_timeout=REDIS_TIMEOUT,
        )
        self._where = f"{parts.hostname}:{parts.port or 6379}"
        self.lease = config.lease
        self._clock = clock
        self._resting_until = 0.0  # monotonic: Redis is not asked before then
        self.reachable = True
        self._closing = False

    async def close(self) -> None:
        self._closing = True  # what fails from here on is the closing, not Redis
        with contextlib.suppress(Exception):  # a Redis that is gone, or hangs
            async with asyncio.timeout(REDIS_TIMEOUT):
                await self._cache.close()

    async def _ask(self, call: Awaitable[T], otherwise: T) -> T:
        """`call`'s answer, or `otherwise` when Redis fails (then rest it a moment)."""
        if time.monotonic() < self._resting_until:
            if asyncio.iscoroutine(call):
                call.close()
            return otherwise
        try:
            answer = await call
        except (asyncio.CancelledError, KeyboardInterrupt):
            raise
        except Exception as exc:
            self._resting_until = time.monotonic() + REDIS_REST
            if self.reachable and not self._closing:
                log.warning(
                    "redis at %s does not answer (%s): going on with this replica's own state",
                    self._where,
                    type(exc).__name__ if not str(exc) else exc,
                )
            self.reachable = False
            return otherwise
        if not self.reachable:
            log.warning("redis at %s answers again: sharing state with the cluster", self._where)
            self.reachable = True
        return answer

    # Tag answers

    @staticmethod
    def _tag_key(upstream: str, repository: str, tag: str) -> str:
        return f"tag:{upstream}/{repository}:{tag}"

    async def tag(self, upstream: str, repository: str, tag: str) -> TagEntry | None:
        text = await self._ask(self._cache.get(self._tag_key(upstream, repository, tag)), None)
        try:
            digest, media_type, confirmed_at = json.loads(text) if text else (None, None, None)
        except (ValueError, TypeError):
            return None
        if not isinstance(digest, str) or not isinstance(media_type, str):
            return None
        if not isinstance(confirmed_at, int | float):
            return None
        return TagEntry(digest, media_type, float(confirmed_at))

    async def put_tag(self, upstream: str, repository: str, tag: str, entry: TagEntry) -> None:
        value = json.dumps([entry.digest, entry.media_type, entry.confirmed_at])
        key = self._tag_key(upstream, repository, tag)
        await self._ask(self._cache.set(key, value, ttl=TAG_KEEP), None)

    # Upstream 404s

    async def put_missing(self, upstream: str, repository: str, reference: str, ttl: float) -> None:
        if ttl <= 0:
            return
        key = f"missing:{upstream}/{repository}@{reference}"
        until = self._clock() + ttl
        await self._ask(self._cache.set(key, repr(until), ttl=math.ceil(ttl)), None)

    async def known_missing(self, upstream: str, repository: str, reference: str) -> bool:
        key = f"missing:{upstream}/{repository}@{reference}"
        text = await self._ask(self._cache.get(key), None)
        try:
            return text is not None and self._clock() < float(text)
        except ValueError:
            return False

    # Upstream back-off

    async def put_down(self, upstream: str, retry_in: float, why: str) -> None:
        value = json.dumps([self._clock() + retry_in, why])
        ttl = max(1, math.ceil(retry_in))
        await self._ask(self._cache.set(f"down:{upstream}", value, ttl=ttl), None)

    async def put_up(self, upstream: str) -> None:
        await self._ask(self._cache.delete(f"down:{upstream}"), None)

    async def down(self, upstream: str) -> Down | None:
        text = await self._ask(self._cache.get(f"down:{upstream}"), None)
        try:
            retry_at, why = json.loads(text) if text else (None, None)
        except (ValueError, TypeError):
            return None
        if not isinstance(retry_at, int | float) or not isinstance(why, str):
            return None
        return Down(float(retry_at), why) if retry_at > self._clock() else None

    # Claims

    async def claim(self, key: str) -> Claim | None:
        """The cluster's claim on `key` (None: another replica holds it). Without Redis
        every replica is granted its own: it fetches by itself, as a lone mirror would."""
        token = secrets.token_hex(8)
        added = await self._ask(self._add(f"claim:{key}", token), None)
        if added is None:
            return Claim(None, key, token)
        return Claim(self, f"claim:{key}", token) if added else None

    async def _add(self, key: str, token: str) -> bool:
        try:
            await self._cache.add(key, token, ttl=float(self.lease))
        except ValueError:  # aiocache's word for "the key exists"
            return False
        return True

    async def _renew(self, key: str, token: str) -> None:
        """Push the claim's end out every third of the lease, while it is still ours."""
        while True:
            await asyncio.sleep(self.lease / 3)
            renewed: Any = await self._ask(
                self._cache.set(key, token, ttl=float(self.lease), _cas_token=token), None
            )
            if renewed == 0:
                log.warning("lost the cluster's claim %s (it expired)", key)
                return

    async def _release(self, key: str, token: str) -> None:
        built = self._cache.build_key(key)
        await self._ask(self._cache.raw("eval", RedisBackend.RELEASE_SCRIPT, 1, built, token), None)
