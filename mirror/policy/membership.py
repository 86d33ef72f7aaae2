"""With access rules, content is served under a repository only where it is known to be.

The store keeps a blob or manifest once, by digest, whatever repository asked for it. A
client allowed to pull `docker.io/*` must not get a private repository's layer by asking
for its digest under a repository it may pull: a hit is served under the repository it
was fetched for, or under one the upstream confirms holds it (one HEAD, remembered).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from ..routing import Route
from ..store.base import BlobStore

MAX_KNOWN = 100_000  # (content, repository) pairs remembered; all forgotten past it


class Membership:
    def __init__(self, store: BlobStore, enabled: bool) -> None:
        self._store = store
        self.enabled = enabled  # callers skip building the check when it is off (a hit's path)
        self._known: set[tuple[str, str, str]] = set()

    async def check(self, route: Route, key: str, confirm: Callable[[], Awaitable[object]]) -> None:
        """Return when `key` may be served under `route`; `confirm` asks the route's
        upstream (and raises its 404, or its failure, when it cannot say yes)."""
        if not self.enabled:
            return
        member = (key, route.upstream.name, route.repository)
        if member in self._known:
            return
        owner = await asyncio.to_thread(self._store.owner, key)  # an index read
        if owner != (route.upstream.name, route.repository):
            await confirm()
        if len(self._known) >= MAX_KNOWN:
            self._known.clear()
        self._known.add(member)
