"""Prefetch: an image manifest fetched from the upstream names every layer the client is
about to ask for, a few at a time. Their transfers start now, through the same fills as
client requests (a client asking for one joins it), so later layers are arriving or kept
by the time the client gets to them.

Only image manifests: for an index the platform is known only once the client picks one.
Bounded: at most PENDING transfers started this way at once, and each waits for a
transfer slot of its upstream like any other.
"""

from __future__ import annotations

import asyncio
import logging

from ..images.contents import BadManifest, blobs, is_index
from ..inflight import Transfer
from ..metrics import Metrics
from ..reference import Digest
from ..routing import Route
from ..store.base import BlobStore
from .fills import Fills

log = logging.getLogger("mirror.proxy")

PENDING = 64  # prefetch transfers at once, every upstream together
REMEMBERED = 4096  # prefetched digests remembered, to count the requests they answer


class Prefetcher:
    def __init__(self, store: BlobStore, fills: Fills, metrics: Metrics) -> None:
        self._store = store
        self._fills = fills
        self._metrics = metrics
        self._pending: set[str] = set()
        self._fetched: dict[str, str] = {}  # digest -> upstream, oldest first

    def manifest_fetched(self, route: Route, media_type: str, data: bytes) -> None:
        """Start fetching what an image manifest names that is neither kept nor coming."""
        if not route.upstream.prefetch or route.upstream.offline:
            return
        try:
            if is_index(media_type, data):
                return
            wanted = blobs(data)
        except BadManifest:
            return
        for blob in wanted:
            if len(self._pending) >= PENDING:
                return
            key = str(blob.digest)
            if key in self._pending or self._fills.running(blob.digest) is not None:
                continue
            if self._store.has_blob(blob.digest):
                continue
            transfer = self._fills.start(route, blob.digest)
            if transfer is not None:  # (None: another process fetches it)
                self._started(route, blob.digest, transfer)

    def _started(self, route: Route, digest: Digest, transfer: Transfer) -> None:
        key, upstream = str(digest), route.upstream.name
        self._pending.add(key)
        self._remember(key, upstream)

        def done(_: object) -> None:
            self._pending.discard(key)
            if transfer.complete and transfer.error is None:
                self._metrics.prefetched.labels(upstream).inc(transfer.written)

        asyncio.ensure_future(transfer.settled.wait()).add_done_callback(done)

    def _remember(self, key: str, upstream: str) -> None:
        self._fetched[key] = upstream
        if len(self._fetched) > REMEMBERED:
            del self._fetched[next(iter(self._fetched))]

    def answered(self, digest: Digest) -> None:
        """A client's blob request was answered from the cache or a running transfer:
        counted as a prefetch hit when a prefetch brought it (once)."""
        upstream = self._fetched.pop(str(digest), None)
        if upstream is not None:
            self._metrics.prefetch_hits.labels(upstream).inc()
