"""The pull-through policy, as the handlers see it: one object over the policies for
manifests, blobs (and their fills) and the lists passed through as they are."""

from __future__ import annotations

import asyncio
import json

from ..clock import Clock, system_clock
from ..cluster.parts import Cluster
from ..config import Config
from ..errors import RegistryError, UpstreamError
from ..inflight import BlobStream
from ..metrics import Metrics
from ..reference import Digest
from ..routing import Route
from ..store.base import BlobStore, StoredBlob
from ..store.tags import TagIndex
from ..upstream.client import Page, Upstream
from .answers import Manifest
from .blobs import Blobs
from .fills import Fills
from .manifests import Manifests
from .membership import Membership
from .prefetch import Prefetcher


class Proxy:
    """Answers manifests, blobs, tags and referrers for routed requests."""

    def __init__(
        self,
        config: Config,
        store: BlobStore,
        tags: TagIndex,
        upstreams: dict[str, Upstream],
        metrics: Metrics,
        clock: Clock = system_clock,
        cluster: Cluster | None = None,
    ) -> None:
        self._upstreams = upstreams
        self._tags = tags
        cluster = cluster or Cluster()
        membership = Membership(store, enabled=config.access is not None)
        self._fills = Fills(config, store, metrics, self._upstream_of, cluster)
        prefetcher = Prefetcher(store, self._fills, metrics)
        self._manifests = Manifests(
            config,
            store,
            tags,
            self._upstream_of,
            clock,
            membership,
            prefetcher.manifest_fetched,
            cluster,
        )
        self._blobs = Blobs(
            config,
            store,
            self._fills,
            self._upstream_of,
            membership,
            prefetcher.answered,
            cluster.tier,
        )

    def _upstream_of(self, route: Route) -> Upstream:
        return self._upstreams[route.upstream.name]

    async def manifest(self, route: Route, reference: str, accept: str, *, head: bool) -> Manifest:
        return await self._manifests.answer(route, reference, accept, head=head)

    def manifest_at_hand(
        self, route: Route, reference: str, accept: str, *, head: bool
    ) -> Manifest | None:
        """`manifest`'s answer when memory alone gives it (the server's fast path)."""
        return self._manifests.at_hand(route, reference, accept, head=head)

    async def blob_size(self, route: Route, digest: Digest) -> tuple[int, str]:
        return await self._blobs.size(route, digest)

    async def open_blob(self, route: Route, digest: Digest) -> tuple[StoredBlob | BlobStream, str]:
        return await self._blobs.open(route, digest)

    async def page(
        self, route: Route, path: str, params: dict[str, str], not_found: type[RegistryError]
    ) -> Page:
        """GET a tags list or referrers answer from the upstream, as it is. A tags list the
        upstream cannot give (offline, unreachable, down) is the tags the mirror knows."""
        upstream = self._upstream_of(route)
        if path == "tags/list" and route.upstream.offline:
            offline = not_found(
                f"no tags of {route.upstream.name}/{route.repository} are cached, and the "
                f"mirror is offline for {route.upstream.name}"
            )
            return await self._known_tags(route, params, offline)
        try:
            return await upstream.get_page(route.repository, path, params, not_found)
        except UpstreamError as error:
            if path != "tags/list":
                raise
            return await self._known_tags(route, params, error)

    async def _known_tags(
        self, route: Route, params: dict[str, str], otherwise: RegistryError
    ) -> Page:
        """The tags the mirror knows of `route`'s repository; `otherwise` when none."""
        entries = await asyncio.to_thread(self._tags.entries)  # a scan: off the loop
        tags = sorted(
            tag
            for upstream, repository, tag, _ in entries
            if (upstream, repository) == (route.upstream.name, route.repository)
        )
        if not tags:
            raise otherwise
        tags = [tag for tag in tags if tag > params.get("last", "")]
        if params.get("n", "").isdigit():
            tags = tags[: int(params["n"])]
        body = json.dumps({"name": route.repository, "tags": tags}).encode()
        return Page(body, "application/json", None)

    async def repositories(self) -> list[tuple[str, str]]:
        """(upstream, repository) of every cached tag, sorted (a scan: in a thread)."""
        return await asyncio.to_thread(self._tags.repositories)

    def transfers_in_flight(self) -> int:
        return self._fills.in_flight()

    def waiting_clients(self) -> int:
        return self._fills.waiting_clients()

    async def close(self) -> None:
        await self._fills.close()
        await self._manifests.close()
