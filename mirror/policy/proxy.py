"""The pull-through policy: answer from the store when it can, else fetch once and keep.

Manifests are kept as the exact upstream bytes under their digest; a tag's digest is
trusted for `manifest_ttl` seconds, then revalidated with a HEAD. Blobs are fetched once
per digest, whoever asks, and streamed to every waiting client from the one transfer.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import time
from dataclasses import dataclass

from ..clock import Clock, system_clock
from ..config import Config
from ..errors import (
    BlobUnknown,
    Denied,
    KnownMissing,
    ManifestUnknown,
    NameUnknown,
    RegistryError,
    TooManyRequests,
    UpstreamError,
    UpstreamTimeout,
)
from ..inflight import BlobStream, NotKept, SingleFlight, Transfer, TransferFailed
from ..metrics import Metrics
from ..reference import MANIFEST_TYPES, Digest, parse_digest
from ..routing import Route
from ..store.base import (
    WRITE_ERRORS,
    BlobStore,
    DigestMismatch,
    PassThroughBlob,
    StoredBlob,
    TempBlob,
)
from ..store.tags import TagEntry, TagIndex
from ..upstream.client import Page, UpstreamClient

log = logging.getLogger("mirror.proxy")

ALL_MANIFEST_TYPES = ", ".join(MANIFEST_TYPES)
FOREIGN_FILL_POLL = 0.05  # seconds between looks at a fill another process runs


HIT, MISS, STALE, COALESCED = "hit", "miss", "stale", "coalesced"  # where answers came from


@dataclass(frozen=True)
class Manifest:
    """A manifest answer: digest, type and length always; the bytes when a GET needs them."""

    digest: str
    media_type: str
    size: int
    data: bytes | None
    source: str  # HIT, MISS or STALE


def _kinds(accept: str) -> set[str]:
    return {part.split(";")[0].strip().lower() for part in accept.split(",")} - {""}


def accepts(accept: str, media_type: str) -> bool:
    """Whether a client's Accept header admits `media_type` (no Accept admits anything)."""
    kinds = _kinds(accept)
    return not kinds or "*/*" in kinds or media_type.lower() in kinds


def upstream_accept(accept: str) -> str:
    """The Accept to send upstream: the client's list, or every manifest type when the
    client named none (a bare `*/*` would make the reference registry answer schema1)."""
    kinds = _kinds(accept) - {"*/*"}
    return accept if kinds else ALL_MANIFEST_TYPES


class Proxy:
    """Answers manifests, blobs, tags and referrers for routed requests."""

    def __init__(
        self,
        config: Config,
        store: BlobStore,
        tags: TagIndex,
        upstreams: dict[str, UpstreamClient],
        metrics: Metrics,
        clock: Clock = system_clock,
    ) -> None:
        self._config = config
        self._clock = clock
        self._metrics = metrics
        self._store = store
        self._tags = tags
        self._upstreams = upstreams
        self._manifest_fetches: SingleFlight[tuple[str, ...], Manifest] = SingleFlight()
        self._transfers: dict[str, Transfer] = {}
        self._fills: set[asyncio.Task[None]] = set()

    def transfers_in_flight(self) -> int:
        return len(self._transfers)

    def waiting_clients(self) -> int:
        return sum(transfer.readers for transfer in self._transfers.values())

    def _client(self, route: Route) -> UpstreamClient:
        return self._upstreams[route.upstream.name]

    # manifests

    async def manifest(self, route: Route, reference: str, accept: str, *, head: bool) -> Manifest:
        digest = parse_digest(reference)
        if digest is not None:
            return await self._manifest_by_digest(route, digest, head=head)
        return await self._manifest_by_tag(route, reference, accept, head=head)

    def _cached_manifest(self, digest_text: str, *, head: bool, source: str) -> Manifest | None:
        digest = parse_digest(digest_text)
        found = self._store.get_manifest(digest) if digest is not None else None
        if found is None:
            return None
        data, media_type = found
        return Manifest(str(digest), media_type, len(data), None if head else data, source)

    def _check_reachable(self, route: Route, reference: str) -> None:
        """Refuse, without contacting anything, what only the upstream could answer."""
        if route.upstream.offline:
            raise ManifestUnknown(
                f"{route.upstream.name}/{route.repository}:{reference} is not cached "
                "and the mirror is offline for this upstream"
            )
        if self._tags.known_missing(route.upstream.name, route.repository, reference):
            raise KnownMissing(
                f"manifest unknown to upstream {route.upstream.name} (answer cached)",
                detail={"reference": reference},
            )

    async def _manifest_by_digest(self, route: Route, digest: Digest, *, head: bool) -> Manifest:
        cached = self._cached_manifest(str(digest), head=head, source=HIT)
        if cached is not None:
            return cached
        self._check_reachable(route, str(digest))
        key = (route.upstream.name, route.repository, str(digest))
        try:
            return await self._manifest_fetches.run(
                key, lambda: self._get_manifest(route, str(digest), ALL_MANIFEST_TYPES, digest)
            )
        except (ManifestUnknown, NameUnknown):
            self._remember_missing(route, str(digest))
            raise

    async def _manifest_by_tag(
        self, route: Route, tag: str, accept: str, *, head: bool
    ) -> Manifest:
        upstream = route.upstream
        entry = self._tags.get(upstream.name, route.repository, tag)
        if entry is not None and not accepts(accept, entry.media_type):
            entry = None  # the client cannot take what we know: ask the upstream
        if entry is not None:
            fresh = entry.age(self._clock()) < upstream.ttl_for(route.repository, tag)
            if fresh or upstream.offline:
                cached = self._cached_manifest(entry.digest, head=head, source=HIT)
                if cached is not None:
                    return cached
        self._check_reachable(route, tag)
        key = (upstream.name, route.repository, tag, accept, "HEAD" if head else "GET")
        # A tag seen before is revalidated with a HEAD (free under Docker Hub's limit); an
        # unknown one asked with GET is fetched at once, saving the HEAD's round trip.
        revalidate = head or entry is not None
        try:
            return await self._manifest_fetches.run(
                key, lambda: self._refresh_tag(route, tag, accept, head=head, revalidate=revalidate)
            )
        except (ManifestUnknown, NameUnknown):
            self._remember_missing(route, tag)
            if upstream.serve_stale_on_404:
                stale = self._stale(route, tag, entry, head, "the upstream answered 404")
                if stale is not None:
                    return stale
            raise
        except (UpstreamError, TooManyRequests, Denied) as error:
            stale = self._stale(route, tag, entry, head, error.message)
            if stale is not None:
                return stale
            raise

    def _remember_missing(self, route: Route, reference: str) -> None:
        self._tags.remember_missing(
            route.upstream.name, route.repository, reference, self._config.negative_ttl
        )

    def _stale(
        self, route: Route, tag: str, entry: TagEntry | None, head: bool, why: str
    ) -> Manifest | None:
        """The last known answer for a tag, when the upstream cannot give a fresh one."""
        if entry is None:
            return None
        cached = self._cached_manifest(entry.digest, head=head, source=STALE)
        if cached is not None:
            log.warning(
                "serving %s/%s:%s stale (%s, confirmed %.0fs ago): %s",
                route.upstream.name,
                route.repository,
                tag,
                entry.digest,
                entry.age(self._clock()),
                why,
            )
        return cached

    async def _refresh_tag(
        self, route: Route, tag: str, accept: str, *, head: bool, revalidate: bool
    ) -> Manifest:
        """Ask the upstream what the tag points to: HEAD first (when revalidating), GET only
        for what is missing."""
        client = self._client(route)
        send_accept = upstream_accept(accept)
        if not revalidate:
            manifest = await self._get_manifest(route, tag, send_accept, None)
            self._remember_tag(route, tag, manifest.digest, manifest.media_type)
            return manifest
        answer = await client.head_manifest(route.repository, tag, send_accept)
        if answer.digest is not None:
            digest_text = str(answer.digest)
            self._remember_tag(route, tag, digest_text, answer.media_type)
            cached = self._cached_manifest(digest_text, head=head, source=HIT)
            if cached is not None:
                return cached
            if head and answer.size is not None:
                return Manifest(digest_text, answer.media_type, answer.size, None, MISS)
        manifest = await self._get_manifest(route, tag, send_accept, None)
        self._remember_tag(route, tag, manifest.digest, manifest.media_type)
        return manifest

    def _remember_tag(self, route: Route, tag: str, digest: str, media_type: str) -> None:
        self._tags.put(
            route.upstream.name,
            route.repository,
            tag,
            TagEntry(digest, media_type, self._clock()),
        )

    async def _get_manifest(
        self, route: Route, reference: str, accept: str, expected: Digest | None
    ) -> Manifest:
        """GET a manifest (checked by the upstream client) and keep it when the store can;
        when it cannot, the exact bytes are served all the same."""
        client = self._client(route)
        fetched = await client.get_manifest(route.repository, reference, accept, expected)
        digest, media_type, data = fetched.digest, fetched.media_type, fetched.data
        try:
            await asyncio.to_thread(  # two fsyncs and the index: off the loop
                self._store.put_manifest,
                digest,
                data,
                media_type,
                route.upstream.name,
                route.repository,
            )
        except DigestMismatch:  # checked already; the store checks again, being the store
            raise UpstreamError(
                f"upstream {client.name} sent a manifest that does not match {digest}"
            ) from None
        return Manifest(str(digest), media_type, len(data), data, MISS)

    # blobs

    async def blob_size(self, route: Route, digest: Digest) -> tuple[int, str]:
        """Length of a blob, for HEAD: from the store, a running transfer, or an upstream
        HEAD; with where the answer came from."""
        size = self._store.blob_size(digest)
        if size is not None:
            return size, HIT
        transfer = self._transfers.get(str(digest))
        if transfer is not None and transfer.size is not None:
            return transfer.size, COALESCED
        followed = self._store.follow(digest)  # another worker may be fetching it
        if followed is not None and followed.size_if_known() is not None:
            return followed.size_if_known() or 0, COALESCED
        self._refuse_offline_blob(route, digest)
        return await self._client(route).head_blob(route.repository, digest), MISS

    def _refuse_offline_blob(self, route: Route, digest: Digest) -> None:
        if route.upstream.offline and str(digest) not in self._transfers:
            raise BlobUnknown(
                f"{digest} is not cached and the mirror is offline for {route.upstream.name}"
            )

    async def open_blob(self, route: Route, digest: Digest) -> tuple[StoredBlob | BlobStream, str]:
        """The stored blob (HIT; the caller closes it), or a transfer to stream from (its
        size known): one this request started (MISS) or one already running here or in
        another worker process (COALESCED)."""
        deadline = time.monotonic() + self._config.timeouts.transfer
        while True:
            stored = self._store.open_blob(digest)
            if stored is not None:
                return stored, HIT
            self._refuse_offline_blob(route, digest)
            result = COALESCED
            transfer = self._transfers.get(str(digest))
            if transfer is not None and not transfer.serves_from(0):
                # Streamed through without being kept, and past what it still holds: this
                # client gets a transfer of its own.
                result, transfer = MISS, self._pass_through(route, digest)
            elif transfer is None:
                result = MISS
                transfer = self._start_fill(route, digest)
            if transfer is not None:
                await transfer.wait_started()
                return transfer, result
            # Another process is filling this digest: follow its file as it grows.
            followed = self._store.follow(digest)
            if followed is not None:
                try:
                    await followed.wait_started(
                        self._config.timeouts.connect + self._config.timeouts.read
                    )
                    return followed, COALESCED
                except NotKept:
                    # Streamed through there (a full disk, a blob over the bound): there is
                    # no file to follow, so this client gets a transfer of its own.
                    transfer = self._pass_through(route, digest)
                    await transfer.wait_started()
                    return transfer, MISS
                except TransferFailed:
                    pass  # it gave up before it began: look again, and maybe fetch it here
            if time.monotonic() > deadline:
                raise UpstreamTimeout(f"timed out waiting for another worker to fetch {digest}")
            await asyncio.sleep(FOREIGN_FILL_POLL)

    def _start_fill(self, route: Route, digest: Digest) -> Transfer | None:
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
        transfer = self._run_fill(route, digest, temp)
        self._transfers[str(digest)] = transfer
        return transfer

    def _pass_through(self, route: Route, digest: Digest) -> Transfer:
        """A transfer for one client that keeps nothing (and coalesces with nothing)."""
        return self._run_fill(route, digest, PassThroughBlob(digest))

    def _run_fill(self, route: Route, digest: Digest, temp: TempBlob) -> Transfer:
        transfer = Transfer(temp.read_back())
        task = asyncio.create_task(self._fill(route, digest, temp, transfer))
        self._fills.add(task)
        task.add_done_callback(self._fills.discard)
        return transfer

    async def _fill(self, route: Route, digest: Digest, temp: TempBlob, transfer: Transfer) -> None:
        """Fetch one blob into the store, feeding `transfer`'s readers as bytes arrive.

        Runs on its own task: a client that hangs up does not stop it. The whole of it,
        waiting for a transfer slot included, ends within `timeouts.transfer`.
        """
        client = self._client(route)
        deadline = time.monotonic() + self._config.timeouts.transfer
        try:
            try:
                async with asyncio.timeout_at(deadline):
                    async with client.transfer_slots:
                        await self._download(client, route, digest, temp, transfer, deadline)
            except TimeoutError:
                raise UpstreamTimeout(
                    f"upstream {client.name}: transfer of {digest} took longer than "
                    f"timeouts.transfer ({self._config.timeouts.transfer:g}s)"
                ) from None
            temp.verify()
            transfer.finish()  # the right bytes: clients get their last byte now
            # fsync, rename, index and eviction: off the loop, so other clients go on.
            if await asyncio.to_thread(_keep, temp):
                log.info("stored %s (%d bytes) from %s", digest, temp.written, client.name)
            else:
                log.warning("served %s (%d bytes) without keeping it", digest, temp.written)
        except (RegistryError, DigestMismatch, OSError) as exc:
            temp.discard()
            error = _as_registry_error(exc, client.name, digest)
            log.warning("fetch of %s from %s failed: %s", digest, client.name, error.message)
            transfer.fail(error)
        except BaseException as exc:
            temp.discard()
            transfer.fail(UpstreamError("transfer stopped"))
            if isinstance(exc, asyncio.CancelledError):
                raise
            log.exception("fetch of %s from %s failed", digest, client.name)
        finally:
            if self._transfers.get(str(digest)) is transfer:
                del self._transfers[str(digest)]

    async def _download(
        self,
        client: UpstreamClient,
        route: Route,
        digest: Digest,
        temp: TempBlob,
        transfer: Transfer,
        deadline: float,
    ) -> None:
        """Stream the blob into `temp` and to `transfer`'s readers. What the store cannot
        keep (larger than its bound, or the disk is full) is streamed through in a bounded
        window, never buffered whole."""

        def started(size: int | None) -> None:
            # Spilled before announced: processes following this fill learn both at once.
            if size is not None and size > self._store.max_size:
                self._spill(temp, transfer, digest, f"{size} bytes, over the store's bound")
            try:
                temp.announce(size)
            except WRITE_ERRORS as exc:
                self._store.counters.write_failed(f"announcing {digest}", exc)
                self._spill(temp, transfer, digest, "the disk is full")
            transfer.start(size)

        fetched = self._metrics.fetched_bytes.labels(client.name)  # looked up once, not per chunk
        chunks = client.blob_chunks(route.repository, digest, deadline=deadline, started=started)
        async for chunk in chunks:
            self._write(temp, transfer, chunk, digest)
            fetched.inc(len(chunk))
            if transfer.spilled:
                await transfer.drain(self._config.timeouts.read)

    def _write(self, temp: TempBlob, transfer: Transfer, chunk: bytes, digest: Digest) -> None:
        """Append a chunk; when the store cannot take it, go on streaming without keeping."""
        if not temp.spilled and temp.written + len(chunk) > self._store.max_size:
            self._spill(temp, transfer, digest, "over the store's bound")
        try:
            temp.write(chunk)
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                raise
            self._store.counters.write_failed(f"writing {digest}", exc)
            self._spill(temp, transfer, digest, f"the disk is full at byte {temp.written}")
            temp.write(chunk)
        transfer.advance(chunk)

    def _spill(self, temp: TempBlob, transfer: Transfer, digest: Digest, why: str) -> None:
        if not temp.spilled:
            log.warning("streaming %s through without keeping it: %s", digest, why)
        temp.spill()
        transfer.spill()

    # passed-through lists

    async def page(
        self, route: Route, path: str, params: dict[str, str], not_found: type[RegistryError]
    ) -> Page:
        """GET a tags list or referrers answer from the upstream, as it is."""
        if route.upstream.offline:
            raise UpstreamError(f"the mirror is offline for {route.upstream.name}")
        return await self._client(route).get_page(route.repository, path, params, not_found)

    async def close(self) -> None:
        for task in list(self._fills):
            task.cancel()
        await asyncio.gather(*self._fills, return_exceptions=True)
        await self._manifest_fetches.close()


def _keep(temp: TempBlob) -> bool:
    """Make a verified fill durable and visible, unless it was not kept (blocking)."""
    if temp.spilled:
        return temp.commit(keep=False)
    temp.sync()
    return temp.commit()


def _as_registry_error(exc: BaseException, upstream: str, digest: Digest) -> RegistryError:
    if isinstance(exc, RegistryError):
        return exc
    if isinstance(exc, DigestMismatch):
        return UpstreamError(f"upstream {upstream} sent content that does not match {digest}")
    if isinstance(exc, TimeoutError):
        return UpstreamTimeout(f"upstream {upstream} stalled sending {digest}")
    if isinstance(exc, OSError):
        return UpstreamError(f"could not store {digest}: {exc.strerror or exc}")
    return UpstreamError(f"upstream {upstream} failed sending {digest}")
