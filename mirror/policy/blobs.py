"""Blobs: a hit from the store, else the one transfer of that digest, here or in another
worker process, joined as it runs."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from ..config import Config
from ..errors import UpstreamTimeout
from ..inflight import BlobStream, NotKept, TransferFailed
from ..reference import Digest
from ..routing import Route
from ..store.base import BlobStore, StoredBlob, blob_key
from ..store.s3 import S3Tier
from ..upstream.client import Upstream
from .answers import COALESCED, HIT, MISS
from .fills import Fills
from .membership import Membership

FOREIGN_FILL_POLL = 0.05  # seconds between looks at a fill another process runs


class Blobs:
    """Answers blob requests: lengths for HEAD, something to send for GET."""

    def __init__(
        self,
        config: Config,
        store: BlobStore,
        fills: Fills,
        upstream_of: Callable[[Route], Upstream],
        membership: Membership,
        answered: Callable[[Digest], None] = lambda digest: None,
        tier: S3Tier | None = None,
    ) -> None:
        self._tier = tier
        self._answered = answered  # told of each request answered without a new transfer
        self._config = config
        self._store = store
        self._fills = fills
        self._upstream_of = upstream_of
        self._membership = membership

    async def _check(self, route: Route, digest: Digest) -> None:
        """Served from what another request fetched: only where the blob is known to be."""
        if not self._membership.enabled:
            return
        upstream = self._upstream_of(route)
        await self._membership.check(
            route, blob_key(digest), lambda: upstream.head_blob(route.repository, digest)
        )

    async def size(self, route: Route, digest: Digest) -> tuple[int, str]:
        """Length of a blob, for HEAD: from the store, a running transfer, the shared tier,
        or an upstream HEAD; with where the answer came from."""
        size = self._store.blob_size(digest)
        if size is not None:
            await self._check(route, digest)
            return size, HIT
        transfer = self._fills.running(digest)
        if transfer is not None and transfer.size is not None:
            await self._check(route, digest)
            return transfer.size, COALESCED
        followed = self._store.follow(digest)  # another worker may be fetching it
        if followed is not None and followed.size_if_known() is not None:
            await self._check(route, digest)
            return followed.size_if_known() or 0, COALESCED
        if self._tier is not None:
            size = await self._tier.blob_size(digest)
            if size is not None:
                await self._check(route, digest)
                return size, HIT
        return await self._upstream_of(route).head_blob(route.repository, digest), MISS

    async def open(self, route: Route, digest: Digest) -> tuple[StoredBlob | BlobStream, str]:
        """The stored blob (HIT; the caller closes it), or a transfer to stream from (its
        size known): one this request started (MISS) or one already running here or in
        another worker process (COALESCED)."""
        source, result = await self._open(route, digest)
        if result != MISS:
            self._answered(digest)
        return source, result

    async def _open(self, route: Route, digest: Digest) -> tuple[StoredBlob | BlobStream, str]:
        deadline = time.monotonic() + self._config.timeouts.transfer
        while True:
            stored = self._store.open_blob(digest)
            if stored is not None:
                try:
                    await self._check(route, digest)
                except BaseException:
                    stored.close()
                    raise
                return stored, HIT
            result = COALESCED
            transfer = self._fills.running(digest)
            if transfer is not None and not transfer.serves_from(0):
                # Streamed through without being kept, and past what it still holds: this
                # client gets a transfer of its own.
                result, transfer = MISS, self._fills.pass_through(route, digest)
            elif transfer is None:
                result = MISS
                transfer = self._fills.start(route, digest)
            if transfer is not None:
                if result == COALESCED:
                    await self._check(route, digest)
                await transfer.wait_started()
                return transfer, result
            # Another process is filling this digest: follow its file as it grows.
            followed = self._store.follow(digest)
            if followed is not None:
                try:
                    await self._check(route, digest)
                    await followed.wait_started(
                        self._config.timeouts.connect + self._config.timeouts.read
                    )
                    return followed, COALESCED
                except NotKept:
                    # Streamed through there (a full disk, a blob over the bound): there is
                    # no file to follow, so this client gets a transfer of its own.
                    transfer = self._fills.pass_through(route, digest)
                    await transfer.wait_started()
                    return transfer, MISS
                except TransferFailed:
                    pass  # it gave up before it began: look again, and maybe fetch it here
            if time.monotonic() > deadline:
                raise UpstreamTimeout(f"timed out waiting for another worker to fetch {digest}")
            await asyncio.sleep(FOREIGN_FILL_POLL)
