"""Fills: one upstream transfer per missing blob, streamed to every waiting client as it
arrives, verified, then kept; or, when the store cannot keep it, streamed through in a
bounded window. Each runs on its own task, so a client that hangs up does not stop it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from ..cluster.parts import Cluster
from ..cluster.shared import Claim
from ..config import Config
from ..errors import BlobUnknown, RegistryError, UpstreamError, UpstreamTimeout
from ..inflight import Transfer, outlast
from ..metrics import Metrics
from ..reference import Digest
from ..routing import Route
from ..store.base import WRITE_ERRORS, BlobStore, DigestMismatch, PassThroughBlob, TempBlob
from ..store.s3 import TierUnavailable
from ..upstream.client import Upstream
from .appender import Appender
from .segments import Segments

log = logging.getLogger("mirror.proxy")

FROM_TIER = "tier"  # a fill's source: the shared tier, not an upstream
CLAIM_POLL = 0.1  # seconds between looks while another replica fetches a blob
SHARE_GRACE = 5.0  # seconds a stopping server gives uploads to the shared tier


class Fills:
    """The blob transfers of this process, by digest."""

    def __init__(
        self,
        config: Config,
        store: BlobStore,
        metrics: Metrics,
        upstream_of: Callable[[Route], Upstream],
        cluster: Cluster | None = None,
    ) -> None:
        self._config = config
        self._store = store
        self._metrics = metrics
        self._upstream_of = upstream_of
        self._cluster = cluster or Cluster()
        self._transfers: dict[str, Transfer] = {}
        self._tasks: set[asyncio.Future[None]] = set()
        self._sharing: set[asyncio.Future[None]] = set()  # uploads to the shared tier

    def running(self, digest: Digest) -> Transfer | None:
        return self._transfers.get(str(digest))

    def in_flight(self) -> int:
        return len(self._transfers)

    def waiting_clients(self) -> int:
        return sum(transfer.readers for transfer in self._transfers.values())

    def start(self, route: Route, digest: Digest) -> Transfer | None:
        """Begin the one fill of `digest` (None: another process runs it)."""
        temp: TempBlob | None
        try:
            temp = self._store.begin_blob(digest, route.upstream.name, route.repository)
        except WRITE_ERRORS as exc:
            self._store.counters.write_failed(f"beginning {digest}", exc)
            temp = PassThroughBlob(digest)
        if temp is None:
            return None
        if self._store.has_blob(digest):  # finished while we took the lock
            temp.discard()
            return None
        transfer = self._run(route, digest, temp)
        self._transfers[str(digest)] = transfer
        return transfer

    def pass_through(self, route: Route, digest: Digest) -> Transfer:
        """A transfer for one client that keeps nothing (and coalesces with nothing)."""
        return self._run(route, digest, PassThroughBlob(digest))

    async def close(self) -> None:
        """Stop the fills. What they leave to do (claims to let go) and uploads to the
        shared tier under way get SHARE_GRACE to end: a replica stopped just after a fill
        still gives the cluster its copy."""
        running = list(self._tasks - self._sharing)
        for task in running:
            task.cancel()
        await asyncio.gather(*running, return_exceptions=True)
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=SHARE_GRACE)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def _run(self, route: Route, digest: Digest, temp: TempBlob) -> Transfer:
        transfer = Transfer(temp.read_back())
        task = asyncio.create_task(self._fill(route, digest, temp, transfer))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return transfer

    async def _fill(self, route: Route, digest: Digest, temp: TempBlob, transfer: Transfer) -> None:
        """Fetch one blob into the store, feeding `transfer`'s readers as bytes arrive. The
        whole of it, waiting for a transfer slot (or another replica) included, ends within
        `timeouts.transfer`."""
        upstream = self._upstream_of(route)
        deadline = time.monotonic() + self._config.timeouts.transfer
        source: Claim | str | None = None  # the shared tier, or the cluster's claim held
        try:
            try:
                async with asyncio.timeout_at(deadline):
                    source = await self._source(route, digest)
                    if source == FROM_TIER:
                        await self._download(
                            upstream, route, digest, temp, transfer, deadline, True
                        )
                    else:
                        async with upstream.transfer_slots:
                            await self._download(upstream, route, digest, temp, transfer, deadline)
            except TimeoutError:
                raise UpstreamTimeout(
                    f"upstream {upstream.name}: transfer of {digest} took longer than "
                    f"timeouts.transfer ({self._config.timeouts.transfer:g}s)"
                ) from None
            temp.verify()
            transfer.finish()  # the right bytes: clients get their last byte now
            # fsync, rename, index and eviction: off the loop, so other clients go on.
            keeping = asyncio.ensure_future(asyncio.to_thread(_keep, temp))
            if await outlast(keeping):  # a server stopping waits for the commit
                log.info(
                    "stored %s (%d bytes) from %s",
                    digest,
                    temp.written,
                    "the shared tier" if source == FROM_TIER else upstream.name,
                )
                if source != FROM_TIER and self._cluster.tier is not None:
                    upload = self._spawn(self._share(digest, source))  # it releases the claim
                    self._sharing.add(upload)
                    upload.add_done_callback(self._sharing.discard)
                    source = None
            else:
                transfer.not_kept()
                log.warning("served %s (%d bytes) without keeping it", digest, temp.written)
        except (RegistryError, DigestMismatch, OSError, TierUnavailable) as exc:
            temp.discard()
            tier, shared = self._cluster.tier, self._cluster.shared
            sender = "the shared tier" if source == FROM_TIER else f"upstream {upstream.name}"
            if source == FROM_TIER and tier is not None and isinstance(exc, DigestMismatch):
                self._spawn(tier.remove_blob(digest))  # the next reader goes to the upstream
            if isinstance(source, Claim) and shared is not None and isinstance(exc, BlobUnknown):
                # Said before the claim goes, so the replicas waiting on it do not ask too.
                await shared.put_missing(
                    upstream.name, route.repository, str(digest), self._config.negative_ttl
                )
            error = _as_registry_error(exc, sender, digest)
            log.warning("fetch of %s from %s failed: %s", digest, sender, error.message)
            transfer.fail(error)
        except BaseException as exc:
            temp.discard()
            transfer.fail(UpstreamError("transfer stopped"))
            if isinstance(exc, asyncio.CancelledError):
                raise
            log.exception("fetch of %s from %s failed", digest, upstream.name)
        finally:
            if isinstance(source, Claim):
                self._spawn(source.release())
            if self._transfers.get(str(digest)) is transfer:
                del self._transfers[str(digest)]
            transfer.settled.set()

    def _spawn(self, work: Coroutine[Any, Any, None]) -> asyncio.Future[None]:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _source(self, route: Route, digest: Digest) -> Claim | str | None:
        """Where a fill reads from: the shared tier when it has the blob (FROM_TIER); else
        the upstream, under the cluster's claim on the blob (None: no cluster, or a shared
        tier that is away, so nothing to wait for). While another replica holds the claim,
        this one waits for the blob to arrive in the tier, or for the claim to come free."""
        tier, shared = self._cluster.tier, self._cluster.shared
        if tier is None:
            return None
        waited = False
        while True:
            if await tier.blob_size(digest) is not None:
                if waited:
                    self._metrics.cluster_waits.labels("tier").inc()
                return FROM_TIER
            if shared is None or not tier.reachable:
                return None  # (the holder could not share it: fetch it here)
            if waited and await shared.known_missing(
                route.upstream.name, route.repository, str(digest)
            ):
                raise BlobUnknown(
                    f"blob unknown to upstream {route.upstream.name} (answer cached)",
                    detail={"digest": str(digest)},
                )
            claim = await shared.claim(f"blob:{digest}")
            if claim is not None and await tier.blob_size(digest) is not None:
                # Its holder finished between the look and the claim: the tier has it.
                await claim.release()
                continue
            if claim is not None:
                if waited:
                    self._metrics.cluster_waits.labels("claimed").inc()
                return claim
            waited = True
            await asyncio.sleep(CLAIM_POLL)

    async def _share(self, digest: Digest, claim: Claim | str | None) -> None:
        """Upload a blob just kept to the shared tier, then let the cluster's claim go:
        replicas waiting on it find it in the tier. Clients were served already."""
        tier = self._cluster.tier
        try:
            stored = self._store.open_blob(digest)
            fd = stored.fileno() if stored is not None else None
            if tier is not None and stored is not None and fd is not None:
                try:
                    if await tier.put_blob(digest, fd, stored.size):
                        self._metrics.shared_tier_bytes.labels("written").inc(stored.size)
                finally:
                    stored.close()
        finally:
            if isinstance(claim, Claim):
                await claim.release()

    async def _download(
        self,
        upstream: Upstream,
        route: Route,
        digest: Digest,
        temp: TempBlob,
        transfer: Transfer,
        deadline: float,
        from_tier: bool = False,
    ) -> None:
        """Stream the blob (from the upstream, or the shared tier) into `temp` and to
        `transfer`'s readers. What the store cannot keep (larger than its bound, or the
        disk is full) is streamed through in a bounded window, never buffered whole."""

        fetched = (  # looked up once
            self._metrics.shared_tier_bytes.labels("read")
            if from_tier
            else self._metrics.fetched_bytes.labels(upstream.name)
        )
        beside = getattr(temp, "path", None)  # a temporary file: ranges can be spooled
        ahead = Segments(
            upstream,
            route.repository,
            digest,
            beside if isinstance(beside, Path) else None,
            deadline,
            fetched,
            route.upstream.range_connections,
        )

        appender = Appender(self._store, temp, transfer, digest)

        def started(size: int | None, takes_ranges: bool) -> None:
            if takes_ranges:
                ahead.allow()
            # Spilled before announced: processes following this fill learn both at once.
            if size is not None and size > self._store.max_size:
                appender.spill(f"{size} bytes, over the store's bound")
            try:
                temp.announce(size)
            except WRITE_ERRORS as exc:
                self._store.counters.write_failed(f"announcing {digest}", exc)
                appender.spill("the disk is full")
            transfer.start(size)

        tier = self._cluster.tier
        chunks = (
            tier.blob_chunks(digest, started=started)
            if from_tier and tier is not None
            else upstream.blob_chunks(route.repository, digest, deadline=deadline, started=started)
        )
        try:
            stop: int | None = None  # where this stream ends and the ranges fetched ahead begin
            received = 0
            began: float | None = None  # when the first bytes came: the speed is from there
            async for chunk in chunks:
                if began is None:  # (the length is known from here: `started` ran)
                    began, stop = time.monotonic(), transfer.size
                elif (
                    stop is not None
                    and not transfer.spilled
                    and ahead.could_split(received, stop, began)
                ):
                    stop = await ahead.split(received, stop, began)
                if stop is not None and received + len(chunk) >= stop:
                    chunk = chunk[: stop - received]
                fetched.inc(len(chunk))
                received += len(chunk)
                appender.add(chunk)
                if transfer.spilled:
                    await transfer.drain(self._config.timeouts.read)
                if stop is not None and received >= stop:
                    break
            await chunks.aclose()  # (when it stopped at the ranges: lets its connection go)
            async for data in ahead.rest():
                appender.add(bytes(data))
                if transfer.spilled:
                    await transfer.drain(self._config.timeouts.read)
        finally:
            await ahead.close()


def _keep(temp: TempBlob) -> bool:
    """Make a verified fill durable and visible, unless it was not kept (blocking)."""
    if temp.spilled:
        return temp.commit(keep=False)
    temp.sync()
    return temp.commit()


def _as_registry_error(exc: BaseException, sender: str, digest: Digest) -> RegistryError:
    """What clients are told of a failed fill; `sender` names where the bytes came from
    ("upstream docker.io", "the shared tier")."""
    if isinstance(exc, RegistryError):
        return exc
    if isinstance(exc, TierUnavailable):
        return UpstreamError(f"{sender} failed sending {digest}: {exc}")
    if isinstance(exc, DigestMismatch):
        return UpstreamError(f"{sender} sent content that does not match {digest}")
    if isinstance(exc, TimeoutError):
        return UpstreamTimeout(f"{sender} stalled sending {digest}")
    if isinstance(exc, OSError):
        return UpstreamError(f"could not store {digest}: {exc.strerror or exc}")
    return UpstreamError(f"{sender} failed sending {digest}")
