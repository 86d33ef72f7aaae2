"""An upstream the mirror must not contact (`offline: true`): every call refuses.

The policy treats it as any upstream; what is cached is answered before it is asked, and
what is not gets an answer that says why, without a byte leaving the machine.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping

from ..config import UpstreamConfig
from ..errors import BlobUnknown, NotCached, RegistryError
from ..reference import Digest
from .client import FetchedManifest, ManifestHead, Page


class OfflineClient:
    """Refuses every request to the upstream `name`."""

    def __init__(self, name: str, max_transfers: int) -> None:
        self.name = name
        self.transfer_slots = asyncio.Semaphore(max_transfers)

    def down(self) -> bool:
        return False  # never asked, so never late

    def renew_login(self, config: UpstreamConfig) -> bool:
        return False  # never logs in

    def _not_cached(self, what: str) -> str:
        return f"{what} is not cached and the mirror is offline for {self.name}"

    async def head_manifest(
        self, repository: str, reference: str, accept: str, budget: float | None = None
    ) -> ManifestHead:
        raise NotCached(self._not_cached(f"{self.name}/{repository}:{reference}"))

    async def get_manifest(
        self, repository: str, reference: str, accept: str, expected: Digest | None
    ) -> FetchedManifest:
        raise NotCached(self._not_cached(f"{self.name}/{repository}:{reference}"))

    async def get_page(
        self,
        repository: str,
        path: str,
        params: Mapping[str, str],
        not_found: type[RegistryError],
    ) -> Page:
        raise not_found(self._not_cached(f"{self.name}/{repository}/{path}"))

    async def head_blob(self, repository: str, digest: Digest) -> int:
        raise BlobUnknown(self._not_cached(str(digest)))

    async def blob_chunks(
        self,
        repository: str,
        digest: Digest,
        *,
        deadline: float,
        started: Callable[[int | None, bool], None],
        offset: int = 0,
    ) -> AsyncGenerator[bytes, None]:
        raise BlobUnknown(self._not_cached(str(digest)))
        yield b""  # pragma: no cover (makes this an async generator)

    async def range_chunks(
        self, repository: str, digest: Digest, start: int, end: int, *, deadline: float
    ) -> AsyncIterator[bytes]:
        raise BlobUnknown(self._not_cached(str(digest)))
        yield b""  # pragma: no cover (makes this an async generator)
