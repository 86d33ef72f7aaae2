"""Manifests: exact upstream bytes kept under their digest; a tag's digest trusted for its
TTL, then revalidated with a HEAD; the last known answer served when the upstream fails.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from ..clock import Clock
from ..cluster.parts import Cluster
from ..cluster.shared import Claim
from ..config import Config
from ..errors import (
    Denied,
    KnownMissing,
    ManifestUnknown,
    NameUnknown,
    NotCached,
    TooManyRequests,
    UpstreamError,
)
from ..inflight import SingleFlight
from ..reference import MANIFEST_TYPES, Digest, parse_digest
from ..routing import Route
from ..store.base import BlobStore, DigestMismatch, manifest_key
from ..store.tags import TagEntry, TagIndex
from ..upstream.client import Upstream
from .answers import HIT, MISS, STALE, Manifest
from .membership import Membership

log = logging.getLogger("mirror.proxy")

ALL_MANIFEST_TYPES = ", ".join(MANIFEST_TYPES)
ACCEPT_MEMORY = 1024  # distinct (Accept, media type) pairs remembered
ACCEPT_KEPT = 1024  # characters of an Accept list remembered; longer ones are read each time
CLAIM_POLL = 0.05  # seconds between looks while another replica revalidates a tag


def _quietly(done: asyncio.Future[Any]) -> None:
    """Consume the outcome of work no client waits for: an eviction that failed was counted
    and logged by the store, a background revalidation's failure by the breaker."""
    if not done.cancelled():
        done.exception()


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


class Manifests:
    """Answers manifest requests, by tag or by digest."""

    def __init__(
        self,
        config: Config,
        store: BlobStore,
        tags: TagIndex,
        upstream_of: Callable[[Route], Upstream],
        clock: Clock,
        membership: Membership,
        fetched: Callable[[Route, str, bytes], None] = lambda route, media_type, data: None,
        cluster: Cluster | None = None,
    ) -> None:
        self._cluster = cluster or Cluster()
        self._membership = membership
        self._fetched = fetched  # told of each manifest fetched from an upstream (prefetch)
        self._config = config
        self._store = store
        self._tags = tags
        self._upstream_of = upstream_of
        self._clock = clock
        self._fetches: SingleFlight[tuple[str, ...], Manifest] = SingleFlight()
        self._evictions: SingleFlight[str, int] = SingleFlight()
        # What each client Accept admits: clients send the same few lists every time.
        self._accepted: dict[tuple[str, str], bool] = {}

    async def answer(self, route: Route, reference: str, accept: str, *, head: bool) -> Manifest:
        digest = parse_digest(reference)
        if digest is not None:
            return await self._by_digest(route, digest, head=head)
        return await self._by_tag(route, reference, accept, head=head)

    async def close(self) -> None:
        await self._fetches.close()
        await self._evictions.close()

    def _accepts(self, accept: str, media_type: str) -> bool:
        if len(accept) > ACCEPT_KEPT:
            return accepts(accept, media_type)  # (not kept: memory is for the usual lists)
        key = (accept, media_type)
        known = self._accepted.get(key)
        if known is None:
            if len(self._accepted) >= ACCEPT_MEMORY:
                self._accepted.clear()
            known = self._accepted[key] = accepts(accept, media_type)
        return known

    def _cached(self, digest_text: str, *, head: bool, source: str) -> Manifest | None:
        digest = parse_digest(digest_text)
        found = self._store.get_manifest(digest) if digest is not None else None
        if found is None:
            return None
        data, media_type = found
        return Manifest(str(digest), media_type, len(data), None if head else data, source)

    def _refuse_known_missing(self, route: Route, reference: str) -> None:
        """Answer a 404 the upstream gave a moment ago without asking it again."""
        if self._tags.known_missing(route.upstream.name, route.repository, reference):
            raise KnownMissing(
                f"manifest unknown to upstream {route.upstream.name} (answer cached)",
                detail={"reference": reference},
            )

    async def _by_digest(self, route: Route, digest: Digest, *, head: bool) -> Manifest:
        cached = self._cached(str(digest), head=head, source=HIT)
        if cached is not None:
            if not self._membership.enabled:
                return cached
            upstream = self._upstream_of(route)
            await self._membership.check(
                route,
                manifest_key(digest),
                lambda: upstream.head_manifest(route.repository, str(digest), ALL_MANIFEST_TYPES),
            )
            return cached
        self._refuse_known_missing(route, str(digest))
        key = (route.upstream.name, route.repository, str(digest))
        try:
            return await self._fetches.run(key, lambda: self._by_digest_missing(route, digest))
        except NotCached:
            raise
        except (ManifestUnknown, NameUnknown):
            await self._remember_missing(route, str(digest))
            raise

    async def _by_digest_missing(self, route: Route, digest: Digest) -> Manifest:
        """A manifest by digest not kept here: in a cluster with a shared tier, fetched by
        one replica (the claim's holder) while the others wait for its copy in the tier."""
        await self._refuse_cluster_missing(route, str(digest))
        shared, tier = self._cluster.shared, self._cluster.tier
        if shared is None or tier is None:
            return await self._get(route, str(digest), ALL_MANIFEST_TYPES, digest)
        give_up = asyncio.get_running_loop().time() + self._config.timeouts.revalidate
        while True:
            claim = await shared.claim(f"manifest:{digest}")
            if claim is not None or asyncio.get_running_loop().time() > give_up:
                try:  # (the tier first: its holder may have finished just before)
                    return await self._get(route, str(digest), ALL_MANIFEST_TYPES, digest)
                except (ManifestUnknown, NameUnknown):
                    if claim is not None:
                        await self._share_missing(route, str(digest))
                    raise
                finally:
                    if claim is not None:
                        await claim.release()
            await asyncio.sleep(CLAIM_POLL)
            await self._refuse_cluster_missing(route, str(digest))
            found = await self._from_tier(route, digest, head=False)
            if found is not None:
                return found

    async def _refuse_cluster_missing(self, route: Route, reference: str) -> None:
        """Answer a 404 another replica got a moment ago without asking again."""
        shared = self._cluster.shared
        if shared is None:
            return
        if await shared.known_missing(route.upstream.name, route.repository, reference):
            raise KnownMissing(
                f"manifest unknown to upstream {route.upstream.name} (answer cached)",
                detail={"reference": reference},
            )

    def at_hand(self, route: Route, reference: str, accept: str, *, head: bool) -> Manifest | None:
        """The answer when it needs nothing but memory (a manifest by digest held here, or a
        tag trusted for its TTL), else None: the same answer `answer` gives then, for the
        server's fast path (which asks this before aiohttp builds a request)."""
        digest = parse_digest(reference)
        if digest is not None:
            if self._membership.enabled:
                return None  # a hit may ask the upstream whether the repository holds it
            return self._cached(str(digest), head=head, source=HIT)
        entry = self._known(route, reference, accept)
        return None if entry is None else self._trusted(route, reference, entry, head=head)

    def _known(self, route: Route, tag: str, accept: str) -> TagEntry | None:
        """What the tag is known to name, when the client can take its type (one it cannot
        take is asked of the upstream)."""
        entry = self._tags.get(route.upstream.name, route.repository, tag)
        if entry is None or not self._accepts(accept, entry.media_type):
            return None
        return entry

    def _trusted(self, route: Route, tag: str, entry: TagEntry, *, head: bool) -> Manifest | None:
        """The tag's answer while it is trusted for its TTL (or the upstream is offline:
        what we know is all there is); None: the upstream has to be asked."""
        upstream = route.upstream
        fresh = entry.age(self._clock()) < upstream.ttl_for(route.repository, tag)
        return (
            self._cached(entry.digest, head=head, source=HIT) if fresh or upstream.offline else None
        )

    async def _by_tag(self, route: Route, tag: str, accept: str, *, head: bool) -> Manifest:
        upstream = route.upstream
        entry = self._known(route, tag, accept)
        if entry is not None and (trusted := self._trusted(route, tag, entry, head=head)):
            return trusted
        self._refuse_known_missing(route, tag)
        key = (upstream.name, route.repository, tag, accept, "HEAD" if head else "GET")
        # A tag seen before is revalidated with a HEAD (free under Docker Hub's limit); an
        # unknown one asked with GET is fetched at once, saving the HEAD's round trip.
        revalidate = head or entry is not None

        def refresh() -> Awaitable[Manifest]:
            return self._refresh(route, tag, accept, head=head, revalidate=revalidate)

        if entry is not None and self._upstream_of(route).down():
            # Down a moment ago: the last known answer now, and the revalidation (the probe,
            # once the back-off is over) goes on without this client.
            stale = self._stale(route, tag, entry, head, "the upstream is down")
            if stale is not None:
                asyncio.ensure_future(self._fetches.run(key, refresh)).add_done_callback(_quietly)
                return stale
        try:
            return await self._fetches.run(key, refresh)
        except NotCached:
            raise
        except (ManifestUnknown, NameUnknown):
            await self._remember_missing(route, tag)
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

    async def _share_missing(self, route: Route, reference: str) -> None:
        if self._cluster.shared is not None:
            await self._cluster.shared.put_missing(
                route.upstream.name, route.repository, reference, self._config.negative_ttl
            )

    async def _remember_missing(self, route: Route, reference: str) -> None:
        await self._share_missing(route, reference)
        await asyncio.to_thread(  # a database write: off the loop
            self._tags.remember_missing,
            route.upstream.name,
            route.repository,
            reference,
            self._config.negative_ttl,
        )

    def _stale(
        self, route: Route, tag: str, entry: TagEntry | None, head: bool, why: str
    ) -> Manifest | None:
        """The last known answer for a tag, when the upstream cannot give a fresh one."""
        if entry is None:
            return None
        cached = self._cached(entry.digest, head=head, source=STALE)
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

    async def _refresh(
        self, route: Route, tag: str, accept: str, *, head: bool, revalidate: bool
    ) -> Manifest:
        """Ask the upstream what the tag points to: HEAD first (when revalidating), GET only
        for what is missing. In a cluster, first what another replica confirmed within the
        TTL, and only one replica asks the upstream."""
        claim: Claim | None = None
        if self._cluster.shared is not None:
            await self._refuse_cluster_missing(route, tag)
            answer, claim, known = await self._cluster_answer(route, tag, accept, head=head)
            if answer is not None:
                return answer
            revalidate = revalidate or known
        try:
            return await self._ask_upstream(route, tag, accept, head=head, revalidate=revalidate)
        except (ManifestUnknown, NameUnknown):
            if claim is not None:  # said before the claim goes: its waiters do not ask too
                await self._share_missing(route, tag)
            raise
        finally:
            if claim is not None:
                await claim.release()

    async def _cluster_answer(
        self, route: Route, tag: str, accept: str, *, head: bool
    ) -> tuple[Manifest | None, Claim | None, bool]:
        """The tag's answer as another replica confirmed it within its TTL (adopted here);
        else the cluster's claim on revalidating it, after waiting (up to
        timeouts.revalidate) for the replica that holds it. Also whether any answer for the
        tag is known (a HEAD then revalidates it)."""
        shared = self._cluster.shared
        assert shared is not None
        upstream = route.upstream
        ttl = upstream.ttl_for(route.repository, tag)
        give_up = asyncio.get_running_loop().time() + self._config.timeouts.revalidate
        known = self._tags.get(upstream.name, route.repository, tag)
        claim: Claim | None = None
        try:
            while True:
                found = await shared.tag(upstream.name, route.repository, tag)
                if found is not None and (known is None or found.confirmed_at > known.confirmed_at):
                    known = found
                    await asyncio.to_thread(
                        self._tags.put, upstream.name, route.repository, tag, found
                    )
                if (
                    known is not None
                    and known.age(self._clock()) < ttl
                    and self._accepts(accept, known.media_type)
                ):
                    answer = self._cached(known.digest, head=head, source=HIT)
                    digest = parse_digest(known.digest)
                    if answer is None and digest is not None:
                        # Not here yet: from the shared tier, else by digest upstream.
                        fetched = await self._get(route, str(digest), ALL_MANIFEST_TYPES, digest)
                        answer = dataclasses.replace(fetched, data=None) if head else fetched
                    if answer is not None:
                        if claim is not None:
                            await claim.release()
                        return answer, None, True
                if claim is not None:
                    # Looked again with the claim: still for this one, unless its last
                    # holder was told the tag is unknown.
                    await self._refuse_cluster_missing(route, tag)
                    return None, claim, known is not None
                claim = await shared.claim(f"tag:{upstream.name}/{route.repository}:{tag}")
                if claim is not None:
                    continue  # one more look: its last holder may have answered just before
                if asyncio.get_running_loop().time() > give_up:
                    return None, None, known is not None
                await asyncio.sleep(CLAIM_POLL)
                await self._refuse_cluster_missing(route, tag)  # what the holder was told
        except BaseException:
            if claim is not None:  # (not left to lapse: its waiters would wait a lease)
                await claim.release()
            raise

    async def _from_tier(self, route: Route, digest: Digest, *, head: bool) -> Manifest | None:
        """A manifest from the shared tier, kept here too (None: the tier lacks it)."""
        tier = self._cluster.tier
        found = await tier.get_manifest(digest) if tier is not None else None
        if found is None:
            return None
        data, media_type = found
        await self._keep(route, digest, data, media_type)  # (checked by the tier already)
        return Manifest(str(digest), media_type, len(data), None if head else data, HIT)

    async def _keep(self, route: Route, digest: Digest, data: bytes, media_type: str) -> None:
        """Keep a manifest in the store (two fsyncs and the index: off the loop)."""
        await asyncio.to_thread(
            self._store.put_manifest,
            digest,
            data,
            media_type,
            route.upstream.name,
            route.repository,
        )

    async def _ask_upstream(
        self, route: Route, tag: str, accept: str, *, head: bool, revalidate: bool
    ) -> Manifest:
        send_accept = upstream_accept(accept)
        if revalidate:
            # Its own short budget: past it (or with the upstream down) the last known
            # answer is served stale at once.
            answer = await self._upstream_of(route).head_manifest(
                route.repository, tag, send_accept, self._config.timeouts.revalidate
            )
            if answer.digest is not None:
                digest_text = str(answer.digest)
                await self._remember_tag(route, tag, digest_text, answer.media_type)
                cached = self._cached(digest_text, head=head, source=HIT)
                if cached is None:
                    cached = await self._from_tier(route, answer.digest, head=head)
                if cached is not None:
                    return cached
                if head and answer.size is not None:
                    return Manifest(digest_text, answer.media_type, answer.size, None, MISS)
        manifest = await self._get(route, tag, send_accept, None)
        await self._remember_tag(route, tag, manifest.digest, manifest.media_type)
        return manifest

    async def _remember_tag(self, route: Route, tag: str, digest: str, media_type: str) -> None:
        entry = TagEntry(digest, media_type, self._clock())
        if self._cluster.shared is not None:
            await self._cluster.shared.put_tag(route.upstream.name, route.repository, tag, entry)
        # A database write: off the loop.
        await asyncio.to_thread(self._tags.put, route.upstream.name, route.repository, tag, entry)

    async def _get(
        self, route: Route, reference: str, accept: str, expected: Digest | None
    ) -> Manifest:
        """GET a manifest (checked by the upstream client) and keep it when the store can;
        when it cannot, the exact bytes are served all the same. By digest, the shared tier
        is asked first."""
        if expected is not None:
            from_tier = await self._from_tier(route, expected, head=False)
            if from_tier is not None:
                return from_tier
        upstream = self._upstream_of(route)
        fetched = await upstream.get_manifest(route.repository, reference, accept, expected)
        digest, media_type, data = fetched.digest, fetched.media_type, fetched.data
        try:
            await self._keep(route, digest, data, media_type)
        except DigestMismatch:  # checked already; the store checks again, being the store
            raise UpstreamError(
                f"upstream {upstream.name} sent a manifest that does not match {digest}"
            ) from None
        self._make_room_soon()
        if self._cluster.tier is not None:
            # For the other replicas, before the cluster's claim on it goes: they find it
            # there (small, and bounded by the tier's answer time).
            await self._cluster.tier.put_manifest(digest, data, media_type)
        self._fetched(route, media_type, data)
        return Manifest(str(digest), media_type, len(data), data, MISS)

    def _make_room_soon(self) -> None:
        """Evict what the new manifest pushed over the bound, on its own: however much
        there is to evict, the client that asked does not wait for it."""
        if "room" not in self._evictions:
            work = self._evictions.run("room", lambda: asyncio.to_thread(self._store.make_room))
            asyncio.ensure_future(work).add_done_callback(_quietly)
